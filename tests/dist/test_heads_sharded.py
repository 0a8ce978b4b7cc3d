"""Sharded heads on W = 1..4 gloo ranks == the dense single-process reference (loss and every gradient)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from reference import margin_softmax_loss, sphereface2_loss

from fr_dist import comm
from fr_dist.heads import PartialFCHead, SphereFace2Head, sphereface2_bias_init
from fr_dist.testing import spawn_gloo

pytestmark = pytest.mark.dist

B_LOCAL, D = 5, 8
SF2_CASES = [dict(margin=mg, grad=gr) for mg, gr in itertools.product("CAM", ["detached", "exact"])]
PFC_CASES = [
    dict(margin="arcface", grad="straight_through", m2=0.5),
    dict(margin="arcface", grad="exact", m2=0.5),
    dict(margin="cosface", grad="straight_through", m2=0.0, m3=0.35),
    dict(margin="combined", grad="straight_through", m1=1.1, m2=0.3, m3=0.1),
    dict(margin="combined", grad="exact", m1=1.1, m2=0.3, m3=0.1),
]
SF2_M = {"C": 0.4, "A": 0.5, "M": 1.7}


def make_batch(world, K, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(world * B_LOCAL, D, generator=g, dtype=torch.float64)  # [W*B, D]
    y = torch.randint(0, K, (world * B_LOCAL,), generator=g)
    y[0], y[-1] = 0, K - 1
    W = torch.randn(K, D, generator=g, dtype=torch.float64) * (
        0.5 + torch.rand(K, 1, generator=g, dtype=torch.float64)
    )
    return x, y, W


def sf2_kwargs(case):
    return dict(lam=0.7, r=30.0, m=SF2_M[case["margin"]], t=3.0, lw=20.0, **case)


def _rank_fn(rank, world, Ks):
    torch.set_default_dtype(torch.float64)
    out = []
    for K in Ks:
        x_all, y_all, W = make_batch(world, K, seed=K)
        sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        cases = [("sf2", c) for c in SF2_CASES] + [("pfc", c) for c in PFC_CASES]
        for kind, case in cases:
            if kind == "sf2":
                head = SphereFace2Head(D, K, **sf2_kwargs(case)).double()
            else:
                head = PartialFCHead(D, K, s=30.0, **case).double()
            head.load_full_weight(W)
            x = x_all[sl].clone().requires_grad_(True)
            comm.reset_comm_stats()
            loss = head(x, y_all[sl])
            loss.backward()
            stats = comm.comm_stats()
            out.append(
                dict(
                    K=K,
                    kind=kind,
                    case=case,
                    loss=loss.detach(),
                    dx=x.grad,
                    dW=head.weight.grad,
                    db=head.bias.grad if kind == "sf2" else None,
                    bias=head.bias.detach().clone() if kind == "sf2" else None,
                    start=head.class_start,
                    n=head.num_local,
                    stats=stats,
                )
            )
    return out


def dense(kind, case, K, world, bias=None):
    x_all, y_all, W = make_batch(world, K, seed=K)
    x = x_all.clone().requires_grad_(True)
    if kind == "sf2":
        Wu = F.normalize(W, dim=1).requires_grad_(True)
        kw = sf2_kwargs(case)
        b0 = sphereface2_bias_init(K, kw["lam"], kw["r"], kw["m"], kw["t"], kw["margin"])
        # the head keeps b in float32 until .double(): use its value
        torch.testing.assert_close(float(bias), b0, rtol=1e-6, atol=1e-6)
        b = bias.clone().requires_grad_(True)
        loss = sphereface2_loss(x, Wu, y_all, b, **kw)
        loss.backward()
        return loss.detach(), x.grad, Wu.grad, b.grad
    Wr = W.clone().requires_grad_(True)
    loss = margin_softmax_loss(x, Wr, y_all, s=30.0, **case)
    loss.backward()
    return loss.detach(), x.grad, Wr.grad, None


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sharded_heads_equal_dense(world):
    Ks = [37, 3] if world == 4 else [37]  # K=3 on 4 ranks: rank 3 owns zero classes
    torch.set_default_dtype(torch.float64)
    try:
        results = spawn_gloo(_rank_fn, world, args=(Ks,))
    finally:
        torch.set_default_dtype(torch.float32)
    ncase = len(results[0])
    for i in range(ncase):
        per_rank = [results[r][i] for r in range(world)]
        r0 = per_rank[0]
        ref_loss, ref_dx, ref_dW, ref_db = dense(r0["kind"], r0["case"], r0["K"], world, r0["bias"])
        tag = f"{r0['kind']} {r0['case']} K={r0['K']} W={world}"
        for res in per_rank:
            torch.testing.assert_close(res["loss"], ref_loss, rtol=1e-10, atol=1e-12, msg=tag)
        torch.testing.assert_close(
            torch.cat([r["dx"] for r in per_rank]), ref_dx, rtol=1e-9, atol=1e-12, msg=tag
        )
        dW = torch.cat([r["dW"] if r["dW"] is not None else torch.zeros(0, D) for r in per_rank])
        torch.testing.assert_close(dW, ref_dW, rtol=1e-9, atol=1e-12, msg=tag)
        if ref_db is not None:
            for res in per_rank:
                torch.testing.assert_close(res["db"], ref_db, rtol=1e-9, atol=1e-12, msg=tag)
        if r0["K"] < world:
            assert per_rank[-1]["n"] == 0
        if world > 1:
            check_comm_pattern(r0, world)


def check_comm_pattern(res, world):
    st, N = res["stats"], world * B_LOCAL
    # one packed embeddings+labels gather (plus the 3-int shape handshake), one reduce-scatter
    assert st["all_gather/embeddings"]["calls"] == 1
    assert st["all_gather/meta"]["calls"] == 1 and st["all_gather/meta"]["bytes"] == world * 3 * 8
    assert st["all_gather"]["calls"] == 2
    assert st["reduce_scatter"]["calls"] == 1
    assert st["reduce_scatter"]["bytes"] == N * D * 8
    assert st["all_gather/embeddings"]["bytes"] == N * (D + 1) * 8  # float64: labels take 1 column
    if res["kind"] == "sf2":
        assert st["all_reduce"]["calls"] == 2  # loss value, bias gradient
        assert st["all_reduce"]["bytes"] <= 2 * 8  # at most 2 elements in all
    else:
        assert st["all_reduce"]["calls"] == 3  # max, sum, target probability
        for name in ("softmax_max", "softmax_sum", "softmax_target"):
            assert st[f"all_reduce/{name}"]["bytes"] == N * 8  # B-length vectors
