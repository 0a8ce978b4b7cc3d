"""ShardedSampler: exact coverage per epoch on W = 1..4, resume mid-epoch on another world size;
the torch loader built on it (workers, flips, resume through the loader)."""

from __future__ import annotations

import itertools

import pytest
import torch

from fr_dist.data import build_train_loader, open_recordio
from fr_dist.data.sampler import ShardedSampler, flip_bits


def epoch_samples(n, W, B, epoch=0, seed=3, drop_last=True, state=None):
    """Per rank: the flat list of samples it sees in ``epoch`` (from ``state`` when given)."""
    per_rank = []
    for r in range(W):
        s = ShardedSampler(n, r, W, B, seed=seed, drop_last=drop_last)
        s.set_epoch(epoch)
        if state is not None:
            s.load_state_dict(state)
        per_rank.append([i for batch in s for i in batch])
    return per_rank


def global_stream(n, W, B, epoch, seed, state=None):
    """The sequence of global batches (rank-major within a step) of W ranks."""
    ss = [ShardedSampler(n, r, W, B, seed=seed) for r in range(W)]
    for s in ss:
        s.set_epoch(epoch)
        if state is not None:
            s.load_state_dict(state)
    return [sum(step, []) for step in zip(*[list(s) for s in ss])]


@pytest.mark.parametrize("W", [1, 2, 3, 4])
def test_every_key_once_per_epoch(W):
    n, B = 103, 4
    ranks = epoch_samples(n, W, B, drop_last=True)
    seen = list(itertools.chain(*ranks))
    assert len(seen) == len(set(seen)) == (n // (W * B)) * W * B
    assert all(len(r) == len(ranks[0]) for r in ranks)
    padded = list(itertools.chain(*epoch_samples(n, W, B, drop_last=False)))
    assert set(padded) == set(range(n))  # padding wraps: every key at least once
    assert len(padded) == -(-n // (W * B)) * W * B
    s = ShardedSampler(n, 0, W, B, seed=3, drop_last=False)
    assert len(s) == s.steps_per_epoch() == -(-n // (W * B))


def test_keys_are_yielded_and_batches_sized():
    keys = list(range(1, 41))  # e.g. insightface image keys 1..40
    s = ShardedSampler(keys, 1, 2, 5, seed=0)
    batches = list(s)
    assert len(batches) == len(s) == 4 and all(len(b) == 5 for b in batches)
    assert all(isinstance(k, int) and 1 <= k <= 40 for b in batches for k in b)
    other = [k for b in ShardedSampler(keys, 0, 2, 5, seed=0) for k in b]
    assert sorted(other + [k for b in batches for k in b]) == keys


def test_epochs_reshuffle_and_are_deterministic():
    a = epoch_samples(50, 2, 5, epoch=0)
    assert a == epoch_samples(50, 2, 5, epoch=0)
    assert a != epoch_samples(50, 2, 5, epoch=1)
    s = ShardedSampler(10, 0, 1, 2, shuffle=False)
    assert [i for b in s for i in b] == list(range(10))
    assert (flip_bits(100, 1, 0) == flip_bits(100, 1, 0)).all() and (
        flip_bits(100, 1, 0) != flip_bits(100, 1, 1)
    ).any()


@pytest.mark.parametrize(
    "w_old,b_old,w_new,b_new",
    [(2, 6, 3, 4), (2, 6, 2, 6), (4, 3, 1, 12), (3, 4, 2, 3), (2, 5, 4, 7)],
)
def test_resume_mid_epoch_no_repeat_no_gap(w_old, b_old, w_new, b_new):
    n, epoch, steps_done, seed = 240, 2, 5, 9
    s = ShardedSampler(n, 0, w_old, b_old, seed=seed)
    s.set_epoch(epoch)
    state = s.state_dict(consumed_batches=steps_done)
    assert state["consumed_global"] == steps_done * w_old * b_old and state["epoch"] == epoch
    before = list(
        itertools.chain(*[r[: steps_done * b_old] for r in epoch_samples(n, w_old, b_old, epoch, seed=seed)])
    )
    after = list(itertools.chain(*epoch_samples(n, w_new, b_new, epoch, seed=seed, state=state)))
    assert len(before + after) == len(set(before + after))  # no repeats
    leftover = (n - state["consumed_global"]) % (w_new * b_new)
    assert len(set(before + after)) == n - leftover  # no gaps beyond the dropped tail
    # the resumed stream is the uninterrupted global order from the resume point on
    full = ShardedSampler(n, 0, 1, 1, seed=seed).epoch_order(epoch)
    glob = list(itertools.chain(*global_stream(n, w_new, b_new, epoch, seed, state)))
    c = state["consumed_global"]
    assert glob == full[c : c + len(glob)].tolist()
    if w_old * b_old == w_new * b_new:  # same global batch: exactly the uninterrupted steps
        assert (
            global_stream(n, w_new, b_new, epoch, seed, state)
            == global_stream(n, w_old, b_old, epoch, seed)[steps_done:]
        )


def test_state_validation():
    s = ShardedSampler(10, 0, 1, 2, seed=1)
    with pytest.raises(ValueError, match="for 11 samples"):
        s.load_state_dict(dict(epoch=0, consumed_global=0, seed=1, num_samples=11))
    with pytest.raises(ValueError, match="has seed 2"):
        s.load_state_dict(dict(epoch=0, consumed_global=0, seed=2))
    with pytest.raises(ValueError, match="lacks 'consumed_global'"):
        s.load_state_dict(dict(epoch=0))
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        ShardedSampler(3, 0, 2, 2)
    with pytest.raises(ValueError, match="rank 2 outside"):
        ShardedSampler(10, 2, 2, 2)
    s.load_state_dict(dict(epoch=3, consumed_global=12, seed=1))  # padded past the end: epoch done
    assert s.epoch == 3 and len(s) == 0


# ----------------------------------------------------------------------------- torch loader


def _epoch(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def test_loader_batches_workers_flips(rec_fixture_dir):
    rec_path = rec_fixture_dir / "train.rec"
    rec = open_recordio(rec_path)
    kw = dict(rank=1, world_size=2, batch_size=16, seed=5, device="cpu")
    loader = build_train_loader(rec_path, num_workers=2, **kw)
    assert len(loader) == 200 // 32 and loader.num_classes == 20 and loader.num_images == 200
    batches = _epoch(loader, 0)
    assert len(batches) == len(loader)
    x, y = batches[0]
    assert x.shape == (16, 3, 112, 112) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert -1.0 <= x.min() and x.max() <= 1.0
    # same samples, labels and (mirrored) pixels as the sampler + flip bits say, for any workers
    inline = build_train_loader(rec_path, num_workers=0, normalize="worker", **kw)
    s = ShardedSampler(200, 1, 2, 16, seed=5)
    bits = flip_bits(200, 5, 0)
    for (xb, yb), (xi, yi), idx in zip(batches, _epoch(inline, 0), s):
        assert torch.equal(yb, yi) and torch.allclose(xb, xi, atol=1e-6)
        keys = [rec.image_keys[i] for i in idx]
        assert yb.tolist() == [rec.label(k) for k in keys]
        img = rec.decode(keys[0])
        img = img[:, ::-1] if bits[idx[0]] else img
        ref = (torch.from_numpy(img.copy()).permute(2, 0, 1).float() - 127.5) / 127.5
        assert torch.allclose(xb[0], ref, atol=1e-6)
    assert any(bits[i] for i in itertools.chain(*ShardedSampler(200, 1, 2, 16, seed=5)))
    noflip = _epoch(build_train_loader(rec_path, num_workers=0, flip=False, **kw), 0)
    first = list(s)[0][0]
    ref = (torch.from_numpy(rec.decode(rec.image_keys[first])).permute(2, 0, 1).float() - 127.5) / 127.5
    assert torch.allclose(noflip[0][0][0], ref, atol=1e-6)


def test_loader_resume_on_other_world_size(rec_fixture_dir):
    """2 ranks x 8 stop after 3 steps; 4 ranks x 4 resume: the same global batches follow."""
    rec_path = rec_fixture_dir / "train.rec"

    def global_batches(W, B, state=None):
        per_rank = []
        for r in range(W):
            ld = build_train_loader(rec_path, r, W, B, seed=2, num_workers=0, device="cpu")
            ld.sampler.set_epoch(1)
            if state is not None:
                ld.sampler.load_state_dict(state)
            per_rank.append(list(ld))
        # per step: ranks' batches concatenated -> the global batch [W*B, ...]
        return [(torch.cat([x for x, _ in step]), torch.cat([y for _, y in step])) for step in zip(*per_rank)]

    full = global_batches(2, 8)
    s = build_train_loader(rec_path, 0, 2, 8, seed=2, num_workers=0, device="cpu").sampler
    s.set_epoch(1)
    state = s.state_dict(consumed_batches=3)
    resumed = global_batches(4, 4, state)
    assert len(resumed) == len(full) - 3
    for (xa, ya), (xb, yb) in zip(resumed, full[3:]):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
