"""Backbone registry + factory (timm style): ``create_backbone(name, **kw)``, ``list_backbones()``."""

from __future__ import annotations

import difflib
from typing import Callable

import torch.nn as nn

__all__ = ["register_backbone", "create_backbone", "list_backbones"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str):
    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def list_backbones() -> list[str]:
    return sorted(_REGISTRY) + ["timm/<model name>"]


def create_backbone(
    name: str,
    embedding_size: int = 512,
    input_size: int = 112,
    dropout: float = 0.0,
    activation_checkpointing: bool = False,
    **kwargs,
) -> nn.Module:
    """Build a backbone by name; it exposes ``.embedding_size`` and ``.input_size``."""
    common = dict(
        embedding_size=embedding_size,
        input_size=input_size,
        dropout=dropout,
        activation_checkpointing=activation_checkpointing,
    )
    if name.startswith("timm/"):
        from fr_dist.models.timm_backbone import TimmBackbone

        return TimmBackbone(name[len("timm/") :], **common, **kwargs)
    if name not in _REGISTRY:
        near = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"unknown backbone {name!r}{hint}; known backbones: {list_backbones()}")
    return _REGISTRY[name](**common, **kwargs)
