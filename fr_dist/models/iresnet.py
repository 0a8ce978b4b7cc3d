"""IResNet: insightface arcface_torch ``backbones/iresnet.py``, same modules, names and counts.

112x112 input -> stem conv3x3(64) + BN + PReLU -> 4 stages of IBasicBlocks, each starting with a
stride-2 block (56, 28, 14, 7) -> BN2d -> flatten 512*7*7 -> dropout -> FC -> BatchNorm1d with its
weight fixed to 1 (the BN-dropout-FC-BN neck). The state-dict keys equal insightface's, so its
released ``backbone.pth`` files load with ``load_state_dict``.

Parameter counts (512-d embedding, 112x112, ``tests/unit/test_models.py`` asserts them):

    iresnet18   24,025,600      iresnet34   34,139,328      iresnet50   43,590,848
    iresnet100  65,156,160      iresnet200 118,833,920

(trainable ones are 512 fewer: the fixed ``features.weight``.)

``iresnet2060`` is insightface's ``backbones/iresnet2060.py`` (layers 3, 128, 896, 3: 1,122,301,120
parameters), same keys. As insightface's, it recomputes its activations in training: stage 2 in 20
and stage 3 in 100 ``checkpoint_sequential``-style segments (the last segment of each stage is kept),
the ``checkpoint_segments`` argument of :class:`IResNet`.

``iresnet(layers, width, stem_stride)`` builds the same family at other depths and widths; the CPU
demo uses ``layers=[1, 1, 1, 1], width=16, stem_stride=2`` (registered as ``iresnet_tiny``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "IResNet",
    "IBasicBlock",
    "iresnet",
    "iresnet_tiny",
    "iresnet_depth",
    "iresnet2060",
    "IRESNET_LAYERS",
    "IRESNET2060_LAYERS",
    "checkpoint_stage",
    "conv_output_size",
]

IRESNET_LAYERS: dict[int, list[int]] = {
    18: [2, 2, 2, 2],
    34: [3, 4, 6, 3],
    50: [3, 4, 14, 3],
    100: [3, 13, 30, 3],
    200: [6, 26, 60, 6],
}
# insightface backbones/iresnet2060.py, and the checkpoint_sequential segments its forward uses in training
IRESNET2060_LAYERS: list[int] = [3, 128, 1024 - 128, 3]
IRESNET2060_SEGMENTS: tuple[int, ...] = (0, 20, 100, 0)


def conv_output_size(n: int, stride: int) -> int:
    """Output size of a kernel-3 / padding-1 (or kernel-1 / padding-0) conv: ceil(n / stride)."""
    return -(-n // stride)


class _KeepBatchNormStats:
    """Recompute context for checkpointing: BN running stats are restored after the recompute.

    Without it a checkpointed stage would update ``running_mean/var`` twice per step (forward and
    recompute), so the eval-mode model would differ from an un-checkpointed run.
    """

    def __init__(self, module: nn.Module):
        self.bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.saved: list = []

    def __enter__(self):
        self.saved = [
            tuple(
                b.clone() if b is not None else None
                for b in (m.running_mean, m.running_var, m.num_batches_tracked)
            )
            for m in self.bns
        ]
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for m, saved in zip(self.bns, self.saved):
                for buf, old in zip((m.running_mean, m.running_var, m.num_batches_tracked), saved):
                    if buf is not None:
                        buf.copy_(old)
        self.saved = []
        return False


def checkpoint_stage(stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``stage(x)`` with its activations recomputed in the backward (non-reentrant checkpoint).

    Outputs, gradients and BatchNorm running statistics equal those of ``stage(x)``.
    """
    return checkpoint(
        stage,
        x,
        use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _KeepBatchNormStats(stage)),
    )


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class IBasicBlock(nn.Module):
    """BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN, plus the (downsampled) identity."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    """insightface IResNet; ``width`` scales the stage widths (64 -> 64, 128, 256, 512)."""

    def __init__(
        self,
        layers: Sequence[int],
        embedding_size: int = 512,
        input_size: int = 112,
        dropout: float = 0.0,
        width: int = 64,
        stem_stride: int = 1,
        activation_checkpointing: bool = False,
        zero_init_residual: bool = False,
        checkpoint_segments: Optional[Sequence[int]] = None,
    ):
        super().__init__()
        layers = [int(n) for n in layers]
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"iresnet layers must be 4 positive block counts, got {layers}")
        if width < 1 or stem_stride < 1:
            raise ValueError(f"iresnet width and stem_stride must be >= 1, got {width}, {stem_stride}")
        self.embedding_size, self.input_size = int(embedding_size), int(input_size)
        self.activation_checkpointing = activation_checkpointing
        segments = [0] * 4 if checkpoint_segments is None else [int(n) for n in checkpoint_segments]
        if len(segments) != 4 or min(segments) < 0:
            raise ValueError(f"iresnet checkpoint_segments must be 4 counts >= 0, got {segments}")
        self.checkpoint_segments = segments
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=stem_stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width, eps=1e-05)
        self.prelu = nn.PReLU(width)
        self.layer1 = self._make_layer(widths[0], layers[0])
        self.layer2 = self._make_layer(widths[1], layers[1])
        self.layer3 = self._make_layer(widths[2], layers[2])
        self.layer4 = self._make_layer(widths[3], layers[3])
        self.bn2 = nn.BatchNorm2d(widths[3], eps=1e-05)
        self.dropout = nn.Dropout(p=dropout, inplace=True)
        spatial = conv_output_size(self.input_size, stem_stride)
        for _ in range(4):
            spatial = conv_output_size(spatial, 2)  # 112 -> 56, 28, 14, 7
        self.fc_scale = spatial * spatial
        self.fc = nn.Linear(widths[3] * self.fc_scale, self.embedding_size)
        self.features = nn.BatchNorm1d(self.embedding_size, eps=1e-05)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:  # as insightface (it zeroes bn2 of every block)
            for m in self.modules():
                if isinstance(m, IBasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, planes: int, blocks: int) -> nn.Sequential:
        downsample = nn.Sequential(
            conv1x1(self.inplanes, planes, stride=2),
            nn.BatchNorm2d(planes, eps=1e-05),
        )
        layers = [IBasicBlock(self.inplanes, planes, 2, downsample)]
        self.inplanes = planes
        layers += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _stage(self, stage: nn.Sequential, segments: int, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return stage(x)
        if segments > 0:  # torch.utils.checkpoint.checkpoint_sequential's split: the last segment is kept
            size = len(stage) // segments
            end = size * (segments - 1)
            for start in range(0, end, max(size, 1)):
                x = checkpoint_stage(stage[start : start + size], x)
            return stage[end:](x)
        if self.activation_checkpointing:
            return checkpoint_stage(stage, x)
        return stage(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))  # [N, 3, S, S] -> [N, w, S/st, S/st]
        stages = (self.layer1, self.layer2, self.layer3, self.layer4)
        for stage, segments in zip(stages, self.checkpoint_segments):
            x = self._stage(stage, segments, x)  # spatial / 2 per stage -> [N, 8w, 7, 7]
        x = self.bn2(x)
        x = torch.flatten(x, 1)  # [N, 8w, 7, 7] -> [N, 8w*49]
        x = self.dropout(x)
        x = self.fc(x)  # [N, D]
        return self.features(x)


def forwards_to(cls: Callable) -> Callable:
    """Decorator: a factory that passes its ``**kwargs`` on to ``cls`` reports ``cls``'s signature,
    so the registry can name an argument the backbone does not take without building it."""

    def deco(fn):
        fn.__signature__ = inspect.signature(cls)
        return fn

    return deco


@forwards_to(IResNet)
def iresnet(layers: Sequence[int] = (2, 2, 2, 2), width: int = 64, stem_stride: int = 1, **kwargs) -> IResNet:
    """Configurable IResNet (``create_backbone("iresnet", layers=[...], width=..., ...)``)."""
    return IResNet(list(layers), width=width, stem_stride=stem_stride, **kwargs)


@forwards_to(IResNet)
def iresnet_tiny(**kwargs) -> IResNet:
    """CPU demo backbone: one block per stage, width 16, stride-2 stem (571,120 params at 128-d)."""
    kwargs.setdefault("layers", (1, 1, 1, 1))
    kwargs.setdefault("width", 16)
    kwargs.setdefault("stem_stride", 2)
    return iresnet(**kwargs)


@forwards_to(IResNet)
def iresnet2060(**kwargs) -> IResNet:
    """insightface ``iresnet2060``: layers (3, 128, 896, 3), stages 2 and 3 recomputed in 20 / 100 segments."""
    kwargs.setdefault("layers", IRESNET2060_LAYERS)
    kwargs.setdefault("checkpoint_segments", IRESNET2060_SEGMENTS)
    return IResNet(**kwargs)


def iresnet_depth(depth: int) -> Callable[..., IResNet]:
    """Factory of insightface's ``iresnet{depth}`` (18, 34, 50, 100, 200)."""
    if depth not in IRESNET_LAYERS:
        raise ValueError(f"iresnet depth {depth} unknown; known depths: {sorted(IRESNET_LAYERS)}")
    return functools.partial(IResNet, IRESNET_LAYERS[depth])
