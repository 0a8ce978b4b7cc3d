"""MobileFaceNet: insightface arcface_torch ``backbones/mobilefacenet.py`` (``get_mbf``).

Same module tree and state-dict keys as insightface (``layers.N...``, ``conv_sep``,
``features.layers...``), so its released weights load with ``load_state_dict``.
112x112 -> stride-2 stem (56) -> depthwise stages at 28, 14, 7 -> 1x1 conv to 512 ->
GDC (global depthwise 7x7 conv + BN) -> flatten -> Linear(512, D, no bias) -> BatchNorm1d.

Default (``blocks=(1, 4, 6, 2), scale=2``, 512-d): 2,059,520 parameters (6,314,880 large); ``get_mbf_large`` is
``blocks=(2, 8, 12, 4), scale=4``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from fr_dist.models.iresnet import checkpoint_stage, forwards_to

__all__ = ["MobileFaceNet", "mobilefacenet", "mobilefacenet_large"]


class Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), -1)


class ConvBlock(nn.Module):
    """conv (no bias) - BN - PReLU."""

    def __init__(self, in_c, out_c, kernel=(1, 1), stride=(1, 1), padding=(0, 0), groups=1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, groups=groups, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(num_features=out_c),
            nn.PReLU(num_parameters=out_c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LinearBlock(nn.Module):
    """conv (no bias) - BN, no activation."""

    def __init__(self, in_c, out_c, kernel=(1, 1), stride=(1, 1), padding=(0, 0), groups=1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(num_features=out_c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 expand to ``groups`` - depthwise kxk - 1x1 linear projection."""

    def __init__(self, in_c, out_c, residual=False, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=1):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_c, out_c=groups, kernel=(1, 1), padding=(0, 0), stride=(1, 1)),
            ConvBlock(groups, groups, groups=groups, kernel=kernel, padding=padding, stride=stride),
            LinearBlock(groups, out_c, kernel=(1, 1), padding=(0, 0), stride=(1, 1)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layers(x)
        return x + y if self.residual else y


class Residual(nn.Module):
    def __init__(self, c, num_block, groups, kernel=(3, 3), stride=(1, 1), padding=(1, 1)):
        super().__init__()
        self.layers = nn.Sequential(
            *[DepthWise(c, c, True, kernel, stride, padding, groups) for _ in range(num_block)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise conv over the final ``spatial`` x ``spatial`` map -> Linear -> BN1d."""

    def __init__(self, embedding_size: int, spatial: int = 7, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.Sequential(
            LinearBlock(512, 512, groups=512, kernel=(spatial, spatial), stride=(1, 1), padding=(0, 0)),
            Flatten(),
            nn.Linear(512, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )
        self.dropout = nn.Dropout(dropout)  # no parameters: state-dict keys stay insightface's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers[1](self.layers[0](x))  # [N, 512, s, s] -> [N, 512, 1, 1] -> [N, 512]
        x = self.dropout(x)
        return self.layers[3](self.layers[2](x))  # [N, D]


class MobileFaceNet(nn.Module):
    def __init__(
        self,
        embedding_size: int = 512,
        input_size: int = 112,
        dropout: float = 0.0,
        blocks: Sequence[int] = (1, 4, 6, 2),
        scale: int = 2,
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        if input_size % 16:
            raise ValueError(f"MobileFaceNet input_size {input_size} must be divisible by 16")
        if len(blocks) != 4:
            raise ValueError(f"MobileFaceNet blocks must be 4 block counts, got {list(blocks)}")
        self.embedding_size, self.input_size = int(embedding_size), int(input_size)
        self.scale = scale
        self.activation_checkpointing = activation_checkpointing
        c1, c2 = 64 * scale, 128 * scale
        self.layers = nn.ModuleList()
        self.layers.append(ConvBlock(3, c1, kernel=(3, 3), stride=(2, 2), padding=(1, 1)))
        if blocks[0] == 1:
            self.layers.append(ConvBlock(c1, c1, kernel=(3, 3), stride=(1, 1), padding=(1, 1), groups=64))
        else:
            self.layers.append(Residual(c1, num_block=blocks[0], groups=128))
        self.layers.extend(
            [
                DepthWise(c1, c1, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=128),
                Residual(c1, num_block=blocks[1], groups=128),
                DepthWise(c1, c2, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=256),
                Residual(c2, num_block=blocks[2], groups=256),
                DepthWise(c2, c2, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=512),
                Residual(c2, num_block=blocks[3], groups=256),
            ]
        )
        self.conv_sep = ConvBlock(c2, 512, kernel=(1, 1), stride=(1, 1), padding=(0, 0))
        self.features = GDC(self.embedding_size, spatial=self.input_size // 16, dropout=dropout)
        self._initialize_weights()

    def _initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ckpt = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for stage in self.layers:  # [N, 3, S, S] -> [N, 128*scale/... , S/16, S/16]
            x = checkpoint_stage(stage, x) if ckpt and isinstance(stage, Residual) else stage(x)
        x = self.conv_sep(x)  # [N, 512, S/16, S/16]
        return self.features(x)  # [N, D]


@forwards_to(MobileFaceNet)
def mobilefacenet(**kwargs) -> MobileFaceNet:
    """insightface ``get_mbf``: blocks (1, 4, 6, 2), scale 2."""
    return MobileFaceNet(**kwargs)


@forwards_to(MobileFaceNet)
def mobilefacenet_large(**kwargs) -> MobileFaceNet:
    """insightface ``get_mbf_large``: blocks (2, 8, 12, 4), scale 4."""
    kwargs.setdefault("blocks", (2, 8, 12, 4))
    kwargs.setdefault("scale", 4)
    return MobileFaceNet(**kwargs)
