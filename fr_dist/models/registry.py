"""Backbone registry + factory (timm style).

    from fr_dist.models import create_backbone, list_backbones, register_backbone

    net = create_backbone("iresnet50")                      # insightface r50, 512-d, 112x112
    net = create_backbone("iresnet", layers=[1, 1, 1, 1], width=16, stem_stride=2)  # CPU demo
    net = create_backbone("timm/convnext_atto", embedding_size=256)  # needs the ``timm`` extra

Every backbone maps ``[N, 3, input_size, input_size]`` images in [-1, 1] to ``[N, embedding_size]``
embeddings and exposes ``.embedding_size`` and ``.input_size``.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from collections.abc import Mapping
from typing import Any, Callable

import torch
import torch.nn as nn

__all__ = [
    "register_backbone",
    "create_backbone",
    "build_backbone",
    "check_backbone_args",
    "list_backbones",
    "apply_channels_last",
]

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


# arguments create_backbone passes to every backbone (besides its own **kwargs)
_COMMON_ARGS = ("embedding_size", "input_size", "dropout", "activation_checkpointing")


def _lookup(name: str) -> Callable[..., nn.Module]:
    if name not in _REGISTRY:
        near = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"unknown backbone {name!r}{hint}; known backbones: {list_backbones()}")
    return _REGISTRY[name]


def _check_kwargs(name: str, fn: Callable, kwargs) -> None:
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


def check_backbone_args(name: str, kwargs: Mapping[str, Any]) -> None:
    """Raise what :func:`create_backbone` would for ``name`` and its backbone-specific ``kwargs``
    (unknown name, unknown argument) without building anything. ``timm/...`` names are checked
    when built (timm is an optional extra)."""
    if name.startswith(TIMM_PREFIX):
        if len(name) == len(TIMM_PREFIX):
            raise ValueError(f"backbone {name!r} needs a timm model name after {TIMM_PREFIX}")
        return
    _check_kwargs(name, _lookup(name), [*_COMMON_ARGS, *kwargs])


def create_backbone(
    name: str,
    embedding_size: int = 512,
    input_size: int = 112,
    dropout: float = 0.0,
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
        activation_checkpointing: recompute each residual stage in the backward.
        channels_last: convert to channels-last memory format (:func:`apply_channels_last`).
        **kwargs: backbone-specific arguments (e.g. ``layers``, ``width`` for ``iresnet``).

    Raises:
        ValueError: unknown name (lists the known ones and the nearest match).
        TypeError: an argument the backbone does not take.
        ImportError: ``timm/...`` without the ``timm`` extra installed.
    """
    check_backbone_args(name, kwargs)
    common = dict(
        embedding_size=embedding_size,
        input_size=input_size,
        dropout=dropout,
        activation_checkpointing=activation_checkpointing,
    )
    if name.startswith(TIMM_PREFIX):
        from fr_dist.models.timm_backbone import TimmBackbone

        model = TimmBackbone(name[len(TIMM_PREFIX) :], **common, **kwargs)
    else:
        model = _REGISTRY[name](**common, **kwargs)
    if channels_last:
        model = apply_channels_last(model)
    return model


def build_backbone(model: Any, **overrides) -> nn.Module:
    """The backbone a ``model`` config section describes: a :class:`~fr_dist.train.config.ModelConfig`
    or its dict form (as saved in a run's ``config.yaml``; missing flags are off).

    ``overrides`` replace :func:`create_backbone` arguments (e.g. ``channels_last=False``).
    """
    m = model if isinstance(model, Mapping) else dataclasses.asdict(model)
    args = dict(
        embedding_size=m["embedding_size"],
        input_size=m["input_size"],
        dropout=m.get("dropout", 0.0),
        activation_checkpointing=m.get("activation_checkpointing", False),
        channels_last=m.get("channels_last", False),
    )
    args.update(overrides)
    return create_backbone(m["name"], **args, **dict(m.get("kwargs") or {}))
