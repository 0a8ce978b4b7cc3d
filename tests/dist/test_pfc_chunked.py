"""Partial FC's chunked path (online max / sum-exp, recompute in the backward) == the dense reference.

Chunk sizes 1, a non-divisor of the shard and one larger than the shard, on W = 1..4 gloo ranks
(uneven K, an empty shard), every margin / gradient mode; the insightface golden vectors at
W = 2 and 3; the comm pattern (1 all-gather, 1 reduce-scatter, 3 all-reduces of [W*B]).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_heads_sharded import B_LOCAL, D, dense, make_batch  # the dense tests' batches and reference

from fr_dist import comm
from fr_dist.heads import PartialFCHead
from fr_dist.testing import spawn_gloo

pytestmark = pytest.mark.dist

CASES = [
    dict(margin="arcface", grad="straight_through", m2=0.5),
    dict(margin="arcface", grad="exact", m2=0.5),
    dict(margin="cosface", grad="straight_through", m2=0.0, m3=0.35),
    dict(margin="combined", grad="exact", m1=1.1, m2=0.3, m3=0.1),
]
CHUNKS = [None, 1, 4, 1000]  # dense, 1, a non-divisor of n_local (37 / W), larger than n_local


def _rank_fn(rank, world, Ks):
    torch.set_default_dtype(torch.float64)
    out = []
    for K in Ks:
        x_all, y_all, W = make_batch(world, K, seed=K)
        sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        for case in CASES:
            for chunk in CHUNKS:
                head = PartialFCHead(D, K, s=30.0, chunk_size=chunk, **case).double()
                head.load_full_weight(W)
                x = x_all[sl].clone().requires_grad_(True)
                comm.reset_comm_stats()
                loss = head(x, y_all[sl])
                loss.backward()
                out.append(
                    dict(K=K, case=case, chunk=chunk, loss=loss.detach(), dx=x.grad, dW=head.weight.grad,
                         n=head.num_local, stats=comm.comm_stats())
                )  # fmt: skip
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_chunked_equals_dense_reference(world):
    Ks = [37, 3] if world == 4 else [37]  # K=3 on 4 ranks: rank 3 owns zero classes
    torch.set_default_dtype(torch.float64)
    try:
        results = spawn_gloo(_rank_fn, world, args=(Ks,))
    finally:
        torch.set_default_dtype(torch.float32)
    for i in range(len(results[0])):
        per_rank = [results[r][i] for r in range(world)]
        r0 = per_rank[0]
        ref_loss, ref_dx, ref_dW, _ = dense("pfc", r0["case"], r0["K"], world)
        tag = f"{r0['case']} chunk={r0['chunk']} K={r0['K']} W={world}"
        for res in per_rank:
            torch.testing.assert_close(res["loss"], ref_loss, rtol=1e-10, atol=1e-12, msg=tag)
        dx = torch.cat([r["dx"] for r in per_rank])
        torch.testing.assert_close(dx, ref_dx, rtol=1e-9, atol=1e-12, msg=tag)
        dW = torch.cat([r["dW"] for r in per_rank])
        torch.testing.assert_close(dW, ref_dW, rtol=1e-9, atol=1e-12, msg=tag)
        if r0["K"] < world:
            assert per_rank[-1]["n"] == 0
        if world > 1:
            st, N = r0["stats"], world * B_LOCAL
            assert st["all_gather/embeddings"]["calls"] == 1 and st["reduce_scatter"]["calls"] == 1
            assert st["all_reduce"]["calls"] == 3, tag  # max, sum, target probability
            for name in ("softmax_max", "softmax_sum", "softmax_target"):
                assert st[f"all_reduce/{name}"]["bytes"] == N * 8, tag  # [W*B] float64


def _golden_rank(rank, world, x_all, y_all, W, margin, kw, chunks):
    torch.set_default_dtype(torch.float64)
    B = x_all.shape[0] // world
    out = []
    for chunk in chunks:
        head = PartialFCHead(W.shape[1], W.shape[0], margin=margin, embedding_grad_scale=world,
                             chunk_size=chunk, **kw).double()  # fmt: skip
        head.load_full_weight(W)
        x = x_all[rank * B : (rank + 1) * B].clone().requires_grad_(True)
        loss = head(x, y_all[rank * B : (rank + 1) * B])
        loss.backward()
        out.append(dict(loss=loss.detach(), dx=x.grad, dW=head.weight.grad))
    return out


PFC_KW = {
    "arcface": dict(s=64.0, m1=1.0, m2=0.5, m3=0.0),
    "cosface": dict(s=64.0, m1=1.0, m2=0.0, m3=0.4),
}


@pytest.mark.parametrize("world", [2, 3])
def test_chunked_reproduces_insightface_golden(golden_dir, world):
    d = np.load(golden_dir / "partial_fc_insightface.npz")
    x, y, W = (torch.tensor(d[k]) for k in (f"ws{world}_x", f"ws{world}_y", "W"))
    chunks = [1, 5, 10_000]
    for margin, kw in PFC_KW.items():
        res = spawn_gloo(_golden_rank, world, args=(x, y, W, margin, kw, chunks))
        pre = f"ws{world}_{margin}"
        for j, chunk in enumerate(chunks):
            tag = f"{margin} W={world} chunk={chunk}"
            for r in res:
                torch.testing.assert_close(r[j]["loss"], torch.tensor(d[f"{pre}_loss"]).reshape(()),
                                           rtol=1e-9, atol=1e-12, msg=tag)  # fmt: skip
            dx = torch.cat([r[j]["dx"] for r in res])
            torch.testing.assert_close(
                dx, torch.tensor(d[f"{pre}_dL_dx_raw"]), rtol=1e-9, atol=1e-12, msg=tag
            )
            dW = torch.cat([r[j]["dW"] for r in res])
            torch.testing.assert_close(dW, torch.tensor(d[f"{pre}_dL_dW"]), rtol=1e-9, atol=1e-12, msg=tag)


def test_chunked_equals_dense_single_process_bf16_and_sampling():
    """No process group: bf16 autocast GEMMs and Partial-FC sampling agree across paths."""
    torch.manual_seed(0)
    x = torch.randn(12, 16)
    y = torch.randint(0, 50, (12,))
    grads = {}
    for chunk in (None, 7):
        for amp in (False, True):
            head = PartialFCHead(16, 50, s=32.0, sample_rate=0.6, seed=4, chunk_size=chunk)
            xx = x.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = head(xx, y)
            loss.backward()
            assert loss.dtype == torch.float32 and xx.grad.dtype == torch.float32
            grads[(chunk, amp)] = (loss.detach(), xx.grad, head.weight.grad)
    for amp, tol in ((False, 1e-5), (True, 1e-2)):
        for a, b in zip(grads[(None, amp)], grads[(7, amp)]):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    for a, b in zip(grads[(None, False)], grads[(None, True)]):  # bf16 GEMMs vs fp32: 3 significant digits
        assert float((a - b).norm() / a.norm()) < 0.05


def test_chunk_size_validated():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size"):
            PartialFCHead(4, 10, chunk_size=bad)


def test_clip_rows_only_touch_entries_outside_the_unit_interval():
    from fr_dist.heads.softmax import SoftmaxLoss, _cos_block, _logit_grad_

    x = torch.eye(3, 4, dtype=torch.float64)  # [3, 4] unit rows
    w = torch.eye(5, 4, dtype=torch.float64)  # [5, 4] unit rows: cos = 1 on the diagonal
    inv = torch.full((5,), 1.0 + 1e-12, dtype=torch.float64)  # push the diagonal just above 1
    cos, over = _cos_block(x, w, inv, torch.float64, SoftmaxLoss())
    assert cos.max() == 1.0 and over is not None
    rows, mask = over
    assert rows.tolist() == [0, 1, 2] and mask.sum() == 3 and bool(mask[0, 0] & mask[1, 1] & mask[2, 2])
    e = torch.ones(3, 5, dtype=torch.float64)
    none = torch.zeros(0, dtype=torch.long)
    g = _logit_grad_(e, torch.ones(3, dtype=torch.float64), none, none, 0.0, None, torch.ones(5), over)
    assert g.diagonal().abs().sum() == 0 and g.sum() == 15 - 3  # only the clipped entries are zeroed
