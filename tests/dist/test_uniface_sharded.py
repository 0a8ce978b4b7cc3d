"""UniFace on W = 2 gloo ranks (uneven shards) == one process: the fused in-pass update on the raw rows (SGD
with momentum, nesterov, weight decay; 3 steps: rows, momentum, bias), bf16 proxies with master weights,
negative sampling (each rank's draw reweighted by 1/p == the official formula with those weights), the
Triton kernel (interpreter) and the block path; communication: the packed gather, the reduce-scatter and two
scalar all-reduces (loss, dL/db), no [N]-length one. The official vectors on W = 1..4:
tests/dist/test_official_losses.py."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from reference import assemble

from fr_dist import comm
from fr_dist.heads.losses.uniface import UniFaceHead
from fr_dist.heads.row_optim import RowOptimizer
from fr_dist.heads.sampling import sample_negatives
from fr_dist.testing import spawn_gloo

pytestmark = pytest.mark.dist
B, D, K, WORLD = 5, 12, 23, 2  # 23 classes on 2 ranks: 12 + 11
OPT = dict(momentum=0.9, nesterov=True, weight_decay=5e-4)
STEPS = 3
HP = dict(m=0.4, s=16.0, l=0.7)


def ref_grads(x, W, y, b, m, s, l, col_weight=None):  # noqa: E741
    """The official forward (CVI-SZU/UniFace head.py) on the global batch with plain autograd ops, the
    negatives' term optionally weighted per class (col_weight [K]: fr_dist's 1/p, 0 = not sampled);
    returns (loss, dL/dx, dL/dW, dL/db). Same as tests/unit/test_loss_uniface.py's reference."""
    x, W = x.clone().requires_grad_(True), W.clone().requires_grad_(True)
    b = torch.tensor(float(b), dtype=x.dtype, requires_grad=True)
    cos = F.linear(F.normalize(x, eps=1e-5), F.normalize(W, eps=1e-5))  # [N, K]
    p_loss = torch.log(1 + torch.exp(-(s * (cos - m) - b).clamp(min=-s, max=s)))
    n_loss = torch.log(1 + torch.exp((s * cos - b).clamp(min=-s, max=s))) * l
    n_loss = n_loss if col_weight is None else n_loss * col_weight
    one_hot = F.one_hot(y, W.shape[0]).bool()
    loss = (one_hot * p_loss + (~one_hot) * n_loss).sum(dim=1).mean()
    loss.backward()
    return loss.detach(), x.grad, W.grad, b.grad.reshape(1)


def _data(step, dtype=torch.float64):
    g = torch.Generator().manual_seed(100 + step)
    W = torch.randn(K, D, generator=g, dtype=dtype) * (0.3 + torch.rand(K, 1, generator=g, dtype=dtype))
    y = torch.randint(0, K, (WORLD * B,), generator=g)
    x = (W[y] + torch.randn(WORLD * B, D, generator=g, dtype=dtype)) * 2  # [W*B, D] global batch
    return x, y, W


def _train(head, rank, world, dtype):
    """STEPS fused-update steps on the fixed global batches; this rank's rows / momentum / bias after."""
    head.row_optimizer = RowOptimizer(lr=0.2, **OPT)
    opt = torch.optim.SGD([head.bias], lr=0.1, momentum=0.9)
    lb = WORLD * B // world
    for step in range(STEPS):
        x, y, _ = _data(step, dtype)
        loss = head(x[rank * lb : (rank + 1) * lb].requires_grad_(True), y[rank * lb : (rank + 1) * lb])
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = dict(start=head.class_start, weight=head.weight.detach().double().clone(), bias=head.bias.detach())
    out["mom"] = head.weight_momentum.double().clone()
    if hasattr(head, "weight_master"):
        out["master"] = head.weight_master.clone()
    return out


def _grads(head, rank, W):
    x, y, _ = _data(0)  # [W*B, D] float64 draws, cast like W
    x = x.to(W.dtype)
    head.load_full_weight(W)
    xx = x[rank * B : (rank + 1) * B].clone().requires_grad_(True)
    comm.reset_comm_stats()
    loss = head(xx, y[rank * B : (rank + 1) * B])
    loss.backward()
    return dict(
        loss=loss.detach(), dx=xx.grad, dW=head.weight.grad, db=head.bias.grad, stats=comm.comm_stats()
    )


def _rank(rank, world, triton):
    torch.set_default_dtype(torch.float64)
    _, y, W = _data(0)
    out = dict(
        fused64=_train(UniFaceHead(D, K, **HP, fused_update=True, chunk_size=4, seed=3).double(), rank, world, torch.float64),
        bf16=_train(UniFaceHead(D, K, **HP, fused_update=True, proxy_dtype="bf16", master_weights=True, seed=3), rank, world, torch.float32),
        block=_grads(UniFaceHead(D, K, **HP, fused=False).double(), rank, W),
    )  # fmt: skip
    # sampling: the draw this rank's head makes, replayed from a copy of its generator
    head = UniFaceHead(D, K, **HP, num_negatives=4, chunk_size=3, seed=9).double()
    g = torch.Generator()
    g.set_state(head.generator.get_state())
    index, _, cw = sample_negatives(head.local_targets(y), head.num_local, 4, g)  # [S], [S]
    out["sampled"] = dict(_grads(head, rank, W), classes=index + head.class_start, cw=cw)
    if triton:
        w32 = W.float()
        out["triton"] = _grads(UniFaceHead(D, K, **HP, chunk_size=4, kernel="triton").float(), rank, w32)
    return out


def test_uniface_sharded_equals_single_process(monkeypatch):
    triton = os.environ.get("TRITON_INTERPRET") == "1"
    try:
        import triton as _  # noqa: F401
    except ImportError:
        triton = False
    monkeypatch.setenv("TRITON_INTERPRET", "1" if triton else os.environ.get("TRITON_INTERPRET", "0"))
    res = spawn_gloo(_rank, WORLD, args=(triton,), timeout_s=300)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # as on the ranks (the init's draws follow the default dtype)
    try:
        _check(res, triton)
    finally:
        torch.set_default_dtype(old)


def _check(res, triton):
    starts = [r["fused64"]["start"] for r in res]
    assert starts == [0, 12]

    # fused update on the raw rows: W = 2 == one process (same global batches)
    one = _train(
        UniFaceHead(D, K, **HP, fused_update=True, chunk_size=4, seed=3).double(), 0, 1, torch.float64
    )
    for key in ("weight", "mom"):
        full = assemble([r["fused64"][key] for r in res], starts, K)
        torch.testing.assert_close(full, one[key], rtol=1e-10, atol=1e-12, msg=f"fused update {key}")
    torch.testing.assert_close(res[0]["fused64"]["bias"], one["bias"], rtol=1e-12, atol=1e-14)
    assert float((one["weight"].norm(dim=1) - 1).abs().max()) > 1e-3  # raw rows, never re-projected

    # bf16 proxies + fp32 master rows: the master rows follow the same update (fp32 compute)
    one16 = _train(UniFaceHead(D, K, **HP, fused_update=True, proxy_dtype="bf16", master_weights=True, seed=3), 0, 1, torch.float32)  # fmt: skip
    master = assemble([r["bf16"]["master"] for r in res], starts, K)
    torch.testing.assert_close(master, one16["master"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        assemble([r["bf16"]["weight"] for r in res], starts, K),
        master.to(torch.bfloat16).double(),
        rtol=0,
        atol=0,
    )

    # block path and sampling against the official formula on the global batch
    x, y, W = _data(0)
    ref = ref_grads(x, W, y, UniFaceHead(D, K).bias.item(), **HP)
    col_weight = torch.zeros(K, dtype=torch.float64)
    for r in res:
        col_weight[r["sampled"]["classes"]] = r["sampled"]["cw"]
    assert 0 < int((col_weight == 0).sum()) and float(col_weight.max()) > 1  # dropped and reweighted
    ref_s = ref_grads(x, W, y, UniFaceHead(D, K).bias.item(), col_weight=col_weight, **HP)
    runs = [("block", ref, 1e-10)] + [("sampled", ref_s, 1e-10)] + ([("triton", ref, 2e-4)] if triton else [])
    for name, want, tol in runs:
        per = [r[name] for r in res]
        for p in per:
            torch.testing.assert_close(p["loss"], want[0].to(p["loss"].dtype), rtol=tol, atol=tol, msg=name)
            torch.testing.assert_close(p["db"], want[3].to(p["db"].dtype), rtol=tol, atol=tol, msg=name)
        dx = torch.cat([p["dx"] for p in per])
        dW = assemble([p["dW"] for p in per], starts, K)
        torch.testing.assert_close(dx, want[1].to(dx.dtype), rtol=tol, atol=tol * 10, msg=f"{name} dx")
        torch.testing.assert_close(dW, want[2].to(dW.dtype), rtol=tol, atol=tol * 10, msg=f"{name} dW")
        st = per[0]["stats"]  # no [N]-length all-reduce: the loss value and dL/db only
        assert st["all_gather/embeddings"]["calls"] == 1 and st["reduce_scatter"]["calls"] == 1, name
        assert st["all_reduce"]["calls"] == 2 and st["all_reduce"]["bytes"] <= 16, (name, st["all_reduce"])
