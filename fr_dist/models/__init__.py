"""Backbones: insightface iresnet18/34/50/100/200, a configurable ``iresnet``, MobileFaceNet, timm/<name>."""

from __future__ import annotations

from fr_dist.models.iresnet import IRESNET_LAYERS, IResNet, iresnet
from fr_dist.models.mobilefacenet import MobileFaceNet
from fr_dist.models.registry import create_backbone, list_backbones, register_backbone

__all__ = [
    "create_backbone",
    "list_backbones",
    "register_backbone",
    "IResNet",
    "MobileFaceNet",
    "iresnet",
]


def _register_iresnets():
    for depth, layers in IRESNET_LAYERS.items():
        register_backbone(f"iresnet{depth}")(lambda _layers=layers, **kw: IResNet(_layers, **kw))


_register_iresnets()
register_backbone("iresnet")(iresnet)
register_backbone("mobilefacenet")(MobileFaceNet)
