"""The Triton chunk kernel on W = 2 and 3 gloo ranks (uneven shards) == the eager head on one process:
loss, dL/dx and every rank's rows of dL/dW (Triton's CPU interpreter, fp32)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from fr_dist.heads import SphereFace2Head  # noqa: E402
from fr_dist.testing import spawn_gloo  # noqa: E402

pytestmark = pytest.mark.dist
B, D, K = 6, 16, 23


def _batch(world):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(world * B, D, generator=g)  # [W*B, D]
    y = torch.randint(0, K, (world * B,), generator=g)
    w = torch.randn(K, D, generator=g)  # [K, D]
    return x, y, w


def _head(kernel, margin):
    return SphereFace2Head(D, K, margin=margin, m={"C": 0.4, "A": 0.5}[margin], chunk_size=4, kernel=kernel)


def _run(head, w, x, y):
    head.load_full_weight(w)
    x = x.clone().requires_grad_(True)
    loss = head(x, y)
    loss.backward()
    return float(loss.detach()), x.grad, head.weight.grad, head.class_start


def _rank_fn(rank, world, margin):
    x, y, w = _batch(world)
    sl = slice(rank * B, (rank + 1) * B)
    return _run(_head("triton", margin), w, x[sl], y[sl])


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("margin", ["C", "A"])
def test_triton_kernel_sharded_equals_eager_single_process(world, margin, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # inherited by the spawned ranks
    x, y, w = _batch(world)
    ref_loss, ref_dx, ref_dw, _ = _run(_head("eager", margin), w, x, y)
    for rank, (loss, dx, dw, start) in enumerate(spawn_gloo(_rank_fn, world, args=(margin,), timeout_s=300)):
        assert loss == pytest.approx(ref_loss, rel=2e-5)
        torch.testing.assert_close(dx, ref_dx[rank * B : (rank + 1) * B], rtol=2e-4, atol=1e-6)
        torch.testing.assert_close(dw, ref_dw[start : start + dw.shape[0]], rtol=2e-4, atol=1e-6)
