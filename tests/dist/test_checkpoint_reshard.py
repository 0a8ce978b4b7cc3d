"""Classifier shards and their optimizer state re-shard across world sizes bit-exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from reference import assemble

from fr_dist import checkpoint_io
from fr_dist.heads import PartialFCHead, SphereFace2Head
from fr_dist.sharding import class_range
from fr_dist.testing import spawn_gloo
from fr_dist.train import checkpoint as ckpt

pytestmark = pytest.mark.dist
K, D, B = 23, 6, 4


def _save_head_shard(head, opt, folder, rank):
    """What a checkpoint writes for the head of ``rank`` (train/checkpoint.py HeadShards)."""
    ckpt.atomic_save(
        ckpt.HeadShards(head, opt).save_files(folder, rank)[f"head_rank{rank}.pt"],
        Path(folder) / f"head_rank{rank}.pt",
    )


def _make(kind):
    if kind == "sf2":
        return SphereFace2Head(D, K, seed=3)
    return PartialFCHead(D, K, sample_rate=0.5, seed=3)


def _opt(head, name):
    if name == "sgd":
        return torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    return torch.optim.AdamW(head.parameters(), lr=0.01)


def _state_rows(head, opt):
    st = opt.state.get(head.weight, {})
    return {k: v.clone() for k, v in st.items() if torch.is_tensor(v) and v.dim() == 2}


def _save_fn(rank, world, folder, kind, optname):
    head = _make(kind)
    opt = _opt(head, optname)
    g = torch.Generator().manual_seed(rank)
    for _ in range(3):
        loss = head(torch.randn(B, D, generator=g), torch.randint(0, K, (B,), generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    _save_head_shard(head, opt, Path(folder), rank)
    return dict(
        start=head.class_start,
        weight=head.weight.detach().clone(),
        rows=_state_rows(head, opt),
        bias_state={k: v for k, v in opt.state[head.bias].items()} if hasattr(head, "bias") else None,
    )


def _load_fn(rank, world, folder, kind, optname):
    head = _make(kind)
    opt = _opt(head, optname)
    ckpt.load_head_shard(head, opt, Path(folder))
    out = dict(
        start=head.class_start,
        n=head.num_local,
        weight=head.weight.detach().clone(),
        rows=_state_rows(head, opt),
    )
    # training continues after the load
    loss = head(torch.randn(B, D), torch.randint(0, K, (B,)))
    opt.zero_grad()
    loss.backward()
    opt.step()
    out["finite"] = bool(torch.isfinite(head.weight).all())
    return out


@pytest.mark.parametrize(
    "kind,optname,w_save,w_load",
    [("sf2", "sgd", 2, 1), ("sf2", "sgd", 2, 3), ("pfc", "adamw", 4, 3), ("sf2", "adamw", 3, 5)],
)
def test_reshard_bit_identical(tmp_path, kind, optname, w_save, w_load):
    saved = spawn_gloo(_save_fn, w_save, args=(str(tmp_path), kind, optname))
    loaded = spawn_gloo(_load_fn, w_load, args=(str(tmp_path), kind, optname))
    full_w = assemble([s["weight"] for s in saved], [s["start"] for s in saved], K)
    torch.testing.assert_close(
        assemble([r["weight"] for r in loaded], [r["start"] for r in loaded], K),
        full_w,
        rtol=0,
        atol=0,
    )
    for key in saved[0]["rows"]:
        full = assemble([s["rows"][key] for s in saved], [s["start"] for s in saved], K)
        got = assemble([r["rows"][key] for r in loaded], [r["start"] for r in loaded], K)
        torch.testing.assert_close(got, full, rtol=0, atol=0)
    assert all(r["finite"] for r in loaded)


def test_reshard_to_zero_class_ranks(tmp_path):
    """K=3 saved on 1 rank, loaded on 4 ranks (rank 3 owns nothing)."""
    head = SphereFace2Head(D, 3, seed=1)
    opt = _opt(head, "sgd")
    head(torch.randn(B, D), torch.randint(0, 3, (B,))).backward()
    opt.step()
    _save_head_shard(head, opt, tmp_path, 0)

    for rank in range(4):
        h = SphereFace2Head(D, 3, seed=9)
        h.rank, h.world_size = rank, 4
        h.class_start, h.num_local = class_range(3, rank, 4)
        h.weight = torch.nn.Parameter(torch.zeros(h.num_local, D))
        o = _opt(h, "sgd")
        ckpt.load_head_shard(h, o, tmp_path)
        torch.testing.assert_close(
            h.weight.detach(), head.weight.detach()[h.class_start : h.class_start + h.num_local]
        )
        torch.testing.assert_close(h.bias.detach(), head.bias.detach())


def test_refuses_mismatched_num_classes(tmp_path):
    head = SphereFace2Head(D, K)
    _save_head_shard(head, _opt(head, "sgd"), tmp_path, 0)
    other = SphereFace2Head(D, K + 1)
    with pytest.raises(ckpt.CheckpointError, match="num_classes=23.*has 24"):
        ckpt.load_head_shard(other, None, tmp_path)
    other = SphereFace2Head(D + 1, K)
    with pytest.raises(ckpt.CheckpointError, match="embedding_size"):
        ckpt.load_head_shard(other, None, tmp_path)


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    head = SphereFace2Head(D, K)
    for step in (10, 20):
        tmp = ckpt.tmp_dir(run, step)
        tmp.mkdir(parents=True)
        _save_head_shard(head, _opt(head, "sgd"), tmp, 0)
        if step == 20:
            # the writer dies before publishing: the rename never happens
            real = checkpoint_io.os.replace

            def dying(src, dst, real=real):
                if str(dst).endswith("/20"):
                    raise KeyboardInterrupt("killed during save")
                return real(src, dst)

            monkeypatch.setattr(checkpoint_io.os, "replace", dying)
            with pytest.raises(KeyboardInterrupt):
                ckpt.finalize(run, step, {})
            monkeypatch.setattr(checkpoint_io.os, "replace", real)
        else:
            ckpt.finalize(run, step, {})
    assert ckpt.latest_checkpoint(run).name == "10"
    ckpt.load_head_shard(SphereFace2Head(D, K), None, ckpt.latest_checkpoint(run))
    # a half-written file inside a tmp folder is equally ignored, and pruned by the next save
    (ckpt.tmp_dir(run, 30)).mkdir()
    (ckpt.tmp_dir(run, 30) / "head_rank0.pt.part").write_bytes(b"\x00" * 10)
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["10"]
    ckpt.prune(run, keep=3)
    assert not any(p.name.startswith(".tmp") for p in (run / "checkpoints").iterdir())


def _rchar() -> int:
    """Bytes this process has read through read() and friends (page-cache hits included)."""
    with open("/proc/self/io") as f:
        return int(next(ln for ln in f if ln.startswith("rchar:")).split()[1])


KB, DB = 40_000, 64  # 2 ranks: 20,000 x 64 fp32 rows + momentum = 10.2 MB per head_rank<r>.pt


def _save_big_fn(rank, world, folder):
    head = PartialFCHead(DB, KB, seed=3)
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    loss = head(torch.randn(B, DB), torch.randint(0, KB, (B,)))
    loss.backward()
    opt.step()
    _save_head_shard(head, opt, Path(folder), rank)
    return head.weight.detach().clone(), opt.state[head.weight]["momentum_buffer"].clone()


def _load_big_fn(rank, world, folder, mmap):
    head = PartialFCHead(DB, KB, seed=4)
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    r0 = _rchar()
    if mmap:  # the trainer's resume path
        ckpt.load_head_shard(head, opt, Path(folder))
    else:  # the same shards read with a plain torch.load
        files = ckpt._head_files(Path(folder))
        head.load_resharded((checkpoint_io.safe_load(f) for f in files), opt)
    read = _rchar() - r0
    return read, head.weight.detach().clone(), opt.state[head.weight]["momentum_buffer"].clone()


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs /proc/self/io (Linux)")
def test_resume_maps_shards_and_reads_only_its_rows(tmp_path):
    """load_head_shard maps the saved shards: on a same-world resume each rank reads its own rows
    (pages of one file), not every rank's whole file (2 x 10 MB here); the rows are bit-identical."""
    saved = spawn_gloo(_save_big_fn, 2, args=(str(tmp_path),))
    size = sum(f.stat().st_size for f in tmp_path.glob("head_rank*.pt"))
    assert size > 20e6
    mapped = spawn_gloo(_load_big_fn, 2, args=(str(tmp_path), True))
    read = spawn_gloo(_load_big_fn, 2, args=(str(tmp_path), False))
    for r in range(2):
        assert torch.equal(mapped[r][1], saved[r][0]) and torch.equal(mapped[r][2], saved[r][1])
        assert torch.equal(read[r][1], saved[r][0])
        assert read[r][0] >= size  # plain torch.load reads both files whole on every rank
        assert mapped[r][0] < 0.1 * size, mapped[r][0]  # mapped: only the pickles and zip directories
