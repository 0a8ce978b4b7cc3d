"""IResNet (insightface arcface_torch ``backbones/iresnet.py`` architecture, same parameter counts).

112x112 input -> stem conv3x3(64) + BN + PReLU -> 4 stages of IBasicBlocks (stride 2 each) ->
BN2d -> flatten 7x7 -> dropout -> FC -> BatchNorm1d (weight fixed to 1): the BN-dropout-FC-BN neck.

``iresnet(layers, width, stem_stride)`` builds the same family at other depths/widths (the CPU
demo uses a narrow, shallow one with a stride-2 stem); ``iresnet18..200`` are insightface's.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

__all__ = ["IResNet", "iresnet", "IRESNET_LAYERS"]

IRESNET_LAYERS = {
    18: [2, 2, 2, 2],
    34: [3, 4, 6, 3],
    50: [3, 4, 14, 3],
    100: [3, 13, 30, 3],
    200: [6, 26, 60, 6],
}


def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN, plus the (downsampled) identity."""

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    def __init__(
        self,
        layers,
        embedding_size: int = 512,
        dropout: float = 0.0,
        width: int = 64,
        input_size: int = 112,
        stem_stride: int = 1,
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        self.embedding_size, self.input_size = embedding_size, input_size
        self.activation_checkpointing = activation_checkpointing
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
        spatial = -(-input_size // stem_stride)  # each stride-s conv (pad 1, k 3) gives ceil(n / s)
        for _ in range(4):
            spatial = -(-spatial // 2)
        self.fc = nn.Linear(widths[3] * spatial * spatial, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-05)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int) -> nn.Sequential:
        downsample = nn.Sequential(
            nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=2, bias=False),
            nn.BatchNorm2d(planes, eps=1e-05),
        )
        layers = [IBasicBlock(self.inplanes, planes, 2, downsample)]
        self.inplanes = planes
        layers += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _stage(self, stage, x):
        if self.activation_checkpointing and self.training and x.requires_grad:
            return checkpoint(stage, x, use_reentrant=False)
        return stage(x)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))  # [N, w, H, W]
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = self._stage(stage, x)  # spatial / 2 per stage
        x = self.bn2(x)
        x = torch.flatten(x, 1)  # [N, 8w * 7 * 7]
        x = self.dropout(x)
        x = self.fc(x.float() if x.dtype == torch.float16 else x)  # [N, D]
        return self.features(x)


def iresnet(layers=(2, 2, 2, 2), width: int = 64, stem_stride: int = 1, **kw) -> IResNet:
    return IResNet(list(layers), width=width, stem_stride=stem_stride, **kw)
