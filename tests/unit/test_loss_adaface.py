"""AdaFace on the softmax family: registry / config, hyper-parameter validation, the state (initial values, EMA
updated before use with the unbiased std, training only), the detached norms, the target's derivative, the
non-target acos / clip / cos round trip being the identity, chunked == dense (float64, W = 1 and 2) with the
statistics over the global batch and the family's three [N] all-reduces only, the official vectors on the
chunked path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from loss_cases import rows_and_labels, run_batches

from fr_dist.errors import ConfigError
from fr_dist.heads import create_head
from fr_dist.heads.losses.adaface import AdaFace, AdaFaceHead, AdaFaceMargin
from fr_dist.testing import spawn_gloo
from fr_dist.train.config_load import load_config

B, D, K = 6, 8, 23
EPS = 1e-3


def _batch(world: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    W, y = rows_and_labels(world, B, K, D, g)
    x = 2.0 * F.normalize(W, dim=1)[y] + torch.randn(world * B, D, generator=g, dtype=torch.float64)
    x = x * torch.exp(
        torch.empty(world * B, 1, dtype=torch.float64).uniform_(-1.0, 4.5, generator=g)
    )  # norms
    x[1] = -1e-4 * F.normalize(W, dim=1)[y[1]]  # antipodal, tiny norm: below the 0.001 norm clip
    x[2] = 300.0 * F.normalize(W, dim=1)[y[2]]  # on its centre, above the 100 clip: cosine clamped
    return x, y, W


def _reference(x, y, W, m, h, s, mean, std):
    """AdaFace's head.py formula written out with the (already updated) statistics: (loss, dL/dx, dL/dW)."""
    x = x.clone().requires_grad_(True)
    W = W.clone().requires_grad_(True)
    norm = torch.norm(x, 2, 1, True)  # [N, 1]
    cos = (x / norm) @ (W / W.norm(dim=1, keepdim=True)).t()
    cos = cos.clamp(-1 + EPS, 1 - EPS)
    a = norm.clip(0.001, 100).detach()
    g = torch.clip((a - mean) / (std + EPS) * h, -1, 1)  # [N, 1]
    on = torch.zeros_like(cos)
    on.scatter_(1, y.reshape(-1, 1), 1.0)
    theta_m = torch.clip(cos.acos() + on * (m * g * -1), min=EPS, max=math.pi - EPS)
    logits = (theta_m.cos() - on * (m + m * g)) * s
    loss = F.cross_entropy(logits, y)
    loss.backward()
    return loss.detach(), x.grad, W.grad


def _run(head, batches, rank=0, world=1):
    return run_batches(head, batches, B, rank, world)


def test_registry_config_and_validation():
    over = ["head.name=adaface", "head.adaface.m=0.5", "head.adaface.h=0.2", "head.adaface.s=30",
            "head.adaface.t_alpha=0.1", "head.adaface.chunk_size=7"]  # fmt: skip
    cfg = load_config("configs/demo_cpu.yaml", over, check_paths=False)
    head = create_head(cfg.head.name, embedding_size=D, num_classes=K, **cfg.head.head_kwargs())
    assert isinstance(head, AdaFaceHead) and isinstance(head.loss, AdaFace)
    loss = head.loss
    assert (loss.m, loss.h, loss.s, loss.t_alpha, head.chunk_size) == (0.5, 0.2, 30.0, 0.1, 7)
    ref = AdaFace()  # the official training recipe: m 0.4, h 0.333, s 64, t_alpha 0.01 (config.py)
    assert (ref.m, ref.h, ref.s, ref.t_alpha) == (0.4, 0.333, 64.0, 0.01)
    assert (loss.cos_clip, loss.clip_detached, loss.project_rows, loss.target_has_slope) == (
        1e-3,
        False,
        False,
        True,
    )
    assert loss.ce_floor == 0.0 and loss.extra_collectives == () and loss.norms is None  # norms: detached  # fmt: skip
    for bad, key in (
        ("m=-0.1", "head.adaface.m"),
        ("m=3.2", "head.adaface.m"),
        ("h=-0.1", "head.adaface.h"),
        ("s=0", "head.adaface.s"),
        ("t_alpha=1.5", "head.adaface.t_alpha"),
        ("t_alpha=-0.1", "head.adaface.t_alpha"),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config("configs/demo_cpu.yaml", ["head.name=adaface", f"head.adaface.{bad}"], check_paths=False)  # fmt: skip
    for kw, msg in (
        (dict(m=-0.1), "margin m"),
        (dict(h=-1.0), "h="),
        (dict(s=0.0), "scale s"),
        (dict(t_alpha=2.0), "t_alpha"),
        (dict(h=float("nan")), "finite"),
    ):
        with pytest.raises(ValueError, match=msg):
            AdaFace(**kw)
    with pytest.raises(TypeError, match="unexpected keyword"):
        AdaFaceHead(D, K, l_a=10.0)  # fmt: skip


def test_state_ema_before_use_unbiased_std_eval_frozen(f64):
    x, y, W = _batch(1, seed=3)
    m, h, s, ta = 0.4, 0.333, 64.0, 0.3
    head = AdaFaceHead(D, K, m=m, h=h, s=s, t_alpha=ta).double()
    head.load_full_weight(W)
    assert set(head.state_buffers()) == {"batch_mean", "batch_std"}  # no unused `t`
    assert float(head.batch_mean) == 20.0 and float(head.batch_std) == 100.0 and head.batch_mean.shape == (1,)
    a = x.norm(dim=1).clamp(0.001, 100)
    assert float(x[1].norm()) < 0.001 and float(x[2].norm()) > 100  # both norm clips
    mean, std = 20.0, 100.0
    for _ in range(2):
        xr = x.clone().requires_grad_(True)
        loss = head(xr, y)
        loss.backward()
        mean = ta * a.mean() + (1 - ta) * mean  # BEFORE use
        std = ta * a.std(correction=1) + (1 - ta) * std
        torch.testing.assert_close(head.batch_mean, mean.reshape(1), rtol=1e-14, atol=0)
        torch.testing.assert_close(head.batch_std, std.reshape(1), rtol=1e-14, atol=0)
        want = _reference(x, y, W, m, h, s, mean, std)
        torch.testing.assert_close(loss.detach(), want[0], rtol=1e-12, atol=0)
        torch.testing.assert_close(xr.grad, want[1], rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(head.weight.grad, want[2], rtol=1e-10, atol=1e-13)
        # the norms are detached: dL/dx_i is orthogonal to x_i (the loss sees x only through x / |x|)
        torch.testing.assert_close((xr.grad * x).sum(dim=1), torch.zeros(B), rtol=0, atol=1e-12)
        head.zero_grad(set_to_none=True)
    assert head.log_scalars() == {"adaface_batch_mean": float(mean), "adaface_batch_std": float(std)}
    head.eval()  # eval = validation: the stored statistics are used and kept
    loss = head(x * 3.0, y)
    torch.testing.assert_close(head.batch_mean, mean.reshape(1), rtol=0, atol=0)
    torch.testing.assert_close(head.batch_std, std.reshape(1), rtol=0, atol=0)
    torch.testing.assert_close(loss, _reference(x * 3.0, y, W, m, h, s, mean, std)[0], rtol=1e-12, atol=0)
    head.train()
    with pytest.raises(ValueError, match=">= 2"):
        head(x[:1], y[:1])  # one row: no unbiased std


def test_target_derivative_and_clips(f64):
    mg = AdaFaceMargin(0.4)
    c = torch.linspace(-1 + EPS, 1 - EPS, 401).repeat(3)
    g = torch.cat([torch.full((401,), v) for v in (-1.0, 0.3, 1.0)])
    value, slope = mg.target(c, g)
    cr = c.clone().requires_grad_(True)
    want = torch.clip(cr.acos() - 0.4 * g, EPS, math.pi - EPS).cos() - (0.4 + 0.4 * g)
    (auto,) = torch.autograd.grad(want.sum(), cr)
    torch.testing.assert_close(value, want.detach(), rtol=0, atol=1e-15)
    torch.testing.assert_close(slope, auto, rtol=1e-10, atol=1e-12)
    assert int((slope == 0).sum()) > 0  # both angle clips bind somewhere on the grid ...
    angle = c.acos() - 0.4 * g
    assert bool((angle < EPS).any()) and bool((angle > math.pi - EPS).any())
    assert bool((slope[(angle < EPS) | (angle > math.pi - EPS)] == 0).all())  # ... with zero gradient


def test_non_target_round_trip_is_the_identity(f64):
    """AdaFace passes every non-target cosine through acos, the angle clip and cos: with the cosines clamped to
    +-(1 - 1e-3) the angle clip at 1e-3 never binds, so it is c in value and 1 in gradient, up to rounding."""
    c = torch.linspace(-1 + EPS, 1 - EPS, 20001, requires_grad=True)
    theta = c.acos()
    assert float(theta.detach().min()) > 40 * EPS and float(theta.detach().max()) < math.pi - 40 * EPS
    out = torch.clip(theta, min=EPS, max=math.pi - EPS).cos()
    (grad,) = torch.autograd.grad(out.sum(), c)
    torch.testing.assert_close(out.detach(), c.detach(), rtol=0, atol=1e-15)
    torch.testing.assert_close(grad, torch.ones_like(grad), rtol=0, atol=1e-12)


def test_chunked_equals_dense_single_process(f64):
    batches = [_batch(1, seed=s)[:2] for s in (5, 6)]
    W = _batch(1, seed=5)[2]
    runs = {}
    for chunk in (None, 1, 4, 1000):
        head = AdaFaceHead(D, K, t_alpha=0.5, chunk_size=chunk).double()
        head.load_full_weight(W)
        runs[chunk] = _run(head, batches)
    for chunk in (1, 4, 1000):
        for a, b in zip(runs[None], runs[chunk]):
            for k in ("loss", "dx", "dW", "batch_mean", "batch_std"):
                torch.testing.assert_close(b[k], a[k], rtol=1e-10, atol=1e-12, msg=f"chunk={chunk} {k}")
    assert not torch.equal(runs[None][0]["batch_mean"], runs[None][1]["batch_mean"])  # the statistics evolve


def _rank_w2(rank, world):
    torch.set_default_dtype(torch.float64)
    x0, y0, W = _batch(world, seed=8)
    x1, y1, _ = _batch(world, seed=9)
    out = {}
    for chunk in (None, 5):
        head = AdaFaceHead(D, K, t_alpha=0.5, chunk_size=chunk).double()
        head.load_full_weight(W)
        out[chunk] = _run(head, [(x0, y0), (x1, y1)], rank, world)
    return out


@pytest.mark.dist
def test_global_batch_statistics_two_ranks_chunked_and_the_three_all_reduces(f64):
    res = spawn_gloo(_rank_w2, 2)
    x0, y0, W = _batch(2, seed=8)
    x1, y1, _ = _batch(2, seed=9)
    single = AdaFaceHead(D, K, t_alpha=0.5).double()  # the global batch on one process
    single.load_full_weight(W)
    ref = run_batches(single, [(x0, y0), (x1, y1)], 2 * B)
    # per-rank statistics (AdaFace's DDP trainer) would differ from the global ones
    assert (
        float((x0[:B].norm(dim=1).clamp(0.001, 100).mean() - x0.norm(dim=1).clamp(0.001, 100).mean()).abs())
        > 1e-3
    )
    for chunk in (None, 5):
        for t in range(2):
            tag = f"chunk={chunk} batch {t}"
            for r in range(2):
                for k in ("loss", "batch_mean", "batch_std"):
                    torch.testing.assert_close(
                        res[r][chunk][t][k], ref[t][k], rtol=1e-12, atol=1e-12, msg=tag
                    )
            dx = torch.cat([res[r][chunk][t]["dx"] for r in range(2)])
            torch.testing.assert_close(dx, ref[t]["dx"], rtol=1e-10, atol=1e-12, msg=tag)
            dW = torch.cat([res[r][chunk][t]["dW"] for r in range(2)])
            torch.testing.assert_close(dW, ref[t]["dW"], rtol=1e-10, atol=1e-12, msg=tag)
            st = res[0][chunk][t]["stats"]
            assert st["all_reduce"]["calls"] == 3, tag  # max, sum, target: the norms need nothing more
            for name in ("softmax_max", "softmax_sum", "softmax_target"):
                assert (
                    st[f"all_reduce/{name}"]["calls"] == 1 and st[f"all_reduce/{name}"]["bytes"] == 2 * B * 8
                ), tag
