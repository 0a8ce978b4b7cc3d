"""Backbones: insightface iresnet18..200 and 2060, a configurable ``iresnet``, MobileFaceNet, ViTs, timm/<name>.

    from fr_dist.models import create_backbone, list_backbones, register_backbone
    net = create_backbone("iresnet50", embedding_size=512)   # [N, 3, 112, 112] -> [N, 512]

Registered: ``iresnet18/34/50/100/200/2060`` (insightface), ``iresnet`` (``layers``, ``width``,
``stem_stride``), ``iresnet_tiny`` (the CPU demo's), ``mobilefacenet``, ``mobilefacenet_large``,
insightface's ViTs ``vit_t``, ``vit_s``, ``vit_b``, ``vit_l``, ``vit_h`` and its WebFace42M variants
(``vit_t_dp005_mask0``, ...: :data:`fr_dist.models.vit.VIT_CONFIGS`); plus ``timm/<model name>`` with
the optional ``timm`` extra.
"""

from __future__ import annotations

# the submodules ``iresnet``, ``mobilefacenet`` and ``vit`` keep their names: their factory
# functions are registered, not re-exported here
from fr_dist.models import iresnet as _iresnet
from fr_dist.models import mobilefacenet as _mobilefacenet
from fr_dist.models import vit as _vit
from fr_dist.models.iresnet import IRESNET_LAYERS, IResNet
from fr_dist.models.mobilefacenet import MobileFaceNet
from fr_dist.models.registry import (
    apply_channels_last,
    create_backbone,
    list_backbones,
    register_backbone,
)
from fr_dist.models.vit import VIT_CONFIGS, VisionTransformer

__all__ = [
    "create_backbone",
    "list_backbones",
    "register_backbone",
    "apply_channels_last",
    "IResNet",
    "MobileFaceNet",
    "VisionTransformer",
    "IRESNET_LAYERS",
]

for _depth in IRESNET_LAYERS:
    register_backbone(f"iresnet{_depth}")(_iresnet.iresnet_depth(_depth))
register_backbone("iresnet2060")(_iresnet.iresnet2060)
register_backbone("iresnet")(_iresnet.iresnet)
register_backbone("iresnet_tiny")(_iresnet.iresnet_tiny)
register_backbone("mobilefacenet")(_mobilefacenet.mobilefacenet)
register_backbone("mobilefacenet_large")(_mobilefacenet.mobilefacenet_large)
for _name in VIT_CONFIGS:
    register_backbone(_name)(_vit.vit_factory(_name))
