"""MagFace on the softmax family: registry / config, hyper-parameter validation, no state, the norm-dependent
margin's gradient and the regulariser (value from the global batch, gradient counted once, no collective),
chunked == dense (float64, W = 1 and 2), the official vectors on the chunked path and with easy_margin=False."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from loss_cases import rows_and_labels, run_batches

from fr_dist.errors import ConfigError
from fr_dist.heads import create_head
from fr_dist.heads.losses.magface import MagFace, MagFaceHead
from fr_dist.testing import spawn_gloo
from fr_dist.train.config_load import load_config

B, D, K = 6, 8, 23
HP = dict(s=30.0, l_margin=0.45, u_margin=0.8, l_a=10.0, u_a=110.0, lambda_g=35.0)


def _batch(world: int, seed: int):
    """Raw embeddings with norms below l_a, inside and above u_a; targets at every angle."""
    g = torch.Generator().manual_seed(seed)
    W, y = rows_and_labels(world, B, K, D, g)
    d = F.normalize(
        1.5 * F.normalize(W, dim=1)[y] + torch.randn(world * B, D, generator=g, dtype=torch.float64), dim=1
    )
    d[1] = -F.normalize(W, dim=1)[y[1]] + 0.05 * d[1]  # nearly antipodal
    norms = torch.exp(
        torch.empty(world * B, dtype=torch.float64).uniform_(1.0, 5.5, generator=g)
    )  # 2.7 .. 245
    return d * norms[:, None], y, W


def _run(head, batches, rank=0, world=1):
    return run_batches(head, batches, B, rank, world)


def test_registry_config_and_validation():
    over = [
        "head.name=magface",
        "head.magface.lambda_g=30",
        "head.magface.u_a=100",
        "head.magface.easy_margin=false",
    ]
    cfg = load_config("configs/demo_cpu.yaml", over, check_paths=False)
    head = create_head(cfg.head.name, embedding_size=D, num_classes=K, **cfg.head.head_kwargs())
    assert isinstance(head, MagFaceHead) and isinstance(head.loss, MagFace)
    assert (head.loss.lambda_g, head.loss.u_a, head.loss.easy_margin, head.loss.s) == (
        30.0,
        100.0,
        False,
        64.0,
    )
    assert head.state_buffers() == {} and MagFace.extra_collectives == () and MagFace.all_targets is None
    bad = {
        "l_a=200": r"head\.magface\.l_a=200\.0 must be < head\.magface\.u_a",
        "l_margin=0.9": r"head\.magface\.l_margin=0\.9 must be <= head\.magface\.u_margin",
        "lambda_g=-1": r"head\.magface\.lambda_g",
        "s=0": r"head\.magface\.s",
        "l_a=0": r"head\.magface\.l_a",
    }
    for o, msg in bad.items():
        with pytest.raises(ConfigError, match=msg):
            load_config(
                "configs/demo_cpu.yaml", ["head.name=magface", f"head.magface.{o}"], check_paths=False
            )
    for kw, msg in (
        (dict(l_a=5.0, u_a=5.0), "0 < l_a < u_a"),
        (dict(l_margin=0.9), "l_margin <= u_margin"),
        (dict(s=-1.0), "scale s"),
        (dict(lambda_g=-0.1), "lambda_g"),
        (dict(u_a=float("inf")), "finite"),
        (dict(easy_margin=1), "easy_margin"),
    ):
        with pytest.raises(ValueError, match=msg):
            MagFace(**kw)


def test_regulariser_value_and_gradient():
    """L(lambda_g) - L(0) = lambda_g mean g(a), and its dL/dx = lambda_g g'(a) x / |x| / N inside [l_a, u_a],
    zero outside (the clamp)."""
    torch.set_default_dtype(torch.float64)
    try:
        x_all, y, W = _batch(1, seed=11)
        res = {}
        for lam in (0.0, HP["lambda_g"]):
            head = MagFaceHead(D, K, **dict(HP, lambda_g=lam)).double()
            head.load_full_weight(W)
            res[lam] = _run(head, [(x_all, y)])[0]
        a = x_all.norm(dim=1)
        ac = a.clamp(HP["l_a"], HP["u_a"])
        lam, u_a = HP["lambda_g"], HP["u_a"]
        g = ac / u_a**2 + 1 / ac
        torch.testing.assert_close(
            res[lam]["loss"] - res[0.0]["loss"], lam * g.mean(), rtol=1e-12, atol=1e-12
        )
        inside = (a >= HP["l_a"]) & (a <= HP["u_a"])
        assert inside.any() and (~inside).any()
        dg = torch.where(inside, 1 / u_a**2 - 1 / ac**2, torch.zeros_like(a))  # [B]
        want = lam * dg[:, None] * x_all / a[:, None] / B
        torch.testing.assert_close(res[lam]["dx"] - res[0.0]["dx"], want, rtol=1e-9, atol=1e-13)
        torch.testing.assert_close(res[lam]["dW"], res[0.0]["dW"], rtol=0, atol=0)
    finally:
        torch.set_default_dtype(torch.float32)


def test_margin_gradient_flows_through_the_norm():
    """dL/dx = the autograd of the same formula written densely (a = clamp(|x|) differentiable in the margin)."""
    torch.set_default_dtype(torch.float64)
    try:
        x_all, y, W = _batch(1, seed=12)
        for easy in (True, False):
            head = MagFaceHead(D, K, **dict(HP, lambda_g=0.0), easy_margin=easy).double()
            head.load_full_weight(W)
            got = _run(head, [(x_all, y)])[0]
            x = x_all.clone().requires_grad_(True)
            a = x.norm(dim=1).clamp(HP["l_a"], HP["u_a"])
            m = (HP["u_margin"] - HP["l_margin"]) / (HP["u_a"] - HP["l_a"]) * (a - HP["l_a"]) + HP["l_margin"]
            cos = (F.normalize(x, dim=1) @ F.normalize(W, dim=1).t()).clamp(-1, 1)
            c = cos[torch.arange(B), y]
            ctm = c * torch.cos(m) - torch.sqrt(1 - c**2) * torch.sin(m)
            other = c if easy else c - torch.sin(torch.pi - m) * m
            fin = torch.where(c > 0 if easy else c > torch.cos(torch.pi - m), ctm, other)
            logits = cos.scatter(1, y[:, None], fin[:, None])
            ref = F.cross_entropy(HP["s"] * logits, y)
            ref.backward()
            torch.testing.assert_close(got["loss"], ref.detach(), rtol=1e-12, atol=0)
            torch.testing.assert_close(got["dx"], x.grad, rtol=1e-9, atol=1e-13)
    finally:
        torch.set_default_dtype(torch.float32)


def test_chunked_equals_dense_single_process():
    torch.set_default_dtype(torch.float64)
    try:
        x0, y0, W = _batch(1, seed=5)
        x1, y1, _ = _batch(1, seed=6)
        for easy in (True, False):
            runs = {}
            for chunk in (None, 1, 4, 1000):
                head = MagFaceHead(D, K, **HP, easy_margin=easy, chunk_size=chunk).double()
                head.load_full_weight(W)
                runs[chunk] = _run(head, [(x0, y0), (x1, y1)])
            for chunk in (1, 4, 1000):
                for a, b in zip(runs[None], runs[chunk]):
                    for k in ("loss", "dx", "dW"):
                        torch.testing.assert_close(
                            b[k], a[k], rtol=1e-10, atol=1e-12, msg=f"{easy} {chunk} {k}"
                        )
    finally:
        torch.set_default_dtype(torch.float32)


def _rank_w2(rank, world):
    torch.set_default_dtype(torch.float64)
    x0, y0, W = _batch(world, seed=8)
    x1, y1, _ = _batch(world, seed=9)
    out = {}
    for chunk in (None, 1, 5):
        head = MagFaceHead(D, K, **HP, chunk_size=chunk).double()
        head.load_full_weight(W)
        out[chunk] = _run(head, [(x0, y0), (x1, y1)], rank, world)
    return out


@pytest.mark.dist
def test_chunked_equals_dense_two_ranks_no_extra_collective():
    torch.set_default_dtype(torch.float64)
    try:
        res = spawn_gloo(_rank_w2, 2)
        x0, y0, W = _batch(2, seed=8)
        x1, y1, _ = _batch(2, seed=9)
        single = MagFaceHead(D, K, **HP).double()  # the global batch on one process
        single.load_full_weight(W)
        ref = run_batches(single, [(x0, y0), (x1, y1)], 2 * B)  # the global batch on one process
    finally:
        torch.set_default_dtype(torch.float32)
    for chunk in (None, 1, 5):
        for t in range(2):
            tag = f"chunk={chunk} batch {t}"
            for r in range(2):
                torch.testing.assert_close(
                    res[r][chunk][t]["loss"], ref[t]["loss"], rtol=1e-10, atol=1e-12, msg=tag
                )
            dx = torch.cat([res[r][chunk][t]["dx"] for r in range(2)])  # regulariser + margin, counted once
            torch.testing.assert_close(dx, ref[t]["dx"], rtol=1e-10, atol=1e-12, msg=tag)
            dW = torch.cat([res[r][chunk][t]["dW"] for r in range(2)])
            torch.testing.assert_close(dW, ref[t]["dW"], rtol=1e-10, atol=1e-12, msg=tag)
            st = res[0][chunk][t]["stats"]
            names = {k for k in st if k.startswith("all_reduce/")}
            assert names == {
                "all_reduce/softmax_max",
                "all_reduce/softmax_sum",
                "all_reduce/softmax_target",
            }, tag
            assert st["all_reduce"]["calls"] == 3, tag  # no scalar all-reduce for the regulariser
