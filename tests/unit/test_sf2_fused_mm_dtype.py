"""The fused SphereFace2 pass under autocast: its three GEMMs take operands in the autocast dtype (as a
Linear layer or Partial FC's GEMMs would), the chunk math, gradients and the fused update stay fp32."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fr_dist.heads import SphereFace2Head
from fr_dist.heads.row_optim import RowOptimizer

D, K, N = 32, 301, 24


class _GemmDtypes(TorchDispatchMode):
    """Records the operand dtypes of every matrix multiply dispatched inside the block."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
            self.seen.append(tuple(a.dtype for a in args if torch.is_tensor(a) and a.dim() == 2))
        return func(*args, **(kwargs or {}))


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g), torch.randint(0, K, (N,), generator=g)


def _run(autocast: bool, chunk: int, **head_kw):
    torch.manual_seed(0)
    head = SphereFace2Head(D, K, chunk_size=chunk, seed=5, **head_kw)
    x, y = _batch()
    x = x.requires_grad_(True)
    rec = _GemmDtypes()
    with rec, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = head(x, y)
    loss.backward()
    return head, loss.detach(), x.grad, rec.seen


@pytest.mark.parametrize("chunk", [7, 0])
def test_gemms_run_in_the_autocast_dtype_and_match_fp32(chunk):
    h32, l32, dx32, seen32 = _run(False, chunk)
    h16, l16, dx16, seen16 = _run(True, chunk)
    chunks = -(-K // (chunk or K))
    if chunk:
        assert len(seen16) == 3 * chunks  # GEMMs 1, 2 (dW), 3 (dx) per chunk
    assert seen16 and all(dt == torch.bfloat16 for s in seen16 for dt in s), seen16
    assert seen32 and all(dt == torch.float32 for s in seen32 for dt in s), seen32
    # bf16 operands (8-bit mantissa): the loss, dL/dx and dL/dW agree with fp32 to bf16 precision
    torch.testing.assert_close(l16, l32, rtol=2e-2, atol=0)
    assert torch.nn.functional.cosine_similarity(dx16.flatten(), dx32.flatten(), dim=0) > 0.999
    g16, g32 = h16.weight.grad.flatten(), h32.weight.grad.flatten()
    assert h16.weight.grad.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.999


def test_fused_update_under_autocast_tracks_fp32():
    def step(autocast):
        torch.manual_seed(0)
        head = SphereFace2Head(D, K, chunk_size=16, seed=5, fused_update=True)
        head.row_optimizer = RowOptimizer(lr=0.5, momentum=0.9)
        x, y = _batch(1)
        rec = _GemmDtypes()
        for _ in range(3):
            with rec, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = head(x, y)
            loss.backward()
        return head, rec.seen

    h32, seen32 = step(False)
    h16, seen16 = step(True)
    assert all(dt == torch.bfloat16 for s in seen16 for dt in s) and seen16
    assert h16.weight.dtype == h16.weight_momentum.dtype == torch.float32  # state stays fp32
    rel = (h16.weight - h32.weight).norm() / h32.weight.norm()
    mom = (h16.weight_momentum - h32.weight_momentum).norm() / h32.weight_momentum.norm()
    assert rel < 1e-2 and mom < 3e-2, (float(rel), float(mom))
