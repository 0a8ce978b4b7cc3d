"""Fused AdamW SphereFace2 update on gloo ranks: 2 ranks == 1 process, a 2 -> 3 rank re-shard of rows,
both moments and the per-row step count continues as the uninterrupted run, and the trainer runs
train.optimizer=adamw with head.sphereface2.fused_update=true like the unfused head."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from reference import assemble

from fr_dist.heads import SphereFace2Head
from fr_dist.heads.row_optim import RowAdamW
from fr_dist.testing import spawn_gloo
from fr_dist.train import checkpoint as ckpt

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from test_trainer import _overrides, _train  # noqa: E402

pytestmark = pytest.mark.dist
B, D, K, GB = 4, 8, 23, 12  # local batch (2 ranks), dim, classes, global batch (divisible by 1, 2, 3)
ADAMW = dict(lr=0.02, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.05)
STATE = ("weight", "weight_momentum", "weight_exp_avg_sq", "weight_step")


def _steps(rank, world, first, last, folder=None, load=None):
    """Global steps [first, last) of a fused-AdamW head (+ torch AdamW on the bias), fp64; the batch of
    step s is drawn from seed s (so a resumed run sees the same batches); optional load / save."""
    torch.set_default_dtype(torch.float64)
    head = SphereFace2Head(D, K, fused_update=True, seed=5).double()
    head.row_optimizer = RowAdamW(**ADAMW)
    opt = torch.optim.AdamW([head.bias], **ADAMW)
    if load:
        ckpt.load_head_shard(head, opt, Path(load))
    loaded = {n: getattr(head, n).detach().clone() for n in STATE}
    lb = GB // world
    for s in range(first, last):
        g = torch.Generator().manual_seed(100 + s)
        x = torch.randn(GB, D, generator=g)
        y = torch.randint(0, K, (GB,), generator=g)
        head.row_optimizer.lr = ADAMW["lr"] * (1.0 - 0.1 * s)  # an LR schedule
        loss = head(x[rank * lb : (rank + 1) * lb].requires_grad_(True), y[rank * lb : (rank + 1) * lb])
        opt.zero_grad()
        loss.backward()
        opt.step()
    if folder:
        files = ckpt.HeadShards(head, opt).save_files(folder, rank)
        ckpt.atomic_save(files[f"head_rank{rank}.pt"], Path(folder) / f"head_rank{rank}.pt")
    out = {n: getattr(head, n).detach().clone() for n in STATE}
    return dict(start=head.class_start, loaded=loaded, bias=head.bias.detach().clone(), **out)


def _full(res, key="weight", sub=None):
    return assemble([(r[sub] if sub else r)[key] for r in res], [r["start"] for r in res], K)


def test_fused_adamw_two_ranks_equal_one_and_reshard_2_to_3_continues(tmp_path):
    two = spawn_gloo(_steps, 2, args=(0, 3, str(tmp_path)))  # 3 steps on 2 ranks, saved
    one = spawn_gloo(_steps, 1, args=(0, 5))[0]  # 5 steps on 1 process, uninterrupted
    three = spawn_gloo(_steps, 3, args=(3, 5, None, str(tmp_path)))  # loaded on 3 ranks, 2 more steps
    for n in STATE:  # the re-shard itself is exact
        torch.testing.assert_close(_full(three, n, "loaded"), _full(two, n), rtol=0, atol=0, msg=n)
    assert torch.all(_full(two, "weight_step") == 3) and torch.all(_full(three, "weight_step") == 5)
    for n in STATE:
        torch.testing.assert_close(_full(three, n), one[n], rtol=1e-12, atol=1e-15, msg=n)
    torch.testing.assert_close(three[0]["bias"], one["bias"], rtol=1e-12, atol=1e-15)


def test_trainer_adamw_fused_update_equals_unfused(tmp_path):
    """train.optimizer=adamw + head.sphereface2.fused_update=true: 4 CPU steps on 1 rank equal (losses,
    head rows, backbone) the same run with the unfused head under torch.optim.AdamW."""
    from fr_dist.data import make_synthetic_dataset

    make_synthetic_dataset(
        tmp_path / "syn",
        num_identities=24,
        images_per_identity=4,
        heldout_identities=10,
        heldout_pairs=20,
        seed=5,
    )
    res = {}
    for fused in (True, False):
        ov = _overrides(
            tmp_path / "syn",
            tmp_path / f"run_{fused}",
            **{
                "train.optimizer": "adamw",
                "train.lr": 0.01,
                "train.betas": "[0.8,0.95]",
                "train.weight_decay": 0.05,
                "train.warmup_steps": 2,
                "train.max_steps": 4,
                "data.batch_size": 8,
                "head.sphereface2.fused_update": fused,
                "head.sphereface2.proxy_dtype": "fp32",  # both runs on fp32 rows
            },
        )
        res[fused] = spawn_gloo(_train, 1, args=(ov,), timeout_s=300)[0]
    losses = torch.tensor([m["loss"] for m in res[True]["metrics"]])
    assert losses.numel() == 4 and torch.isfinite(losses).all()
    ref = torch.tensor([m["loss"] for m in res[False]["metrics"]])
    torch.testing.assert_close(losses, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res[True]["head"], res[False]["head"], rtol=1e-5, atol=1e-6)
    for k, v in res[False]["backbone"].items():
        torch.testing.assert_close(res[True]["backbone"][k], v, rtol=1e-4, atol=1e-6, msg=k)
