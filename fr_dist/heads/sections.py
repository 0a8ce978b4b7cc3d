"""The config keys a loss's ``head.<loss>`` section shares with every loss of its family: one base dataclass per
family (:class:`SoftmaxFamilyConfig`, :class:`BinaryFamilyConfig`), which a loss's ``Config`` subclasses with
its own hyper-parameters (heads/losses/<loss>.py). The keys are the family head's keywords
(:class:`~fr_dist.heads.softmax.SoftmaxHead`, :class:`~fr_dist.heads.binary_head.BinaryHead`), checked by the
head's own rules; their descriptions are given in ``Field`` (attribute docstrings are not inherited).
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import Field, TypeAdapter, ValidationError, model_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass
from pydantic_core import ArgsKwargs

from fr_dist.config_base import SECTION_CONFIG
from fr_dist.heads.binary_head import KERNELS, PROXY_DTYPES, _check_fused_options

__all__ = ["BinaryFamilyConfig", "LEAN_CONFIG_DEFAULTS", "SoftmaxFamilyConfig", "unfused_means_fp32"]

# The lean update a binary loss's config section defaults to (its head constructor's own default stays the
# unfused fp32 path): the proxies and their momentum in bf16, updated inside the pass (the settings
# fr_dist.plan's capacity headline counts); the trainer falls back where the settings cannot use it.
LEAN_CONFIG_DEFAULTS = dict(fused_update=True, proxy_dtype="bf16", master_weights=False)


def unfused_means_fp32(data):
    """A config section's ``mode="before"`` validator: ``fused_update=false`` given without ``proxy_dtype``
    means fp32 proxies (bf16 rows need the in-pass update), so turning the lean default off is one key."""
    kwargs = (data.kwargs or {}) if isinstance(data, ArgsKwargs) else data
    if not isinstance(kwargs, dict) or "proxy_dtype" in kwargs or "fused_update" not in kwargs:
        return data
    try:
        off = TypeAdapter(bool).validate_python(kwargs["fused_update"]) is False
    except ValidationError:
        return data  # not a boolean: the field's own validation reports it
    if off:
        kwargs = {**kwargs, "proxy_dtype": "fp32"}
        return ArgsKwargs(data.args, kwargs) if isinstance(data, ArgsKwargs) else kwargs
    return data


@pydantic_dataclass(config=SECTION_CONFIG)
class SoftmaxFamilyConfig:
    """The keys every softmax loss's ``head.<loss>`` section has besides its hyper-parameters (the keywords of
    :class:`~fr_dist.heads.softmax.SoftmaxHead`; defaults: its own). A loss's section subclasses it and adds its hyper-parameters."""

    sample_rate: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Partial-FC rate of class centres kept per step, in (0, 1]; 1 = plain model parallel.",
    )
    chunk_size: Optional[Annotated[int, Field(ge=1)]] = Field(
        None,
        description="Classes per chunk of the fused softmax (online max / sum-exp, recompute in the backward, "
        "never more than [W*B, chunk_size] logits alive); null = materialise the [W*B, n_local] block once "
        "(faster).",
    )


@pydantic_dataclass(config=SECTION_CONFIG)
class BinaryFamilyConfig:
    """The keys every binary loss's ``head.<loss>`` section has besides its hyper-parameters (the keywords of
    :class:`~fr_dist.heads.binary_head.BinaryHead`; defaults: its own, except the lean update, :data:`LEAN_CONFIG_DEFAULTS`). A loss's
    section subclasses it and adds its hyper-parameters."""

    chunk_size: int = Field(
        0,
        ge=0,
        description="Classes per chunk of the fused single-pass loss (0 = automatic from a ~1-2 MB budget).",
    )
    fused_update: bool = Field(
        LEAN_CONFIG_DEFAULTS["fused_update"],
        description="Update the class proxies inside the head's pass (train.optimizer: SGD with train.momentum / "
        "nesterov, or AdamW with train.betas; the head weight decay and LR schedule): no [n, D] gradient. "
        "Default true here (the head constructor's own default is false). Needs train.grad_accum=1 and a "
        "train.optimizer the pass implements (sgd | adamw): otherwise the trainer falls back to the unfused "
        "update with fp32 proxies and warns once, naming why. false alone also makes proxy_dtype fp32. "
        "With negative sampling the update is lazy (unused rows keep their state).",
    )
    proxy_dtype: Literal[PROXY_DTYPES] = Field(
        LEAN_CONFIG_DEFAULTS["proxy_dtype"],
        description="Storage of proxies and their momentum: fp32 | bf16 (compute stays fp32; needs "
        "fused_update). Default bf16 here (the head constructor's own default is fp32); fp32 when "
        "fused_update=false is given without it. bf16 with fused_update=false, both given, is refused.",
    )
    master_weights: bool = Field(
        LEAN_CONFIG_DEFAULTS["master_weights"],
        description="With proxy_dtype=bf16: keep an fp32 master copy of the proxies (updates applied to it). "
        "Default false, as the head's and the planner's headline.",
    )
    sample_rate: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Negative sampling: keep all positives plus int(sample_rate x n_local) random negatives "
        "per rank, weighted by 1/p (unbiased). 1 = all classes.",
    )
    num_negatives: int = Field(
        0,
        ge=0,
        description="Negative sampling with a fixed number of negatives per rank (0 = off; exclusive with "
        "sample_rate).",
    )
    kernel: Literal[KERNELS] = Field(
        "auto",
        description="Elementwise part of the fused chunk: auto (a Triton kernel on CUDA when triton is "
        "installed, else torch ops) | eager | triton.",
    )

    _unfused_means_fp32 = model_validator(mode="before")(unfused_means_fp32)

    @model_validator(mode="after")
    def _check_family_options(self):
        if self.proxy_dtype != "fp32" and not self.fused_update:
            raise ValueError(
                f"proxy_dtype={self.proxy_dtype} needs fused_update=true (only the in-pass update steps "
                "bf16 rows); with fused_update=false set proxy_dtype=fp32 as well"
            )
        options = (self.chunk_size, self.fused_update, self.proxy_dtype, self.master_weights)
        _check_fused_options(True, *options, self.sample_rate, self.num_negatives)  # the head's own rules
        return self
