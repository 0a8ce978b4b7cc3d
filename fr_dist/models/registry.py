"""Backbone registry + factory (timm style).

    from fr_dist.models import create_backbone, list_backbones, register_backbone

    net = create_backbone("iresnet50")                      # insightface r50, 512-d, 112x112
    net = create_backbone("iresnet", layers=[1, 1, 1, 1], width=16, stem_stride=2)  # CPU demo
    net = create_backbone("vit_t", mask_ratio=0.0)           # insightface ViT-T, its arguments as kwargs
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

from fr_dist.config_base import SECTION_CONFIG
from fr_dist.models.timm_backbone import TimmBackbone

__all__ = [
    "register_backbone",
    "create_backbone",
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
    name: Any,
    embedding_size: int = 512,
    input_size: int = 112,
    dropout: float = 0.0,
    activation_checkpointing: bool = False,
    channels_last: bool = False,
    **kwargs,
) -> nn.Module:
    """Build a backbone by registry name or ``timm/<model name>``, or from a ``model`` config section.

    Args:
        name: registry name (see :func:`list_backbones`), ``timm/<timm model name>``, or a ``model``
            config section (the config object or its dict form, as a run's ``config.yaml`` saves it:
            ``name``, ``embedding_size``, ``input_size``, ``dropout``, ``activation_checkpointing``,
            ``channels_last``, ``kwargs``; missing flags are off). Explicit keyword arguments then
            replace the section's values (e.g. ``channels_last=False``).
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
    if not isinstance(name, str):  # a model config section
        return create_backbone(**_section_args(name), **kwargs)
    check_backbone_args(name, kwargs)
    common = dict(
        embedding_size=embedding_size,
        input_size=input_size,
        dropout=dropout,
        activation_checkpointing=activation_checkpointing,
    )
    if name.startswith(TIMM_PREFIX):
        model = TimmBackbone(name[len(TIMM_PREFIX) :], **common, **kwargs)
    else:
        model = _REGISTRY[name](**common, **kwargs)
    if channels_last:
        model = apply_channels_last(model)
    return model


def _section_args(model: Any) -> dict:
    """create_backbone arguments from a ``model`` config section (object or dict)."""
    m = model if isinstance(model, Mapping) else _as_dict(model)
    return dict(
        name=m["name"],
        embedding_size=m["embedding_size"],
        input_size=m["input_size"],
        dropout=m.get("dropout", 0.0),
        activation_checkpointing=m.get("activation_checkpointing", False),
        channels_last=m.get("channels_last", False),
        **dict(m.get("kwargs") or {}),
    )


def _as_dict(model: Any) -> dict:
    if dataclasses.is_dataclass(model):
        return dataclasses.asdict(model)
    return model.model_dump() if hasattr(model, "model_dump") else dict(vars(model))


# ----------------------------------------------------------------------------- config section
from pydantic import Field, field_validator, model_validator  # noqa: E402
from pydantic.dataclasses import dataclass as pydantic_dataclass  # noqa: E402


@pydantic_dataclass(config=SECTION_CONFIG)
class ModelConfig:
    """``model``: what :func:`build_backbone` builds; name and arguments checked as it checks them."""

    name: str = "iresnet50"
    """Backbone registry name: iresnet18/34/50/100/200/2060, iresnet (configurable), mobilefacenet, vit_t/s/b/l/h (and insightface's vit_*_dp005_mask* variants), timm/<name>."""
    embedding_size: int = Field(512, gt=0)
    """Embedding dimension D."""
    input_size: int = Field(112, gt=0)
    """Square input image size in pixels."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout probability before the embedding FC, in [0, 1)."""
    activation_checkpointing: bool = False
    """Recompute stage activations in the backward to save memory."""
    channels_last: bool = False
    """Use channels-last memory format (faster convolutions on recent GPUs)."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra backbone constructor arguments (e.g. layers, width, stem_stride for `iresnet`; embed_dim, depth, num_heads, mask_ratio for `vit_*`)."""

    @field_validator("name")
    @classmethod
    def _known_name(cls, name: str) -> str:
        if not name.startswith(TIMM_PREFIX) and name not in _REGISTRY:
            near = difflib.get_close_matches(name, list(_REGISTRY), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ValueError(f"is not one of {', '.join(list_backbones())}{hint}")
        return name

    @model_validator(mode="after")
    def _check_args(self):
        for k in sorted(set(self.kwargs) & {*_COMMON_ARGS, "channels_last"}):
            raise ValueError(f"kwargs.{k}: set it as model.{k}, not in model.kwargs")
        try:
            check_backbone_args(self.name, self.kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(str(e)) from None
        return self
