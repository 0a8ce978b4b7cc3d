"""The fused, chunked SphereFace2 path: exactness, fused optimizer update, bf16 proxies, negative sampling."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from reference import sphereface2_loss, sphereface2_target_slope, sphereface2_target_value

from fr_dist.heads import SphereFace2Head
from fr_dist.heads.binary import auto_chunk_size
from fr_dist.heads.row_optim import RowOptimizer
from fr_dist.heads.sampling import sample_negatives

D, K, N = 8, 37, 12
M_OF = {"C": 0.4, "A": 0.5, "M": 1.7}
CASES = [dict(margin=mg, grad=gr) for mg, gr in itertools.product("CAM", ["detached", "exact"])]


def kw(case):
    return dict(lam=0.7, r=30.0, m=M_OF[case["margin"]], t=3.0, lw=20.0, **case)


def batch(seed=0, k=K, n=N, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=dtype)
    y = torch.randint(0, k, (n,), generator=g)
    W = torch.randn(k, D, generator=g, dtype=dtype) * (0.5 + torch.rand(k, 1, generator=g, dtype=dtype))
    return x, y, W


def head_grads(head, x, y):
    xx = x.clone().requires_grad_(True)
    loss = head(xx, y)
    loss.backward()
    return loss.detach(), xx.grad, head.weight.grad, head.bias.grad


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['margin']}-{c['grad']}")
@pytest.mark.parametrize("chunk", [1, 7, 0, 1000])
def test_fused_equals_dense_reference(case, chunk):
    x, y, W = batch()
    head = SphereFace2Head(D, K, chunk_size=chunk, **kw(case)).double()
    head.load_full_weight(W)
    loss, dx, dW, db = head_grads(head, x, y)
    Wu = F.normalize(W, dim=1).requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    b = head.bias.detach().clone().requires_grad_(True)
    ref = sphereface2_loss(xr, Wu, y, b, **kw(case))
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dx, xr.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(dW, Wu.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(db, b.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        head.weight.detach(), Wu.detach(), rtol=1e-12, atol=1e-14
    )  # unit rows in place


@pytest.mark.parametrize("case", CASES[::2] + CASES[1::2], ids=str)
def test_fused_equals_cosine_block_path_fp32(case):
    x, y, W = batch(1, dtype=torch.float32)
    a = SphereFace2Head(D, K, **kw(case))
    b = SphereFace2Head(D, K, fused=False, **kw(case))
    for h in (a, b):
        h.load_full_weight(W)
    for ra, rb in zip(head_grads(a, x, y), head_grads(b, x, y)):
        torch.testing.assert_close(ra, rb, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("margin", "CAM")
def test_target_slope_matches_autograd(margin):
    c = torch.cat(
        [torch.linspace(-1.0, 1.0, 401, dtype=torch.float64), torch.tensor([0.99999999, -0.999999999])]
    )
    c = c.requires_grad_(True)
    g = sphereface2_target_value(c, torch.ones_like(c, dtype=torch.bool), margin, M_OF[margin], 3.0)
    (ref,) = torch.autograd.grad(g.sum(), c)
    torch.testing.assert_close(sphereface2_target_slope(c.detach(), margin, M_OF[margin], 3.0), ref)


def test_auto_chunk_size_budget():
    assert auto_chunk_size(128, 100_000, 512) == 1024  # 2 MB of [chunk, 512] fp32 rows
    assert auto_chunk_size(4096, 100_000, 512) == 64  # 1 MB of [4096, chunk] fp32
    assert auto_chunk_size(128, 5, 512) == 5
    # GPU: 64 MiB per [N, chunk] temporary (launch-bound loop otherwise), whole 64-column tiles
    assert auto_chunk_size(1024, 12_500_000, 512, device_type="cuda") == 16_384
    assert auto_chunk_size(8192, 12_500_000, 512, device_type="cuda") == 2048
    assert auto_chunk_size(3000, 12_500_000, 512, device_type="cuda") == 5568  # 5592 -> tiles of 64
    assert auto_chunk_size(1024, 1000, 512, device_type="cuda") == 1000


def test_no_grad_forward_equals_training_loss_and_skips_update():
    x, y, W = batch(2)
    head = SphereFace2Head(D, K, fused_update=True).double()
    head.row_optimizer = RowOptimizer(lr=0.5, momentum=0.9)
    head.load_full_weight(W)
    with torch.no_grad():
        l0 = head(x, y)
    w0 = head.weight.detach().clone()
    torch.testing.assert_close(w0, F.normalize(W, dim=1))
    assert torch.count_nonzero(head.weight_momentum) == 0
    head.eval()
    l1 = head(x.clone().requires_grad_(True), y)
    torch.testing.assert_close(head.weight.detach(), w0, rtol=0, atol=1e-15)  # re-normalised: 1 ulp
    torch.testing.assert_close(l0, l1.detach(), rtol=1e-14, atol=0)
    assert torch.count_nonzero(head.weight_momentum) == 0


# ----------------------------------------------------------------------------- fused update


def lr_at(step):
    return 0.3 * (0.5 if step >= 3 else 1.0) * min(1.0, (step + 1) / 2)  # warm-up then a step decay


@pytest.mark.parametrize(
    "opt_kw",
    [
        dict(momentum=0.9),
        dict(momentum=0.9, nesterov=True, weight_decay=5e-4),
        dict(momentum=0.0, weight_decay=1e-2),
    ],
    ids=["momentum", "nesterov_wd", "plain_wd"],
)
@pytest.mark.parametrize("chunk", [5, 0])
def test_fused_update_equals_torch_sgd(opt_kw, chunk):
    """Several steps with an LR schedule: identical rows, momentum, losses and dL/dx."""
    x, y, W = batch(3)
    ref = SphereFace2Head(D, K, chunk_size=chunk).double()
    fus = SphereFace2Head(D, K, chunk_size=chunk, fused_update=True).double()
    for h in (ref, fus):
        h.load_full_weight(W)
    assert not fus.weight.requires_grad
    opt = torch.optim.SGD([ref.weight], lr=lr_at(0), **opt_kw)
    fus.row_optimizer = RowOptimizer(lr=lr_at(0), **opt_kw)
    g = torch.Generator().manual_seed(0)
    for step in range(6):
        xs = torch.randn(N, D, generator=g, dtype=torch.float64)
        ys = torch.randint(0, K, (N,), generator=g)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        fus.row_optimizer.lr = lr_at(step)
        lr_, dx_r, _, _ = head_grads(ref, xs, ys)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lf, dx_f, dW_f, _ = head_grads(fus, xs, ys)
        assert dW_f is None  # the [n, D] gradient is never allocated
        torch.testing.assert_close(lf, lr_, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dx_f, dx_r, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(fus.weight.detach(), ref.weight.detach(), rtol=1e-10, atol=1e-12)
        if opt_kw["momentum"]:
            buf = opt.state[ref.weight]["momentum_buffer"]
            torch.testing.assert_close(fus.weight_momentum, buf, rtol=1e-10, atol=1e-12)


def test_fused_update_skipped_on_nonfinite_embeddings():
    head = SphereFace2Head(D, K, fused_update=True, check_finite=False)
    head.row_optimizer = RowOptimizer(lr=0.5, momentum=0.9)
    x, y, _ = batch(4, dtype=torch.float32)
    x[3, 1] = float("nan")
    with torch.no_grad():
        head.weight.copy_(F.normalize(head.weight, dim=1))
    w0 = head.weight.detach().clone()
    loss = head(x.requires_grad_(True), y)
    assert not torch.isfinite(loss)
    torch.testing.assert_close(head.weight.detach(), w0, rtol=0, atol=1e-6)  # only re-normalised
    assert torch.count_nonzero(head.weight_momentum) == 0


@pytest.mark.parametrize("master", [False, True])
def test_bf16_proxies_track_fp32(master):
    """bf16 rows + bf16 momentum (fp32 compute) stay within bf16 tolerance of the fp32 fused update."""
    k = 300
    ref = SphereFace2Head(64, k, fused_update=True, seed=1)
    b16 = SphereFace2Head(64, k, fused_update=True, proxy_dtype="bf16", master_weights=master, seed=1)
    assert b16.weight.dtype == torch.bfloat16 and b16.weight_momentum.dtype == torch.bfloat16
    for h in (ref, b16):
        h.row_optimizer = RowOptimizer(lr=0.2, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(32, 64, generator=g)
        y = torch.randint(0, k, (32,), generator=g)
        l32 = ref(x, y)
        l16 = b16(x, y)
        # bf16 has 8 mantissa bits: 2^-8 ~ 0.4 % per stored value
        torch.testing.assert_close(l16, l32, rtol=2e-2, atol=1e-3)
    w32 = F.normalize(ref.weight.detach(), dim=1)
    w16 = F.normalize(b16.weight.detach().float(), dim=1)
    assert (w16 - w32).abs().max() < 2e-2
    if master:
        assert b16.weight_master.dtype == torch.float32
        torch.testing.assert_close(b16.weight.detach(), b16.weight_master.to(torch.bfloat16), rtol=0, atol=0)
        torch.testing.assert_close(b16.weight_master, ref.weight.detach(), rtol=1e-2, atol=2e-3)


# ----------------------------------------------------------------------------- negative sampling


def test_sample_negatives_weights_and_positives():
    g = torch.Generator().manual_seed(0)
    target = torch.tensor([3, -1, 17, 3, -1, 40, 0])
    index, remapped, w = sample_negatives(target, 50, 10, g)
    assert index.numel() == 14 and torch.all(index[1:] > index[:-1])
    assert set([0, 3, 17, 40]) <= set(index.tolist())
    here = target >= 0
    assert torch.equal(index[remapped[here]], target[here])
    pos = torch.isin(index, torch.tensor([0, 3, 17, 40]))
    assert torch.all(w[pos] == 1.0) and torch.allclose(w[~pos], torch.full_like(w[~pos], 46 / 10))
    index, _, w = sample_negatives(target, 50, 1000, g)  # more than available: everything, weight 1
    assert index.tolist() == list(range(50)) and torch.all(w == 1.0)


def test_sampling_unsampled_rows_untouched_with_fused_update():
    head = SphereFace2Head(D, 100, fused_update=True, num_negatives=10, seed=2)
    head.row_optimizer = RowOptimizer(lr=0.5, momentum=0.9, weight_decay=1e-3)
    w0 = head.weight.detach().clone()
    x, y, _ = batch(5, k=100, dtype=torch.float32)
    head(x, y)
    changed = (head.weight.detach() != w0).any(dim=1)
    moved = (head.weight_momentum != 0).any(dim=1)
    assert torch.equal(changed, moved)
    assert set(y.tolist()) <= set(changed.nonzero().reshape(-1).tolist())
    assert int(changed.sum()) == len(set(y.tolist())) + 10


def test_sampling_zero_grad_on_unsampled_rows():
    head = SphereFace2Head(D, 100, sample_rate=0.2, seed=2)
    x, y, _ = batch(6, k=100, dtype=torch.float32)
    head(x, y).backward()
    used = (head.weight.grad != 0).any(dim=1)
    assert int(used.sum()) == len(set(y.tolist())) + 20


def test_sampled_gradient_is_unbiased():
    """Mean over 4000 draws of the sampled loss / dL/dx / dL/dW / dL/db -> the full ones.

    Each draw keeps 5 of ~32 negatives per step; the Monte-Carlo error of the mean shrinks as
    1/sqrt(draws): we require the error to be < 4 standard errors (elementwise, estimated from
    the draws) plus 1e-9, and the relative error of the mean gradient to be < 3 %.
    """
    x, y, W = batch(7, k=40, n=6)
    full = SphereFace2Head(D, 40, lam=0.6, r=8.0, m=0.2, lw=1.0).double()
    full.load_full_weight(W)
    ref = head_grads(full, x, y)
    head = SphereFace2Head(D, 40, lam=0.6, r=8.0, m=0.2, lw=1.0, num_negatives=5, seed=3).double()
    draws = []
    for _ in range(4000):
        head.load_full_weight(W)
        head.zero_grad(set_to_none=True)
        loss, dx, dW, db = head_grads(head, x, y)
        draws.append(torch.cat([loss.reshape(1), dx.reshape(-1), dW.reshape(-1), db.reshape(-1)]))
    draws = torch.stack(draws)  # [draws, P]
    mean, se = draws.mean(0), draws.std(0) / draws.shape[0] ** 0.5
    target = torch.cat([ref[0].reshape(1), ref[1].reshape(-1), ref[2].reshape(-1), ref[3].reshape(-1)])
    assert torch.all((mean - target).abs() <= 4 * se + 1e-9), float(
        ((mean - target).abs() / (se + 1e-12)).max()
    )
    assert float((mean - target).norm() / target.norm()) < 0.03


def test_bad_fused_options():
    with pytest.raises(ValueError, match="proxy_dtype"):
        SphereFace2Head(4, 5, proxy_dtype="fp16", fused_update=True)
    with pytest.raises(ValueError, match="need fused_update"):
        SphereFace2Head(4, 5, proxy_dtype="bf16")
    with pytest.raises(ValueError, match="chunk_size"):
        SphereFace2Head(4, 5, chunk_size=-1)
    with pytest.raises(ValueError, match="sample_rate"):
        SphereFace2Head(4, 5, sample_rate=0.0)
    with pytest.raises(ValueError, match="not both"):
        SphereFace2Head(4, 5, sample_rate=0.5, num_negatives=3)
