"""Fused SphereFace2 on W = 1..4 gloo ranks: == dense for several chunk sizes, fused update == torch.optim
on one process, unchanged communication, and a 2 -> 3 rank re-shard with the fused update on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from reference import assemble, sphereface2_loss

from fr_dist import comm
from fr_dist.heads import SphereFace2Head
from fr_dist.heads.row_optim import RowOptimizer
from fr_dist.testing import spawn_gloo
from fr_dist.train import checkpoint as ckpt

pytestmark = pytest.mark.dist
B, D = 4, 8
KW = dict(lam=0.7, r=30.0, m=0.5, t=3.0, lw=20.0)
CASES = [dict(margin="C", grad="exact"), dict(margin="A", grad="detached"), dict(margin="M", grad="exact")]


def _save_head_shard(head, opt, folder, rank):
    """What a checkpoint writes for the head of ``rank`` (train/checkpoint.py HeadShards)."""
    ckpt.atomic_save(
        ckpt.HeadShards(head, opt).save_files(folder, rank)[f"head_rank{rank}.pt"],
        Path(folder) / f"head_rank{rank}.pt",
    )


def data(world, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(world * B, D, generator=g, dtype=torch.float64)  # [W*B, D]
    y = torch.randint(0, K, (world * B,), generator=g)
    W = torch.randn(K, D, generator=g, dtype=torch.float64)
    return x, y, W


def _rank(rank, world, K, chunks):
    torch.set_default_dtype(torch.float64)
    x, y, W = data(world, K)
    sl = slice(rank * B, (rank + 1) * B)
    out = []
    for case in CASES:
        for chunk in chunks:
            head = SphereFace2Head(D, K, chunk_size=chunk, **KW, **case).double()
            head.load_full_weight(W)
            xx = x[sl].clone().requires_grad_(True)
            comm.reset_comm_stats()
            loss = head(xx, y[sl])
            loss.backward()
            out.append(
                dict(
                    loss=loss.detach(),
                    dx=xx.grad,
                    dW=head.weight.grad,
                    db=head.bias.grad,
                    bias=head.bias.detach().clone(),
                    n=head.num_local,
                    stats=comm.comm_stats(),
                )
            )
    return out


@pytest.mark.parametrize("world,K", [(1, 37), (2, 37), (3, 37), (4, 3)])  # K=3 on 4 ranks: an empty shard
def test_fused_sharded_equals_dense(world, K):
    chunks = [1, 5, 0, 1000]  # 1, a non-divisor of the shard sizes, automatic, larger than n_local
    res = spawn_gloo(_rank, world, args=(K, chunks))
    x, y, W = data(world, K)
    i = 0
    for case in CASES:
        for chunk in chunks:
            per = [r[i] for r in res]
            i += 1
            xr = x.clone().requires_grad_(True)
            Wu = F.normalize(W, dim=1).requires_grad_(True)
            b = per[0]["bias"].clone().requires_grad_(True)
            ref = sphereface2_loss(xr, Wu, y, b, **KW, **case)
            ref.backward()
            tag = f"{case} chunk={chunk} W={world}"
            for p in per:
                torch.testing.assert_close(p["loss"], ref.detach(), rtol=1e-10, atol=1e-12, msg=tag)
                torch.testing.assert_close(p["db"], b.grad, rtol=1e-9, atol=1e-12, msg=tag)
            torch.testing.assert_close(
                torch.cat([p["dx"] for p in per]), xr.grad, rtol=1e-9, atol=1e-12, msg=tag
            )
            torch.testing.assert_close(
                torch.cat([p["dW"] for p in per]), Wu.grad, rtol=1e-9, atol=1e-12, msg=tag
            )
            if world > 1:
                st = per[0]["stats"]
                assert st["all_gather/embeddings"]["calls"] == 1 and st["reduce_scatter"]["calls"] == 1
                assert st["all_gather"]["calls"] == 2  # + the 3-int shape handshake
                assert st["all_reduce"]["calls"] == 2 and st["all_reduce"]["bytes"] <= 16  # loss, dL/db
    if K < world:
        assert res[0][0]["n"] > 0 and res[-1][0]["n"] == 0


OPT = dict(momentum=0.9, nesterov=True, weight_decay=5e-4)
K_U, GB = 23, 2 * B


def _fused_steps(rank, world, steps, folder=None, load=None, seed=0):
    """Fused-update head (+ SGD on the bias), ``steps`` steps; optional load before / save after."""
    torch.set_default_dtype(torch.float64)
    head = SphereFace2Head(D, K_U, fused_update=True, seed=5).double()
    head.row_optimizer = RowOptimizer(lr=0.2, **OPT)
    opt = torch.optim.SGD([head.bias], lr=0.2, momentum=0.9)
    if load:
        ckpt.load_head_shard(head, opt, Path(load))
    g = torch.Generator().manual_seed(seed)
    comm.reset_comm_stats()
    lb = GB // world  # local rows of the fixed global batch
    for _ in range(steps):
        x = torch.randn(GB, D, generator=g)
        y = torch.randint(0, K_U, (GB,), generator=g)
        loss = head(x[rank * lb : (rank + 1) * lb].requires_grad_(True), y[rank * lb : (rank + 1) * lb])
        opt.zero_grad()
        loss.backward()
        opt.step()
    stats = comm.comm_stats()
    if folder:
        _save_head_shard(head, opt, Path(folder), rank)
    return dict(
        start=head.class_start,
        weight=head.weight.detach().clone(),
        mom=head.weight_momentum.clone(),
        bias=head.bias.detach().clone(),
        stats=stats,
    )


def test_fused_update_sharded_equals_single_process_and_reshards(tmp_path):
    """3 steps on 2 ranks == 3 steps on 1 process (same global batches); saved on 2 ranks and loaded on
    3, rows and momentum are bit-identical."""
    two = spawn_gloo(_fused_steps, 2, args=(3, str(tmp_path)))
    one = spawn_gloo(_fused_steps, 1, args=(3,))[0]
    # the single process sees the same global batch of 2 * B rows
    full_w = assemble([r["weight"] for r in two], [r["start"] for r in two], K_U)
    assert two[0]["stats"]["all_reduce"]["calls"] == 2 * 3 and two[0]["stats"]["reduce_scatter"]["calls"] == 3
    torch.testing.assert_close(full_w, one["weight"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(assemble([r["mom"] for r in two], [r["start"] for r in two], K_U), one["mom"])
    torch.testing.assert_close(two[0]["bias"], one["bias"], rtol=1e-12, atol=1e-14)
    three = spawn_gloo(_load_only, 3, args=(str(tmp_path),))
    torch.testing.assert_close(
        assemble([r["weight"] for r in three], [r["start"] for r in three], K_U), full_w, rtol=0, atol=0
    )
    full_m = assemble([r["mom"] for r in two], [r["start"] for r in two], K_U)
    torch.testing.assert_close(
        assemble([r["mom"] for r in three], [r["start"] for r in three], K_U), full_m, rtol=0, atol=0
    )
    assert torch.count_nonzero(full_m) > 0


def _load_only(rank, world, folder):
    return _fused_steps(rank, world, 0, load=folder)
