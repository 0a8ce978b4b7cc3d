"""ShardedSampler: exact coverage per epoch on W = 1..4, resume mid-epoch on another world size."""

from __future__ import annotations

import itertools

import pytest

from fr_dist.data.sampler import ShardedSampler


def epoch_samples(n, W, B, epoch=0, seed=3, drop_last=True, state=None):
    per_rank = []
    for r in range(W):
        s = ShardedSampler(n, r, W, B, seed=seed, drop_last=drop_last)
        s.set_epoch(epoch)
        if state is not None:
            s.load_state_dict(state)
        per_rank.append([i for batch in s for i, _ in batch])
    return per_rank


@pytest.mark.parametrize("W", [1, 2, 3, 4])
def test_every_key_once_per_epoch(W):
    n, B = 103, 4
    ranks = epoch_samples(n, W, B, drop_last=True)
    seen = list(itertools.chain(*ranks))
    assert len(seen) == len(set(seen)) == (n // (W * B)) * W * B
    padded = list(itertools.chain(*epoch_samples(n, W, B, drop_last=False)))
    assert set(padded) == set(range(n))  # padding wraps: every key at least once
    assert len(padded) == -(-n // (W * B)) * W * B
    assert all(len(r) == len(ranks[0]) for r in ranks)


def test_epochs_reshuffle_and_are_deterministic():
    a = epoch_samples(50, 2, 5, epoch=0)
    assert a == epoch_samples(50, 2, 5, epoch=0)
    assert a != epoch_samples(50, 2, 5, epoch=1)


@pytest.mark.parametrize("w_old,b_old,w_new,b_new", [(2, 6, 3, 4), (2, 6, 2, 6), (4, 3, 1, 12), (3, 4, 2, 3)])
def test_resume_mid_epoch_no_repeat_no_gap(w_old, b_old, w_new, b_new):
    n, epoch, steps_done = 240, 2, 5
    s = ShardedSampler(n, 0, w_old, b_old, seed=9)
    s.set_epoch(epoch)
    state = s.state_dict(consumed_batches=steps_done)
    assert state["consumed_global"] == steps_done * w_old * b_old
    before = list(itertools.chain(*[r[: steps_done * b_old] for r in epoch_samples(n, w_old, b_old, epoch, seed=9)]))
    after = list(itertools.chain(*epoch_samples(n, w_new, b_new, epoch, seed=9, state=state)))
    full, flips_full = ShardedSampler(n, 0, 1, 1, seed=9).epoch_order(epoch)
    assert sorted(before + after) == sorted(set(before + after))  # no repeats
    covered = set(before + after)
    leftover = (n - state["consumed_global"]) % (w_new * b_new)
    assert len(covered) == n - leftover  # no gaps beyond the dropped tail
    # the resumed stream is the uninterrupted global order from the resume point on
    G = w_new * b_new
    s2 = [ShardedSampler(n, r, w_new, b_new, seed=9) for r in range(w_new)]
    for x in s2:
        x.load_state_dict(state)
    steps = list(zip(*[list(x) for x in s2]))
    glob = [i for step in steps for batch in step for i, _ in batch]
    c = state["consumed_global"]
    assert glob == full[c : c + len(steps) * G].tolist()


def test_state_validation():
    s = ShardedSampler(10, 0, 1, 2, seed=1)
    with pytest.raises(ValueError, match="for 11 samples"):
        s.load_state_dict(dict(epoch=0, consumed_global=0, seed=1, num_samples=11))
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        ShardedSampler(3, 0, 2, 2)
