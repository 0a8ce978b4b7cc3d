"""UniFace (CVI-SZU/UniFace's unified cross-entropy) on the binary family, one process: the official vectors
on every path (fused chunks, the block path), the clamps' zero gradient (cosine AND bias) on the eager stage
and the Triton kernel, the differentiable row normalisation (dL/dW_raw, rows never re-projected), sampling
(reweighted, unlike the official partial_index), the in-pass update on the raw rows (SGD / AdamW, bf16
proxies, master weights), registry / config / validation. Sharded: tests/dist/test_uniface_sharded.py and
tests/dist/test_official_losses.py."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import asdict as dataclasses_asdict

import pytest
import torch
import torch.nn.functional as F
from official import load

from fr_dist.heads import create_head
from fr_dist.heads.binary import BinaryStages
from fr_dist.heads.losses.uniface import UniFace, UniFaceConfig, UniFaceHead, uniface_bias_init
from fr_dist.heads.row_optim import RowAdamW, RowOptimizer
from fr_dist.heads.sampling import num_sampled, sample_negatives
from fr_dist.train.config import ConfigError
from fr_dist.train.config_load import load_config

D, K, N = 12, 41, 16
HP = dict(m=0.4, s=16.0, l=0.7)


def uniface_reference(x, W, y, b, m=0.4, s=64.0, l=1.0, col_weight=None):  # noqa: E741
    """The official forward (head.py) written out with plain autograd ops, plus optional per-class weights
    [K] of the negatives' term (fr_dist's 1/p sampling weights; 0 = not sampled)."""
    cos = F.linear(F.normalize(x, eps=1e-5), F.normalize(W, eps=1e-5))  # [N, K]
    p_loss = torch.log(1 + torch.exp(-(s * (cos - m) - b).clamp(min=-s, max=s)))
    n_loss = torch.log(1 + torch.exp((s * cos - b).clamp(min=-s, max=s))) * l
    if col_weight is not None:
        n_loss = n_loss * col_weight
    one_hot = F.one_hot(y, W.shape[0]).bool()
    return (one_hot * p_loss + (~one_hot) * n_loss).sum(dim=1).mean()


def data(seed=0, k=K, n=N, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(k, D, generator=g, dtype=dtype) * (0.2 + 2 * torch.rand(k, 1, generator=g, dtype=dtype))
    y = torch.randint(0, k, (n,), generator=g)
    x = (W[y] * 2 + torch.randn(n, D, generator=g, dtype=dtype)) * 3  # near their classes, raw norms
    return x, y, W


def run(head, x, y):
    xx = x.clone().requires_grad_(True)
    loss = head(xx, y)
    loss.backward()
    return loss.detach(), xx.grad, head.weight.grad, head.bias.grad


def ref_grads(x, W, y, b, col_weight=None, **hp):
    xr, Wr = x.clone().requires_grad_(True), W.clone().requires_grad_(True)
    br = torch.tensor(float(b), dtype=x.dtype, requires_grad=True)
    loss = uniface_reference(xr, Wr, y, br, col_weight=col_weight, **hp)
    loss.backward()
    return loss.detach(), xr.grad, Wr.grad, br.grad.reshape(1)


def assert_all_close(got, want, rtol=1e-10, atol=1e-12, what=""):
    for name, a, b in zip(("loss", "dx", "dW", "db"), got, want):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=rtol, atol=atol, msg=f"{what} {name}")


# ----------------------------------------------------------------------------- the official vectors


def test_official_archive_exercises_every_clamp_and_initial_bias():
    arrays, meta = load("uniface")
    assert meta["hp"] == dict(m=0.4, s=64.0, l=1.0, r=1.0)  # the official defaults
    lows = sum(h["target_low"] + h["negative_low"] for h in meta["cases"]["k29"]["clamp_hits"])
    highs = [sum(h[k] for h in meta["cases"]["k3"]["clamp_hits"]) for k in ("target_high", "negative_high")]
    assert lows > 0 and min(highs) > 0
    for _case, c in meta["cases"].items():
        # the official module's own init (float32 there), log(K r 10) with the GLOBAL K
        assert UniFaceHead(D, c["K"]).bias.item() == pytest.approx(c["b_init"], rel=1e-6)
        assert UniFaceHead(D, c["K"], r=0.5).bias.item() == pytest.approx(math.log(c["K"] * 5.0), rel=1e-6)


# ----------------------------------------------------------------------------- clamps, rows, dense == fused


@pytest.mark.parametrize("b", [2.0, 14.0, -14.0])  # inside; low clamps; high clamps (s = 16)
@pytest.mark.parametrize("opts", [dict(chunk_size=3), dict(chunk_size=0), dict(fused=False)], ids=str)
def test_fused_equals_dense_reference(b, opts):
    x, y, W = data(1)
    head = UniFaceHead(D, K, **HP, **opts).double()
    head.load_full_weight(W)
    with torch.no_grad():
        head.bias.fill_(b)
    assert_all_close(run(head, x, y), ref_grads(x, W, y, b, **HP), what=f"b={b} {opts}")


def test_clamped_entries_pass_no_gradient_to_cosine_nor_bias():
    """The eager stage with the logit clip: outside [-s, s] the loss keeps the clamped value but dL/dz is 0,
    in u (dL/dcos) and in the bias sum; SphereFace2's cosine clip would still pass them to b."""
    s, b, B = 16.0, 14.0, 4
    loss = UniFace(m=0.4, s=s, l=1.0)
    co = loss.coefficients(b, B)
    cos = torch.tensor([[-0.99, -0.5, 0.0, 0.9]], dtype=torch.float64)  # z = s c - b: -29.8, -22, -14, 0.4
    inside = (s * cos - b).abs() <= s
    u, p, sp = cos.clone(), torch.empty_like(cos), torch.empty_like(cos)
    none = (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    z0 = torch.tensor(co.z0, dtype=torch.float64)
    l_n, gb = BinaryStages.negatives_(u, p, sp, none, None, co, z0, grads=True)
    z = (s * cos - b).clamp(-s, s)
    torch.testing.assert_close(l_n, (co.w_neg * F.softplus(z).sum()).double())  # clamped VALUES count
    q = torch.sigmoid(z) * inside
    torch.testing.assert_close(u, q)  # dL/dcos / alpha: zero outside
    torch.testing.assert_close(gb, (co.w_neg * q.sum()).double())  # and nothing to b from clamped ones
    assert inside.tolist() == [[False, False, True, True]] and float(u[0, 0]) == 0.0
    # target clamp: slope 0 outside [-s, s] (inclusive inside, as torch.clamp), also for d z / d b
    ct = torch.tensor([-0.5, 0.4 + (b - s) / s, 0.5], dtype=torch.float64)  # z_t: -36.4, -16 (edge), 1.6
    assert loss.target_slope(ct, b).tolist() == [0.0, 1.0, 1.0]
    dz = torch.ones(3, dtype=torch.float64)
    assert float(BinaryStages.target_bias_grad(dz, ct, loss, b)) == 2.0


def test_weight_grad_is_raw_and_rows_untouched():
    """dL/dW_raw of F.normalize: orthogonal to each row, scaled by 1 / |w|; the stored rows never change
    (no in-place re-projection, unlike SphereFace2), on the fused, sampled and block paths."""
    x, y, W = data(2)
    for opts in (dict(), dict(num_negatives=7, seed=1), dict(fused=False)):
        head = UniFaceHead(D, K, **HP, **opts).double()
        head.load_full_weight(W)
        _, _, dW, _ = run(head, x, y)
        assert torch.equal(head.weight.detach(), W), opts
        radial = (dW * W).sum(1) / (dW.norm(dim=1) * W.norm(dim=1)).clamp_min(1e-300)
        assert float(radial.abs().max()) < 1e-10, opts
    # a row below eps (1e-5): F.normalize divides by eps, no projection
    W2 = W.clone()
    W2[y[0]] = W2[y[0]] * 1e-7
    head = UniFaceHead(D, K, **HP, chunk_size=4).double()
    head.load_full_weight(W2)
    assert_all_close(run(head, x, y), ref_grads(x, W2, y, head.bias.item(), **HP), what="tiny row")


def test_sampling_reweights_negatives_by_inverse_probability():
    """fr_dist's sampling: the loss / gradients of the sampled step == the official formula with the
    unsampled negatives dropped and the sampled ones weighted M / k (the official partial_index drops
    without reweighting; both equal the full loss at sample_rate 1)."""
    x, y, W = data(3)
    for opts in (dict(num_negatives=9), dict(sample_rate=0.3, chunk_size=4)):
        head = UniFaceHead(D, K, **HP, seed=4, **opts).double()
        head.load_full_weight(W)
        g = torch.Generator()
        g.set_state(head.generator.get_state())  # the draw the head is about to make
        k = opts.get("num_negatives") or num_sampled(K, opts.get("sample_rate", 1.0))
        index, _, cw = sample_negatives(y, K, k, g)  # [S], [S]
        col_weight = torch.zeros(K, dtype=torch.float64).index_put_((index,), cw)  # [K]
        got = run(head, x, y)
        assert_all_close(
            got, ref_grads(x, W, y, head.bias.item(), col_weight=col_weight, **HP), what=str(opts)
        )
        assert int((got[2] != 0).any(1).sum()) == index.numel()  # unsampled rows: zero gradient


def test_no_grad_forward_equals_training_loss():
    x, y, W = data(4)
    head = UniFaceHead(D, K, **HP, fused_update=True, chunk_size=5).double()
    head.load_full_weight(W)
    head.row_optimizer = RowOptimizer(lr=0.5, momentum=0.9)
    with torch.no_grad():
        evl = head(x, y)
    assert torch.equal(head.weight.detach(), W)
    ref = uniface_reference(x, W, y, head.bias.detach(), **HP)
    torch.testing.assert_close(evl, ref, rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- fused update on raw rows


def lr_at(step):
    return 0.3 * (0.5 if step >= 3 else 1.0)


@pytest.mark.parametrize(
    "kind,opt_kw",
    [
        ("sgd", dict(momentum=0.9, weight_decay=5e-4)),  # the official train.py settings
        ("sgd", dict(momentum=0.9, nesterov=True, weight_decay=1e-2)),
        ("adamw", dict(betas=(0.8, 0.95), eps=1e-8, weight_decay=0.05)),
    ],
    ids=["sgd_official", "nesterov", "adamw"],
)
def test_fused_update_equals_torch_optim_on_raw_rows(kind, opt_kw):
    """5 steps: the in-pass update == torch.optim on a head computing dL/dW_raw (the block path), the
    RAW rows stepped (as the official SGD does), bias through torch.optim on both."""
    x, y, W = data(5)
    ref = UniFaceHead(D, K, **HP, fused=False).double()
    fus = UniFaceHead(D, K, **HP, fused_update=True, chunk_size=6).double()
    for h in (ref, fus):
        h.load_full_weight(W)
    cls = torch.optim.SGD if kind == "sgd" else torch.optim.AdamW
    opt = cls([ref.weight], lr=lr_at(0), **opt_kw)
    fus.row_optimizer = (RowOptimizer if kind == "sgd" else RowAdamW)(lr=lr_at(0), **opt_kw)
    opt_b = [torch.optim.SGD([h.bias], lr=0.1, momentum=0.9) for h in (ref, fus)]
    g = torch.Generator().manual_seed(0)
    for step in range(5):
        xs = torch.randn(N, D, generator=g, dtype=torch.float64) * 2
        ys = torch.randint(0, K, (N,), generator=g)
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step)
        fus.row_optimizer.lr = lr_at(step)
        lr_, dxr, _, _ = run(ref, xs, ys)
        lf, dxf, dWf, _ = run(fus, xs, ys)
        assert dWf is None  # never allocated
        opt.step()
        for o in opt_b:
            o.step()
            o.zero_grad()
        opt.zero_grad(set_to_none=True)
        torch.testing.assert_close(lf, lr_, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dxf, dxr, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(fus.weight.detach(), ref.weight.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(fus.bias.detach(), ref.bias.detach(), rtol=1e-12, atol=1e-12)
    assert float((fus.weight.detach().norm(dim=1) - 1).abs().max()) > 1e-3  # raw rows, not unit ones
    st = opt.state[ref.weight]
    mom = st["momentum_buffer"] if kind == "sgd" else st["exp_avg"]
    torch.testing.assert_close(fus.weight_momentum, mom, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("master", [False, True])
def test_bf16_proxies_track_fp32(master):
    """bf16 raw rows + bf16 momentum (fp32 compute) stay within bf16 tolerance of the fp32 fused update;
    with master weights the bf16 rows are the rounded fp32 master rows."""
    k = 200
    ref = UniFaceHead(64, k, fused_update=True, seed=1)
    b16 = UniFaceHead(64, k, fused_update=True, proxy_dtype="bf16", master_weights=master, seed=1)
    assert b16.weight.dtype == torch.bfloat16
    for h in (ref, b16):
        h.row_optimizer = RowOptimizer(lr=0.2, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        x = torch.randn(32, 64, generator=g)
        y = torch.randint(0, k, (32,), generator=g)
        torch.testing.assert_close(b16(x, y), ref(x, y), rtol=2e-2, atol=1e-3)
    w32 = ref.weight.detach()
    assert float((w32 - UniFaceHead(64, k, seed=1).weight.detach()).norm() / w32.norm()) > 0.5  # rows moved
    assert float((b16.weight.detach().float() - w32).norm() / w32.norm()) < 1e-2  # 2^-8 per stored value
    if master:
        torch.testing.assert_close(b16.weight.detach(), b16.weight_master.to(torch.bfloat16), rtol=0, atol=0)
        assert float((b16.weight_master - w32).norm() / w32.norm()) < 5e-3


def test_init_std_is_the_official_kaiming():
    head = UniFaceHead(256, 3000)
    assert head.weight.std().item() == pytest.approx(1 / 16, rel=0.02)  # 1 / sqrt(D)
    assert head.log_scalars() == {"uniface_bias": pytest.approx(math.log(30000.0), rel=1e-6)}


# ----------------------------------------------------------------------------- Triton kernel (interpreter)


def _triton_ready():
    pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the CPU Triton test needs TRITON_INTERPRET=1 from the session start (tests/conftest.py)")


@pytest.mark.parametrize("b", [2.0, 14.0, -14.0])
@pytest.mark.parametrize("opts", [dict(chunk_size=64), dict(chunk_size=7, num_negatives=20)], ids=str)
def test_triton_kernel_equals_eager(b, opts, monkeypatch):
    """The kernel (CLIP = 2: the logit clip masks dL/db too) == the eager stage, fp32, at biases that clip
    nothing, the low side and the high side; the kernel is the one that ran."""
    _triton_ready()
    from fr_dist.heads import binary_triton

    calls = []
    real = binary_triton.negative_terms_
    monkeypatch.setattr(binary_triton, "negative_terms_", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, y, W = data(6, k=150, n=20, dtype=torch.float32)
    out = []
    for kernel in ("eager", "triton"):
        head = UniFaceHead(D, 150, **HP, kernel=kernel, seed=2, **opts)
        head.load_full_weight(W)
        with torch.no_grad():
            head.bias.fill_(b)
        out.append(run(head, x, y))
    assert calls
    assert_all_close(out[1], out[0], rtol=2e-5, atol=1e-6, what=f"triton b={b}")


def test_triton_logit_clip_variant_compiles_for_sm90():
    """The CLIP = 2 variant lowers to a cubin (Triton's real compiler, no GPU; a fresh process without the
    interpreter, as tests/unit/test_sf2_triton_compile.py does for the SphereFace2 variants)."""
    pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
    code = (
        "from triton.backends.compiler import GPUTarget\n"
        "from triton.compiler import ASTSource\n"
        "from triton.runtime.jit import JITFunction\n"
        "import triton\n"
        "from fr_dist.heads import binary_triton as bt\n"
        "sig = dict(u_ptr='*fp32', tcol_ptr='*i32', cw_ptr='*fp32', colsp_ptr='*fp32', colq_ptr='*fp32',\n"
        "           N='i32', C='i32', stride_n='i32', k_z='fp32', z0='fp32', tm1='fp32', lo_u='fp32', hi_u='fp32')\n"
        "const = dict(CLIP=2, EXACT=True, HAS_CW=True, GRADS=True, POW=0, BLOCK_N=32, BLOCK_C=64)\n"
        "sig.update({k: 'constexpr' for k in const})\n"
        "k = triton.compile(ASTSource(fn=JITFunction(bt.binary_negatives), signature=sig, constexprs=const),\n"
        "                   target=GPUTarget('cuda', 90, 32))\n"
        "assert len(k.asm['cubin']) > 0 and '.entry binary_negatives' in k.asm['ptx']\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


# ----------------------------------------------------------------------------- registry, config, validation


def test_registry_and_config_overrides_build_the_head():
    cfg = load_config(
        None,
        ["head.name=uniface", "head.uniface.m=0.3", "head.uniface.s=32", "head.uniface.l=0.5",
         "head.uniface.r=0.2", "head.uniface.chunk_size=128", "head.uniface.fused_update=true"],
    )  # fmt: skip
    head = create_head(cfg.head.name, embedding_size=8, num_classes=50, **cfg.head.head_kwargs())
    assert isinstance(head, UniFaceHead) and head.loss_name == "uniface"
    assert (head.loss.m, head.loss.s, head.loss.l, head.loss.r) == (0.3, 32.0, 0.5, 0.2)
    assert head.chunk_size == 128 and head.fused_update
    assert head.bias.item() == pytest.approx(math.log(50 * 0.2 * 10), rel=1e-6)
    assert head.optimizer_contract().option == "head.uniface.fused_update"
    assert uniface_bias_init(50, 0.2) == pytest.approx(math.log(100.0))
    assert UniFaceConfig() == UniFaceConfig(m=0.4, s=64.0, l=1.0, r=1.0)  # the official defaults


def test_config_default_is_the_lean_update():
    """head.uniface defaults to the in-pass update with bf16 proxies (the constructor: unfused fp32);
    fused_update=false alone turns both off."""
    lean = load_config(None, ["head.name=uniface"]).head.uniface
    assert (lean.fused_update, lean.proxy_dtype, lean.master_weights) == (True, "bf16", False)
    head = create_head("uniface", embedding_size=8, num_classes=20, **dataclasses_asdict(lean))
    assert head.fused_update and head.weight.dtype == torch.bfloat16
    off = load_config(None, ["head.name=uniface", "head.uniface.fused_update=false"]).head.uniface
    assert (off.fused_update, off.proxy_dtype) == (False, "fp32")
    plain = UniFaceHead(8, 20)
    assert not plain.fused_update and plain.weight.dtype == torch.float32


@pytest.mark.parametrize(
    "override,words",
    [
        ("head.uniface.s=0", ["head.uniface.s", "0"]),
        ("head.uniface.l=-1", ["head.uniface.l"]),
        ("head.uniface.r=0", ["head.uniface.r"]),
        ("head.uniface.m=-0.1", ["head.uniface.m"]),
        ("head.uniface.sample_rate=1.5", ["head.uniface.sample_rate"]),
        ("head.uniface.fused_update=false,head.uniface.proxy_dtype=bf16", ["fused_update"]),
        ("head.uniface.mm=0.3", ["head.uniface.mm", "head.uniface.m"]),
    ],
)
def test_config_rejects_bad_values_naming_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["head.name=uniface", *override.split(",")])
    for w in words:
        assert w in str(e.value), str(e.value)


def test_loss_validation():
    for kw, word in ((dict(s=0.0), "s="), (dict(l=0.0), "l="), (dict(r=-1.0), "r="), (dict(m=-0.1), "m=")):
        with pytest.raises(ValueError, match=word):
            UniFace(**kw)
    with pytest.raises(ValueError, match="finite"):
        UniFace(s=float("inf"))
    with pytest.raises(TypeError, match="unexpected keyword"):
        create_head("uniface", embedding_size=4, num_classes=5, lam=0.5)
