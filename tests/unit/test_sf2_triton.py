"""The Triton kernel of the fused SphereFace2 chunk (fr_dist.heads.sf2_triton) against the eager path,
run on CPU by Triton's interpreter (TRITON_INTERPRET=1, set before the kernel is built)."""

from __future__ import annotations

import itertools
import os

import pytest

# Triton reads TRITON_INTERPRET when it is imported: set it first. Only kernel="triton" heads look at it
# (kernel="auto" is eager off CUDA), so it is harmless to the rest of the session; restored at teardown.
_OLD_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

import torch  # noqa: E402

from fr_dist.heads import SphereFace2Head  # noqa: E402
from fr_dist.heads.row_optim import RowOptimizer  # noqa: E402

D, K, N = 16, 150, 20


def teardown_module():
    if _OLD_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _OLD_INTERPRET


M_OF = {"C": 0.4, "A": 0.5, "M": 1.7}


def _head(kernel, **kw):
    torch.manual_seed(0)
    return SphereFace2Head(D, K, seed=7, kernel=kernel, **kw)


def _batch(seed=0, n=N):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g), torch.randint(0, K, (n,), generator=g)


def _loss_and_grads(head, x, y):
    x = x.clone().requires_grad_(True)
    loss = head(x, y)
    loss.backward()
    return loss.detach(), x.grad, head.weight.grad, head.bias.grad


CASES = list(itertools.product("CAM", ["detached", "exact"], [1.0, 3.0, 2.5], [7, 64, 0]))


@pytest.mark.parametrize("margin,grad,t,chunk", CASES, ids=lambda v: str(v))
def test_triton_chunk_equals_eager(margin, grad, t, chunk):
    kw = dict(margin=margin, grad=grad, m=M_OF[margin], t=t, chunk_size=chunk)
    x, y = _batch()
    ref = _loss_and_grads(_head("eager", **kw), x, y)
    out = _loss_and_grads(_head("triton", **kw), x, y)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)


def test_triton_kernel_is_the_one_that_ran(monkeypatch):
    """kernel='triton' goes through the kernel (counted), 'eager' and fp64 never do."""
    from fr_dist.heads import binary_triton as sf2_triton

    calls = []
    real = sf2_triton.negative_terms_
    monkeypatch.setattr(sf2_triton, "negative_terms_", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, y = _batch()
    _loss_and_grads(_head("triton", chunk_size=50), x, y)
    assert len(calls) == 3  # 150 classes / 50 per chunk
    _loss_and_grads(_head("eager", chunk_size=50), x, y)
    h64 = _head("triton", chunk_size=50).double()
    _loss_and_grads(h64, x.double(), y)  # fp64 keeps the eager path
    assert len(calls) == 3
    assert _head("auto")._chunk_kernel(torch.device("cpu")) == "eager"  # auto: Triton on CUDA only


def test_triton_with_sampling_and_fused_update():
    """Column weights (1/p of sampled negatives) and the fused SGD update go through the kernel."""
    x, y = _batch(3)
    heads = []
    for kernel in ("eager", "triton"):
        h = _head(kernel, chunk_size=32, fused_update=True, num_negatives=60)
        h.row_optimizer = RowOptimizer(lr=0.3, momentum=0.9)
        losses = []
        for _ in range(3):
            loss = h(x, y)
            loss.backward()
            losses.append(float(loss.detach()))
        heads.append((h, losses))
    (he, le), (ht, lt) = heads
    assert lt == pytest.approx(le, rel=1e-5)
    torch.testing.assert_close(ht.weight, he.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ht.weight_momentum, he.weight_momentum, rtol=1e-4, atol=1e-6)


def test_triton_unavailable_is_an_error_not_a_silent_fallback(monkeypatch):
    from fr_dist.heads import binary_triton as sf2_triton

    monkeypatch.setattr(sf2_triton, "available", lambda device: False)
    with pytest.raises(RuntimeError, match="kernel='triton' needs Triton"):
        _head("triton")(*_batch())
    with pytest.raises(ValueError, match="unknown kernel"):
        _head("cuda")
