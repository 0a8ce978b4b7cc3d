"""MobileFaceNet (insightface arcface_torch ``backbones/mobilefacenet.py`` architecture)."""

from __future__ import annotations

import torch.nn as nn

__all__ = ["MobileFaceNet"]


class ConvBlock(nn.Sequential):
    def __init__(self, cin, cout, kernel=1, stride=1, padding=0, groups=1):
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.PReLU(cout),
        )


class LinearBlock(nn.Sequential):
    def __init__(self, cin, cout, kernel=1, stride=1, padding=0, groups=1):
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        )


class DepthWise(nn.Module):
    def __init__(self, cin, cout, residual=False, kernel=3, stride=2, padding=1, groups=1):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(cin, groups, 1),
            ConvBlock(groups, groups, kernel, stride, padding, groups=groups),
            LinearBlock(groups, cout, 1),
        )

    def forward(self, x):
        y = self.layers(x)
        return x + y if self.residual else y


class Residual(nn.Sequential):
    def __init__(self, c, num_block, groups, kernel=3, stride=1, padding=1):
        super().__init__(
            *[DepthWise(c, c, True, kernel, stride, padding, groups) for _ in range(num_block)]
        )


class GDC(nn.Sequential):
    def __init__(self, embedding_size, spatial=7):
        super().__init__(
            LinearBlock(512, 512, kernel=spatial, groups=512),  # global depthwise conv
            nn.Flatten(),
            nn.Linear(512, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )


class MobileFaceNet(nn.Module):
    def __init__(
        self,
        embedding_size: int = 512,
        input_size: int = 112,
        blocks=(1, 4, 6, 2),
        scale: int = 2,
        dropout: float = 0.0,
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        if input_size % 16:
            raise ValueError(f"input_size {input_size} must be divisible by 16")
        self.embedding_size, self.input_size = embedding_size, input_size
        c1, c2 = 64 * scale, 128 * scale
        layers = [ConvBlock(3, c1, 3, 2, 1)]
        if blocks[0] == 1:
            layers.append(ConvBlock(c1, c1, 3, 1, 1, groups=64))
        else:
            layers.append(Residual(c1, blocks[0], groups=128))
        layers += [
            DepthWise(c1, c1, kernel=3, stride=2, padding=1, groups=128),
            Residual(c1, blocks[1], groups=128),
            DepthWise(c1, c2, kernel=3, stride=2, padding=1, groups=256),
            Residual(c2, blocks[2], groups=256),
            DepthWise(c2, c2, kernel=3, stride=2, padding=1, groups=512),
            Residual(c2, blocks[3], groups=256),
        ]
        self.layers = nn.Sequential(*layers)
        self.conv_sep = ConvBlock(c2, 512, 1)
        self.features = GDC(embedding_size, spatial=input_size // 16)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.conv_sep(self.layers(x))  # [N, 512, H/16, W/16]
        return self.features(x)  # [N, D]
