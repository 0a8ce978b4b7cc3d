"""Every tensor a head's training step creates is created on its inputs' device.

On CUDA a tensor made without ``device=`` lands on the CPU, and an op mixing it with CUDA tensors fails
("Expected all tensors to be on the same device"); on a CPU-only machine the same code runs fine, so the
first GPU run would be the first to see it. Here a TorchFunctionMode records, while the heads' forward and
backward run, every factory call (torch.tensor / zeros / empty / full / ...) made from fr_dist's own files
without a ``device`` (a ``generator`` pins the device too: the sampling keys are drawn on CPU on purpose,
then moved). Construction (init rows on CPU, moved by ``.to(device)``) is outside the recorded region.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from fr_dist.heads import PartialFCHead, SphereFace2Head
from fr_dist.heads.row_optim import RowAdamW, RowOptimizer

PKG = str(Path(__import__("fr_dist").__file__).parent)
FACTORIES = {
    torch.tensor,
    torch.as_tensor,
    torch.scalar_tensor,
    torch.zeros,
    torch.ones,
    torch.empty,
    torch.full,
    torch.arange,
    torch.linspace,
    torch.eye,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.randperm,
}


class _DeviceLessFactories(TorchFunctionMode):
    """Records ``file:line`` of each factory call in fr_dist made without ``device=`` (or ``generator=``)."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and "device" not in kwargs and "generator" not in kwargs:
            for fr in reversed(traceback.extract_stack()[:-1]):
                if fr.filename.startswith(PKG):
                    self.found.append(f"{Path(fr.filename).relative_to(PKG)}:{fr.lineno} {func.__name__}")
                    break
        return func(*args, **kwargs)


D, K, N = 16, 90, 12


def _step(head, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=dtype).requires_grad_(True)
    y = torch.randint(0, K, (N,), generator=g)
    with _DeviceLessFactories() as mode:
        loss = head(x, y)
        loss.backward()
    return mode.found


SF2 = {
    "fused": {},
    "fused-A-exact": dict(margin="A", m=0.5, grad="exact"),
    "fused-M-chunk7": dict(margin="M", m=1.7, chunk_size=7),
    "cosine-block": dict(fused=False),
    "fused-update-sgd": dict(fused_update=True),
    "fused-update-bf16": dict(fused_update=True, proxy_dtype="bf16"),
    "fused-update-master": dict(fused_update=True, proxy_dtype="bf16", master_weights=True),
    "sampled": dict(num_negatives=20),
    "sampled-rate": dict(sample_rate=0.3, fused_update=True),
}


@pytest.mark.parametrize("kw", list(SF2.values()), ids=list(SF2))
def test_sphereface2_step_creates_no_deviceless_tensor(kw):
    head = SphereFace2Head(D, K, seed=1, kernel="eager", **kw)
    if head.fused_update:
        head.row_optimizer = RowOptimizer(lr=0.1, momentum=0.9)
    assert _step(head) == []


def test_sphereface2_fp64_and_adamw_create_no_deviceless_tensor():
    head = SphereFace2Head(D, K, seed=1, kernel="eager").double()
    assert _step(head, torch.float64) == []
    head = SphereFace2Head(D, K, seed=1, kernel="eager", fused_update=True)
    head.row_optimizer = RowAdamW(lr=1e-3)
    assert _step(head) == []


PFC = {
    "arcface": {},
    "cosface": dict(margin="cosface", m2=0.0, m3=0.4),
    "sampled": dict(sample_rate=0.3),
    "chunked": dict(chunk_size=16),
}


@pytest.mark.parametrize("kw", list(PFC.values()), ids=list(PFC))
def test_partial_fc_step_creates_no_deviceless_tensor(kw):
    assert _step(PartialFCHead(D, K, seed=1, **kw)) == []


def test_the_check_sees_a_deviceless_tensor(monkeypatch):
    """The recorder itself: a factory call without device= inside fr_dist is reported by file and line."""
    from fr_dist.heads.binary import BinaryStages

    real = BinaryStages.softplus

    def leaky(z, out=None):
        torch.zeros(1)  # this frame is the test's; the innermost fr_dist frame is the fused pass's call
        return real(z, out)

    monkeypatch.setattr(BinaryStages, "softplus", staticmethod(leaky))
    found = _step(SphereFace2Head(D, K, seed=1, kernel="eager"))
    assert found and all(f.startswith("heads/binary.py:") for f in found), found
