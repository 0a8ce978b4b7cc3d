"""Backbone registry + factory (timm style).

    from fr_dist.models import create_backbone, list_backbones, register_backbone

    net = create_backbone("iresnet50")                      # insightface r50, 512-d, 112x112
    net = create_backbone("iresnet", layers=[1, 1, 1, 1], width=16, stem_stride=2)  # CPU demo
    net = create_backbone("timm/convnext_atto", embedding_size=256)  # needs the ``timm`` extra

Every backbone maps ``[N, 3, input_size, input_size]`` images in [-1, 1] to ``[N, embedding_size]``
embeddings and exposes ``.embedding_size`` and ``.input_size``.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Callable

import torch
import torch.nn as nn

__all__ = ["register_backbone", "create_backbone", "list_backbones", "apply_channels_last"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
TIMM_PREFIX = "timm/"


def register_backbone(name: str, override: bool = False):
    """Decorator registering ``fn(**kwargs) -> nn.Module`` under ``name``."""

    def deco(fn):
        if name in _REGISTRY and not override:
            raise ValueError(f"backbone {name!r} registered twice (pass override=True to replace)")
        _REGISTRY[name] = fn
        return fn

    return deco


def list_backbones() -> list[str]:
    """Registered names, plus the ``timm/<model name>`` pattern."""
    return sorted(_REGISTRY) + [f"{TIMM_PREFIX}<model name>"]


def apply_channels_last(model: nn.Module) -> nn.Module:
    """Convert conv weights to channels-last (NHWC) memory format; faster convs on recent GPUs.

    Inputs need no conversion: a conv with channels-last weights returns channels-last outputs.
    Returns the same module (converted in place, as ``nn.Module.to`` does).
    """
    return model.to(memory_format=torch.channels_last)


def _check_kwargs(name: str, fn: Callable, kwargs: dict) -> None:
    """Fail with the backbone's name and accepted arguments instead of a bare TypeError."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins / C callables: let the call decide
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise TypeError(
            f"backbone {name!r} got unexpected argument(s) {unknown}; it accepts {sorted(params)}"
        )


def create_backbone(
    name: str,
    embedding_size: int = 512,
    input_size: int = 112,
    dropout: float = 0.0,
    fp16: bool = False,
    activation_checkpointing: bool = False,
    channels_last: bool = False,
    **kwargs,
) -> nn.Module:
    """Build a backbone by registry name or ``timm/<model name>``.

    Args:
        name: registry name (see :func:`list_backbones`) or ``timm/<timm model name>``.
        embedding_size: output dimension D.
        input_size: square input size (112 for insightface crops).
        dropout: dropout before the embedding FC.
        fp16: run the trunk under fp16 autocast as insightface's ``fp16=True`` does (the FC
            and final BN stay fp32). The trainer's AMP setting is the usual way instead.
        activation_checkpointing: recompute each residual stage in the backward.
        channels_last: convert to channels-last memory format (:func:`apply_channels_last`).
        **kwargs: backbone-specific arguments (e.g. ``layers``, ``width`` for ``iresnet``).

    Raises:
        ValueError: unknown name (lists the known ones and the nearest match).
        TypeError: an argument the backbone does not take.
        ImportError: ``timm/...`` without the ``timm`` extra installed.
    """
    common = dict(
        embedding_size=embedding_size,
        input_size=input_size,
        dropout=dropout,
        fp16=fp16,
        activation_checkpointing=activation_checkpointing,
    )
    if name.startswith(TIMM_PREFIX):
        from fr_dist.models.timm_backbone import TimmBackbone

        model = TimmBackbone(name[len(TIMM_PREFIX) :], **common, **kwargs)
    else:
        if name not in _REGISTRY:
            near = difflib.get_close_matches(name, list(_REGISTRY), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ValueError(f"unknown backbone {name!r}{hint}; known backbones: {list_backbones()}")
        fn = _REGISTRY[name]
        _check_kwargs(name, fn, {**common, **kwargs})
        model = fn(**common, **kwargs)
    if channels_last:
        model = apply_channels_last(model)
    return model
