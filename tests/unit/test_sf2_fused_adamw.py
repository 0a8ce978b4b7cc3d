"""AdamW inside the fused SphereFace2 pass: == torch.optim.AdamW (fp32), bf16 storage, lazy sampling,
chunk-sized temporaries (the trainer and re-sharding: tests/dist/test_sf2_fused_adamw_dist.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import FusedPlan, sphereface2_fused_partial_loss

from fr_dist.heads import SphereFace2Head
from fr_dist.heads.row_optim import RowAdamW, RowOptimizer

D, K, N = 16, 45, 12
BETAS = (0.8, 0.95)  # non-default, so a wrong source of betas shows


def lr_at(step):
    return 0.02 * (0.5 if step >= 4 else 1.0) * min(1.0, (step + 1) / 3)  # warm-up then a step decay


def wd_at(step):
    return (0.05, 0.0, 0.2, 0.01, 0.1, 0.3, 0.0)[step % 7]


def draw(g, k=K, dtype=torch.float32):
    return torch.randn(N, D, generator=g, dtype=dtype), torch.randint(0, k, (N,), generator=g)


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _run_equivalence(chunk, steps=6, dtype=torch.float32):
    """Fused AdamW vs torch.optim.AdamW on a head that computes dL/dW_used (same in-place re-projection)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(K, D, generator=g, dtype=dtype) * (0.5 + torch.rand(K, 1, generator=g, dtype=dtype))
    ref = SphereFace2Head(D, K, chunk_size=chunk).to(dtype)
    fus = SphereFace2Head(D, K, chunk_size=chunk, fused_update=True).to(dtype)
    for h in (ref, fus):
        h.load_full_weight(W)
    opt = torch.optim.AdamW([ref.weight], lr=lr_at(0), betas=BETAS, eps=1e-8, weight_decay=wd_at(0))
    fus.row_optimizer = RowAdamW(lr=lr_at(0), betas=BETAS, eps=1e-8, weight_decay=wd_at(0))
    assert fus.weight_exp_avg_sq.dtype == dtype and fus.weight_step.dtype == torch.int32
    errs = dict(weight=0.0, exp_avg=0.0, exp_avg_sq=0.0, dx=0.0)
    for step in range(steps):
        x, y = draw(g, dtype=dtype)
        for grp in opt.param_groups:
            grp["lr"], grp["weight_decay"] = lr_at(step), wd_at(step)
        fus.row_optimizer.lr, fus.row_optimizer.weight_decay = lr_at(step), wd_at(step)
        xr, xf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        lr_ = ref(xr, y)
        lr_.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        lf = fus(xf, y)
        lf.backward()
        assert fus.weight.grad is None  # the [n, D] gradient is never allocated
        st = opt.state[ref.weight]
        torch.testing.assert_close(lf, lr_, rtol=1e-6 if dtype == torch.float32 else 1e-13, atol=0)
        for key, a, b in (
            ("weight", fus.weight.detach(), ref.weight.detach()),
            ("exp_avg", fus.weight_momentum, st["exp_avg"]),
            ("exp_avg_sq", fus.weight_exp_avg_sq, st["exp_avg_sq"]),
            ("dx", xf.grad, xr.grad),
        ):
            errs[key] = max(errs[key], rel_err(a, b))
        assert torch.all(fus.weight_step == int(st["step"])) and int(st["step"]) == step + 1
    return errs


@pytest.mark.parametrize("chunk", [7, 0])
def test_fused_adamw_equals_torch_adamw_fp32(chunk):
    """6 steps, changing LR and weight decay: rows, exp_avg, exp_avg_sq (and step) == torch.optim.AdamW."""
    errs = _run_equivalence(chunk)
    assert all(e < 1e-6 for e in errs.values()), errs


def test_fused_adamw_equals_torch_adamw_fp64():
    errs = _run_equivalence(5, steps=5, dtype=torch.float64)
    assert all(e < 1e-13 for e in errs.values()), errs


def test_fused_adamw_lr_zero_is_a_no_op_step():
    """lr = 0 (a warm-up's first step): rows stay the re-projected ones, the moments still move."""
    head = SphereFace2Head(D, K, fused_update=True, seed=3)
    head.row_optimizer = RowAdamW(lr=0.0, weight_decay=0.1)
    unit = F.normalize(head.weight.detach(), dim=1)
    head(*draw(torch.Generator().manual_seed(1)))
    assert torch.isfinite(head.weight).all()
    torch.testing.assert_close(head.weight.detach(), unit, rtol=0, atol=1e-7)
    assert torch.count_nonzero(head.weight_exp_avg_sq) > 0 and torch.all(head.weight_step == 1)


@pytest.mark.parametrize("master", [False, True])
def test_fused_adamw_bf16_storage_tracks_fp32(master):
    """bf16 rows + bf16 moments (fp32 update math on the chunk) stay within bf16 tolerance of fp32."""
    k = 300
    ref = SphereFace2Head(64, k, fused_update=True, seed=1)
    b16 = SphereFace2Head(64, k, fused_update=True, proxy_dtype="bf16", master_weights=master, seed=1)
    for h in (ref, b16):
        h.row_optimizer = RowAdamW(lr=1e-2, betas=BETAS, weight_decay=0.05)
    assert b16.weight.dtype == torch.bfloat16
    assert b16.weight_momentum.dtype == b16.weight_exp_avg_sq.dtype == torch.bfloat16
    assert ref.weight_exp_avg_sq.dtype == torch.float32
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(32, 64, generator=g)
        y = torch.randint(0, k, (32,), generator=g)
        torch.testing.assert_close(b16(x, y), ref(x, y), rtol=2e-2, atol=1e-3)
    # measured (5 steps, lr 1e-2): rows 0.6 % (master: 0.16 %), moments 0.5-0.6 % (master: 0.25 %)
    # relative Frobenius error; single elements can differ by up to ~2 lr per step where a tiny
    # gradient flips sign (Adam's update is sign-like), so no elementwise bound tighter than that
    w32 = F.normalize(ref.weight.detach(), dim=1)
    w16 = F.normalize(b16.weight.detach().float(), dim=1)
    assert rel_err(w16, w32) < (5e-3 if master else 2e-2)
    assert (w16 - w32).abs().max() < 5 * 2 * 1e-2
    assert rel_err(b16.weight_momentum, ref.weight_momentum) < 2e-2
    assert rel_err(b16.weight_exp_avg_sq, ref.weight_exp_avg_sq) < 2e-2
    assert torch.equal(b16.weight_step, ref.weight_step)
    if master:
        torch.testing.assert_close(b16.weight.detach(), b16.weight_master.to(torch.bfloat16), rtol=0, atol=0)
        assert rel_err(b16.weight_master, ref.weight.detach()) < 5e-3


def test_fused_adamw_sampling_is_lazy_per_row_adamw():
    """Negative sampling: each row == torch.optim.AdamW stepped only on the steps that used it (per-row
    bias-correction count); rows not used keep their values, moments and count."""
    k, steps = 60, 5
    fus = SphereFace2Head(D, k, fused_update=True, num_negatives=6, seed=2)
    ref = SphereFace2Head(D, k, num_negatives=6, seed=2)  # same seed and rank: same negatives drawn
    ref.load_full_weight(fus.weight.detach())
    fus.row_optimizer = RowAdamW(lr=0.05, betas=BETAS, weight_decay=0.1)
    rows = [torch.nn.Parameter(ref.weight.detach()[j].clone()) for j in range(k)]  # one AdamW per row
    opts = [torch.optim.AdamW([p], lr=0.05, betas=BETAS, weight_decay=0.1) for p in rows]
    g = torch.Generator().manual_seed(4)
    used_count = torch.zeros(k, dtype=torch.int32)
    for _ in range(steps):
        x, y = draw(g, k)
        before = (fus.weight.detach().clone(), fus.weight_momentum.clone(), fus.weight_exp_avg_sq.clone())
        step_before = fus.weight_step.clone()
        with torch.no_grad():
            ref.weight.copy_(torch.stack([p.detach() for p in rows]))
        ref.zero_grad(set_to_none=True)
        ref(x, y).backward()
        used = (ref.weight.grad != 0).any(dim=1)  # [k]: the sampled rows (positives + negatives)
        assert int(used.sum()) < k
        for j in used.nonzero().reshape(-1).tolist():
            with torch.no_grad():
                rows[j].copy_(ref.weight.detach()[j])  # the re-projected (unit) row the step used
            rows[j].grad = ref.weight.grad[j].clone()
            opts[j].step()
        used_count += used.to(torch.int32)
        fus(x, y)
        assert torch.equal(fus.weight_step - step_before, used.to(torch.int32))
        for b, a in zip(before, (fus.weight.detach(), fus.weight_momentum, fus.weight_exp_avg_sq)):
            assert torch.equal(a[~used], b[~used])  # bit-identical: not even re-projected
    assert torch.equal(fus.weight_step, used_count) and used_count.min() < used_count.max()
    ref_w = torch.stack([p.detach() for p in rows])
    ref_m = torch.stack([o.state[p]["exp_avg"] if o.state else torch.zeros(D) for o, p in zip(opts, rows)])
    ref_v = torch.stack([o.state[p]["exp_avg_sq"] if o.state else torch.zeros(D) for o, p in zip(opts, rows)])
    seen = used_count > 0
    assert rel_err(fus.weight.detach()[seen], ref_w[seen]) < 1e-6
    assert rel_err(fus.weight_momentum, ref_m) < 1e-6 and rel_err(fus.weight_exp_avg_sq, ref_v) < 1e-6


def test_fused_adamw_skipped_on_nonfinite_embeddings():
    head = SphereFace2Head(D, K, fused_update=True, check_finite=False)
    head.row_optimizer = RowAdamW(lr=0.5)
    x, y = draw(torch.Generator().manual_seed(5))
    x[3, 1] = float("nan")
    head(x, y)
    assert torch.count_nonzero(head.weight_exp_avg_sq) == 0 and torch.count_nonzero(head.weight_step) == 0


def test_row_optimizer_switch_registers_and_drops_adam_state():
    head = SphereFace2Head(D, K, fused_update=True)
    assert not hasattr(head, "weight_exp_avg_sq")
    head.row_optimizer = RowAdamW()
    names = {n for n, _ in head.named_buffers()}
    assert {"weight_momentum", "weight_exp_avg_sq", "weight_step"} <= names
    assert head.weight_step.shape == (head.num_local,)
    head.row_optimizer = RowOptimizer(momentum=0.9)
    assert {n for n, _ in head.named_buffers()} == {"weight_momentum"}
    with pytest.raises(ValueError, match="fused_update"):
        SphereFace2Head(D, K).row_optimizer = RowAdamW()
    with pytest.raises(ValueError, match="betas"):
        RowAdamW(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="exp_avg_sq"):  # a plan without the AdamW state
        plan = FusedPlan(0.7, 30.0, 0.4, 3.0, 20.0, "C", "detached", N, optimizer=RowAdamW(), do_update=True)
        plan.momentum = torch.zeros(K, D)
        x = F.normalize(torch.randn(N, D), dim=1)
        sphereface2_fused_partial_loss(x, torch.randn(K, D), torch.zeros(1), torch.full((N,), -1), plan)


def test_fused_adamw_temporaries_are_chunk_sized():
    """No [n, D] allocation per step: every tensor an op allocates in a fused AdamW training forward
    (bf16 storage, i.e. fp32 chunk copies of rows and both moments) is at most chunk-sized."""
    from torch.utils._python_dispatch import TorchDispatchMode

    k, chunk = 4000, 64
    head = SphereFace2Head(D, k, chunk_size=chunk, fused_update=True, proxy_dtype="bf16")
    head.row_optimizer = RowAdamW(lr=1e-3)
    x, y = draw(torch.Generator().manual_seed(6), k)
    sizes = []

    class NewStorage(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            flat = [a for a in list(args) + list((kwargs or {}).values()) if isinstance(a, torch.Tensor)]
            seen = {a.untyped_storage().data_ptr() for a in flat}
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                    sizes.append(t.untyped_storage().nbytes())
            return out

    before = {n: b.clone() for n, b in head.named_buffers()}
    with NewStorage():
        head(x, y)
    assert not torch.equal(before["weight_exp_avg_sq"], head.weight_exp_avg_sq)  # the update ran
    chunk_bytes = 4 * max(N * chunk, chunk * D, N * D)  # fp32 [N, chunk] / [chunk, D] / [N, D]
    assert sizes and max(sizes) <= chunk_bytes < 2 * k * D // 10, (max(sizes), chunk_bytes)


def test_adamw_state_round_trips_and_sgd_checkpoint_starts_adamw_afresh():
    x, y = draw(torch.Generator().manual_seed(7))
    src = SphereFace2Head(D, K, fused_update=True, proxy_dtype="bf16", seed=1)
    src.row_optimizer = RowAdamW(lr=1e-2)
    src(x, y)
    dst = SphereFace2Head(D, K, fused_update=True, proxy_dtype="bf16", seed=9)
    dst.row_optimizer = RowAdamW(lr=1e-2)
    assert dst.load_resharded([src.shard_state()]) >= {"weight_exp_avg_sq", "weight_step"}
    for n in ("weight", "weight_momentum", "weight_exp_avg_sq", "weight_step"):
        assert torch.equal(getattr(dst, n), getattr(src, n)), n
    sgd = SphereFace2Head(D, K, fused_update=True, proxy_dtype="bf16", seed=1)
    sgd.row_optimizer = RowOptimizer(lr=0.1, momentum=0.9)
    sgd(x, y)
    assert torch.count_nonzero(sgd.weight_momentum) > 0
    with pytest.warns(UserWarning, match="no fused AdamW state"):
        dst.load_resharded([sgd.shard_state()])
    assert torch.equal(dst.weight, sgd.weight)
    for n in ("weight_momentum", "weight_exp_avg_sq", "weight_step"):
        assert torch.count_nonzero(getattr(dst, n)) == 0, n
