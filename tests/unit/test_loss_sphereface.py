"""SphereFace (OpenSphere's A-Softmax) on the softmax family: registry / config, hyper-parameter validation, the
margin psi, the detached (straight-through) margin and clamp, the rows re-projected in place, chunked == dense
(float64, W = 1 and 2) with the family's three [N] all-reduces only, the official vectors on the chunked path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from loss_cases import rows_and_labels, run_batches

from fr_dist.errors import ConfigError
from fr_dist.heads import create_head
from fr_dist.heads.losses.sphereface import SphereFace, SphereFaceHead, SphereFaceMargin
from fr_dist.testing import spawn_gloo
from fr_dist.train.config_load import load_config

B, D, K = 6, 8, 23


def _batch(world: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    W, y = rows_and_labels(world, B, K, D, g)
    x = 1.5 * F.normalize(W, dim=1)[y] + torch.randn(world * B, D, generator=g, dtype=torch.float64)
    x[1] = -3.0 * F.normalize(W, dim=1)[y[1]]  # nearly antipodal: k = 1
    x[2] = 2.0 * F.normalize(W, dim=1)[y[2]]  # exactly on its centre: beyond the 1 - 1e-5 clamp
    return x, y, W


def _run(head, batches, rank=0, world=1):
    return run_batches(head, batches, B, rank, world)


def _reference(x, y, W, s, m, detached=True):
    """OpenSphere's formula written out (independent of fr_dist's pass): (loss, dL/dx, dL/dW_used);
    ``detached=False``: the gradient through psi instead (what the official code does NOT do)."""
    x = x.clone().requires_grad_(True)
    w = F.normalize(W, dim=1).requires_grad_(True)
    cos = F.normalize(x, dim=1) @ w.t()  # [N, K]
    with torch.set_grad_enabled(not detached):
        theta = torch.acos(cos.clamp(-1 + 1e-5, 1 - 1e-5))
        on = torch.zeros_like(cos, dtype=torch.bool)
        on[torch.arange(len(y)), y] = True
        mt = torch.where(on, theta * m, theta)
        k = (mt / math.pi).floor()
        phi = (1 - 2 * (k % 2)) * torch.cos(mt) - 2 * k
        d_theta = phi - cos  # detached in OpenSphere (computed under no_grad)
    loss = F.cross_entropy(s * (cos + d_theta) if detached else s * phi, y)
    loss.backward()
    return loss.detach(), x.grad, w.grad


def test_registry_config_and_validation():
    cfg = load_config(
        "configs/demo_cpu.yaml",
        ["head.name=sphereface", "head.sphereface.m=1.35", "head.sphereface.s=20", "head.sphereface.chunk_size=7"],
        check_paths=False,
    )  # fmt: skip
    head = create_head(cfg.head.name, embedding_size=D, num_classes=K, **cfg.head.head_kwargs())
    assert isinstance(head, SphereFaceHead) and isinstance(head.loss, SphereFace)
    assert (head.loss.m, head.loss.s, head.chunk_size) == (1.35, 20.0, 7)
    assert (SphereFace().s, SphereFace().m) == (30.0, 1.7)  # OpenSphere's SphereFace defaults
    loss = head.loss
    assert (loss.project_rows, loss.clip_detached, loss.cos_clip, loss.target_has_slope) == (
        True,
        True,
        1e-5,
        False,
    )
    assert loss.ce_floor == 0.0 and loss.extra_collectives == () and loss.state() == {}  # fmt: skip
    for bad, key in (
        ("m=0.5", "head.sphereface.m"),
        ("s=0", "head.sphereface.s"),
        ("s=-1", "head.sphereface.s"),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config("configs/demo_cpu.yaml", ["head.name=sphereface", f"head.sphereface.{bad}"], check_paths=False)  # fmt: skip
    for kw, msg in ((dict(m=0.9), "margin m"), (dict(s=0.0), "scale s"), (dict(m=float("inf")), "finite")):
        with pytest.raises(ValueError, match=msg):
            SphereFace(**kw)
    with pytest.raises(TypeError, match="unexpected keyword"):
        SphereFaceHead(D, K, h=0.3)  # fmt: skip


def test_psi_values_branches_and_monotone(f64):
    mg = SphereFaceMargin(1.7)
    theta = torch.linspace(0.0, math.pi, 2001)
    psi = mg.value(torch.cos(theta))
    k = torch.floor(1.7 * theta / math.pi)
    want = torch.where(k == 0, torch.cos(1.7 * theta), -torch.cos(1.7 * theta) - 2.0)
    torch.testing.assert_close(psi, want, rtol=0, atol=1e-12)
    assert bool((k == 1).any()) and bool((k == 0).any())
    assert bool((psi[1:] <= psi[:-1] + 1e-12).all())  # monotonically decreasing: continuous at m theta = pi
    assert abs(float(mg.value(torch.tensor(1.0))) - 1.0) < 1e-12
    assert float(SphereFaceMargin(1.0).value(torch.tensor(0.3))) == pytest.approx(0.3, abs=1e-12)


def test_straight_through_clamp_and_rows_reprojected(f64):
    x, y, W = _batch(1, seed=3)
    head = SphereFaceHead(D, K, s=30.0, m=1.7).double()
    head.load_full_weight(W)
    assert not torch.allclose(head.weight.norm(dim=1), torch.ones(K))
    loss = head(x.clone().requires_grad_(True), y)
    torch.testing.assert_close(head.weight.norm(dim=1), torch.ones(K), rtol=0, atol=1e-14)  # in place
    head.zero_grad(set_to_none=True)
    xr = x.clone().requires_grad_(True)
    loss = head(xr, y)
    loss.backward()
    want_loss, want_dx, want_dw = _reference(x, y, W, 30.0, 1.7)
    torch.testing.assert_close(loss.detach(), want_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(xr.grad, want_dx, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(
        head.weight.grad, want_dw, rtol=1e-10, atol=1e-13
    )  # dL/dW_used, no radial term
    # the clamped row (2, exactly on its centre) keeps a nonzero gradient: the clamp is detached
    assert float(xr.grad[2].abs().sum()) > 0
    # straight-through: the gradient through psi (not OpenSphere's) is far from it
    _, exact_dx, _ = _reference(x, y, W, 30.0, 1.7, detached=False)
    assert float((exact_dx - xr.grad).abs().max()) > 1e-3


def test_chunked_equals_dense_and_sampling_single_process(f64):
    batches = [_batch(1, seed=s)[:2] for s in (5, 6)]
    W = _batch(1, seed=5)[2]
    runs = {}
    for chunk in (None, 1, 4, 1000):
        head = SphereFaceHead(D, K, chunk_size=chunk).double()
        head.load_full_weight(W)
        runs[chunk] = _run(head, batches)
    for chunk in (1, 4, 1000):
        for a, b in zip(runs[None], runs[chunk]):
            for k in ("loss", "dx", "dW"):
                torch.testing.assert_close(b[k], a[k], rtol=1e-10, atol=1e-12, msg=f"chunk={chunk} {k}")
    head = SphereFaceHead(D, K, sample_rate=0.5).double()  # Partial-FC sampling: unsampled rows get 0
    head.load_full_weight(W)
    out = _run(head, batches[:1])[0]
    unused = torch.ones(K, dtype=torch.bool)
    unused[head.weight_index] = False
    assert bool(unused.any()) and torch.equal(out["dW"][unused], torch.zeros(int(unused.sum()), D))


def _rank_w2(rank, world):
    torch.set_default_dtype(torch.float64)
    x0, y0, W = _batch(world, seed=8)
    x1, y1, _ = _batch(world, seed=9)
    out = {}
    for chunk in (None, 5):
        head = SphereFaceHead(D, K, chunk_size=chunk).double()
        head.load_full_weight(W)
        out[chunk] = _run(head, [(x0, y0), (x1, y1)], rank, world)
    return out


@pytest.mark.dist
def test_chunked_equals_dense_two_ranks_and_the_three_all_reduces(f64):
    res = spawn_gloo(_rank_w2, 2)
    x0, y0, W = _batch(2, seed=8)
    x1, y1, _ = _batch(2, seed=9)
    single = SphereFaceHead(D, K).double()
    single.load_full_weight(W)
    ref = run_batches(single, [(x0, y0), (x1, y1)], 2 * B)  # the global batch on one process
    for chunk in (None, 5):
        for t in range(2):
            tag = f"chunk={chunk} batch {t}"
            for r in range(2):
                torch.testing.assert_close(res[r][chunk][t]["loss"], ref[t]["loss"], rtol=1e-10, atol=1e-12, msg=tag)  # fmt: skip
            dx = torch.cat([res[r][chunk][t]["dx"] for r in range(2)])
            torch.testing.assert_close(dx, ref[t]["dx"], rtol=1e-10, atol=1e-12, msg=tag)
            dW = torch.cat([res[r][chunk][t]["dW"] for r in range(2)])
            torch.testing.assert_close(dW, ref[t]["dW"], rtol=1e-10, atol=1e-12, msg=tag)
            st = res[0][chunk][t]["stats"]
            assert st["all_reduce"]["calls"] == 3, tag  # max, sum, target: nothing more
            for name in ("softmax_max", "softmax_sum", "softmax_target"):
                assert (
                    st[f"all_reduce/{name}"]["calls"] == 1 and st[f"all_reduce/{name}"]["bytes"] == 2 * B * 8
                ), tag
