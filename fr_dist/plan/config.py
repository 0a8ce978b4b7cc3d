"""The planner's inputs (:class:`PlanConfig`) and where a training recipe gives each of them.

``plan_config_from_training(cfg)`` reads a loaded training config (``fr_dist.train.config_load``); the
planner only reads its attributes, so this module imports nothing of the training layer.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from functools import cache
from typing import Callable, Literal, get_args, get_origin, get_type_hints

from fr_dist.heads import list_heads  # the package import registers every loss
from fr_dist.plan.losses import loss_family

__all__ = [
    "PlanConfig",
    "DTYPE_BYTES",
    "BASELINES",
    "PFC_IMPLS",
    "RECIPE_KEYS",
    "parse_count",
    "choices",
    "recipe_key",
    "plan_config_from_training",
    "recipe_notes",
]

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

PfcImpl = Literal["v2", "v1", "fr_dist"]
PFC_IMPLS: tuple[str, ...] = get_args(PfcImpl)
# the side-by-side baselines of every plan: the binary family's product and the softmax family's reference
BASELINES = ("sphereface2", "partial_fc")


def __getattr__(name: str):
    """``HEADS``: the registered losses now (fr_dist.heads.list_heads), so one registered later counts."""
    if name == "HEADS":
        return tuple(list_heads())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _rule(default, text: str, ok: Callable) -> dataclasses.Field:
    """A field whose value must satisfy ``ok`` (``text`` says how, in the error)."""
    return field(default=default, metadata={"rule": text, "ok": ok})


@dataclass
class PlanConfig:
    identities: int = _rule(1_000_000, ">= 1", lambda v: int(v) >= 1)
    dim: int = _rule(512, ">= 1", lambda v: int(v) >= 1)
    gpus_per_node: int = _rule(8, ">= 1", lambda v: int(v) >= 1)
    nodes: int = _rule(1, ">= 1", lambda v: int(v) >= 1)
    batch: int = _rule(128, ">= 1", lambda v: int(v) >= 1)  # per GPU
    # a registered loss (fr_dist.heads.list_heads()); the plan is its family's, with its extra collectives
    head: str = "sphereface2"
    sample_rate: float = _rule(1.0, "in (0, 1]", lambda v: 0.0 < v <= 1.0)
    # SphereFace2 classes per chunk; 0 = as the head picks it (auto_chunk_size, per device)
    chunk_size: int = _rule(0, ">= 0 (0 = automatic)", lambda v: int(v) >= 0)
    # softmax family, fr_dist's head (pfc_impl fr_dist): classes per chunk of the online softmax; 0 = the
    # [N, S] block materialised once (the head's chunk_size null)
    softmax_chunk: int = _rule(0, ">= 0 (0 = materialised)", lambda v: int(v) >= 0)
    # sphereface2 storage of proxies + momentum (Partial FC: always fp32)
    proxy_dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    fused_update: bool = True
    fp32_master: bool = False
    optimizer: Literal["sgd", "adamw"] = "sgd"
    amp: Literal["none", "fp16", "bf16"] = "fp16"  # backbone autocast dtype
    # the head's GEMMs under autocast: Partial FC in the backbone's amp dtype (insightface fp16=True does),
    # SphereFace2 in bf16 (fr_dist's head.dtype=bf16: the fused pass takes bf16 GEMM operands, fp32 math)
    head_amp: bool = True
    backbone: str = "iresnet50"
    pfc_impl: PfcImpl = "v2"
    # dtype of the head's GEMMs: auto = as head_amp says (fp32 without it); or fp32 | bf16 | fp16 explicitly.
    head_compute: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # the fused SphereFace2 chunk's elementwise part: auto = the Triton kernel on a GPU profile (fr_dist's
    # kernel=auto on CUDA), torch ops on the cpu profile; or eager | triton
    sf2_kernel: Literal["auto", "eager", "triton"] = "auto"
    ddp_bucket_copy: bool = True  # DDP gradient buckets are a separate copy (gradient_as_bucket_view=False)

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def binary(self) -> bool:
        """The head's loss is of the binary family (the fused chunked pass), else softmax (Partial FC)."""
        return loss_family(self.head) == "binary"

    def validate(self) -> None:
        """Each field's ``Literal`` choices and the rule written beside it; ``head`` a registered loss of a
        family the planner models (the error lists the known names)."""
        try:
            loss_family(self.head)
        except ValueError as e:
            raise ValueError(f"head: {e}") from None
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            options = choices(f.name)
            if options and value not in options:
                raise ValueError(f"{f.name} must be one of {options}, got {value!r}")
            if "ok" in f.metadata and not f.metadata["ok"](value):
                raise ValueError(f"{f.name} must be {f.metadata['rule']}, got {value!r}")


def choices(name: str) -> tuple | None:
    """The values PlanConfig field ``name`` may take (its ``Literal`` hint; ``head``: the registered
    losses), or None when any."""
    if name == "head":
        return tuple(list_heads())
    return _literal_choices(name)


@cache
def _literal_choices(name: str) -> tuple | None:
    hint = get_type_hints(PlanConfig)[name]
    return get_args(hint) if get_origin(hint) is Literal else None


def parse_count(text) -> int:
    """'100M' -> 100_000_000, '1.5e8', '29M', '1.4M', '2K', '3B', '12345' -> int."""
    if isinstance(text, (int, float)):
        return int(text)
    s = str(text).strip().replace("_", "").replace(",", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgG]?)", s)
    if not m:
        raise ValueError(f"cannot read a count from {text!r} (examples: 100M, 1.5e8, 2K, 12345)")
    mult = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}[m.group(2).lower()]
    return int(round(float(m.group(1)) * mult))


# ---------------------------------------------------------------------------------------------------
# From a training recipe
# ---------------------------------------------------------------------------------------------------

# training key -> the PlanConfig field it gives. ``{head}`` is the recipe's head.name; ``{binary}`` the binary
# head whose fused-pass options are read: the recipe's own when its loss is of the binary family (uniface:
# head.uniface.*), else sphereface2's (the side-by-side plan of the binary baseline uses them); ``{softmax}``
# likewise the recipe's own softmax head, else partial_fc. A key the loss's section does not have leaves
# the planner's default; a null chunk_size of a softmax head is 0 (materialised).
RECIPE_KEYS: dict[str, str] = {
    "data.num_classes": "identities",  # 0 (= read from the dataset) gives nothing: --num-classes then
    "model.embedding_size": "dim",
    "data.batch_size": "batch",  # per rank per micro-step: what one step holds
    "model.name": "backbone",
    "train.optimizer": "optimizer",
    "train.amp": "amp",
    "head.name": "head",
    "head.dtype": "head_compute",  # fr_dist runs the head outside the backbone's autocast, in head.dtype
    "head.{head}.sample_rate": "sample_rate",
    "head.{binary}.chunk_size": "chunk_size",
    "head.{binary}.proxy_dtype": "proxy_dtype",
    "head.{binary}.fused_update": "fused_update",
    "head.{binary}.master_weights": "fp32_master",
    "head.{binary}.kernel": "sf2_kernel",
    "head.{softmax}.chunk_size": "softmax_chunk",
}

# What a recipe may set that the model does not plan: (key, is it set, what the plan assumes instead). The
# softmax family's chunked online softmax (head.<softmax loss>.chunk_size) is planned (softmax_chunk).
_NOT_MODELED: tuple[tuple[str, Callable, str], ...] = (
    ("engine", lambda c: c.engine != "ddp", "the backbone's memory is planned as DDP's (no ZeRO sharding)"),
    (
        "model.activation_checkpointing",
        lambda c: c.model.activation_checkpointing,
        "activations are planned as all stored",
    ),
    ("model.input_size", lambda c: c.model.input_size != 112, "the backbone is planned at 112x112"),
    ("model.kwargs", lambda c: bool(c.model.kwargs), "the backbone is planned with its default arguments"),
)

_MISSING = object()


def _get(cfg, key: str, default=None):
    """The value of dotted ``key`` in ``cfg``; ``default`` where a part is missing."""
    value = cfg
    for part in key.split("."):
        value = getattr(value, part, _MISSING)
        if value is _MISSING:
            return default
    return value


def recipe_key(key: str, head: str) -> str:
    """A RECIPE_KEYS / not-modelled key with ``{head}``, ``{binary}`` and ``{softmax}`` filled in for ``head``."""
    binary = loss_family(head) == "binary"
    return key.format(
        head=head, binary=head if binary else "sphereface2", softmax="partial_fc" if binary else head
    )


def plan_config_from_training(cfg, nodes: int = 1, gpus_per_node: int = 8, **overrides) -> PlanConfig:
    """The PlanConfig of training config ``cfg`` on ``nodes`` x ``gpus_per_node`` ranks: every field of
    :data:`RECIPE_KEYS` from the recipe, then ``overrides`` (PlanConfig fields given explicitly). The
    head is fr_dist's own (``pfc_impl="fr_dist"``). ``head.sphereface2.num_negatives`` becomes the
    sample rate it amounts to on the busiest rank."""
    head = cfg.head.name
    try:
        loss_family(head)
    except ValueError as e:
        raise ValueError(f"head.name={head!r}: {e}") from None
    values = {fld: _get(cfg, recipe_key(key, head), _MISSING) for key, fld in RECIPE_KEYS.items()}
    values = {k: v for k, v in values.items() if v is not _MISSING}
    if "softmax_chunk" in values:
        values["softmax_chunk"] = values["softmax_chunk"] or 0  # null: the block materialised
    if not values.get("identities"):
        values.pop("identities", None)
    negatives = _get(cfg, recipe_key("head.{binary}.num_negatives", head), 0)
    if loss_family(head) == "binary" and negatives and "sample_rate" not in overrides:
        identities = overrides.get("identities", values.get("identities"))
        if identities:
            n_local = -(-int(identities) // (nodes * gpus_per_node))
            values["sample_rate"] = min(1.0, negatives / n_local)
    values.update(nodes=nodes, gpus_per_node=gpus_per_node, pfc_impl="fr_dist")
    values.update(overrides)
    if "identities" not in values:
        raise ValueError(
            "data.num_classes=0 (read from the dataset) in the recipe: give --num-classes K "
            "or the override data.num_classes=K"
        )
    out = PlanConfig(**values)
    out.validate()
    return out


def recipe_notes(cfg) -> list[str]:
    """One line per recipe setting the plan does not model (and what it assumes instead)."""
    out = []
    for key, is_set, why in _NOT_MODELED:
        if is_set(cfg):
            key = recipe_key(key, cfg.head.name)
            out.append(f"{key}={_get(cfg, key)!r}: {why}")
    return out
