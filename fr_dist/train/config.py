"""Typed run configuration: the root :class:`Config`, assembled from the components' own sections.

Each component declares its section beside its code, as a pydantic dataclass whose fields carry
their type (``Literal`` choices), default, constraints and a docstring; a rule spanning several
fields is a model validator on the class owning them all::

    model       ModelConfig       fr_dist/models/registry.py
    head        HeadConfig        here; its sphereface2 / partial_fc sections in fr_dist/heads/
    data        DataConfig        fr_dist/data/loader.py (with data.synthetic: SyntheticConfig)
    train       TrainConfig       fr_dist/train/trainer_config.py
    checkpoint  CheckpointConfig  fr_dist/checkpoint/manager.py
    dist        DistConfig        fr_dist/runtime.py
    eval, deepspeed               here

Loading (YAML recipes with ``defaults``, dotted overrides), saving and ``--help-keys`` are
:mod:`fr_dist.train.config_load`. ``data.batch_size`` is per rank and per micro-step (global
batch per optimizer step = batch_size x world_size x grad_accum); schedules count optimizer steps.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Optional

from pydantic import Field, model_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

from fr_dist.checkpoint.manager import CheckpointConfig
from fr_dist.config_base import SECTION_CONFIG
from fr_dist.data.loader import DataConfig, SyntheticConfig
from fr_dist.errors import ConfigError
from fr_dist.heads import list_heads
from fr_dist.heads.losses.partial_fc import PartialFCConfig
from fr_dist.heads.losses.sphereface2 import SphereFace2Config
from fr_dist.heads.registry import head_class
from fr_dist.models.registry import ModelConfig
from fr_dist.runtime import DistConfig
from fr_dist.train.trainer_config import TrainConfig

__all__ = [
    "Config",
    "ModelConfig",
    "HeadConfig",
    "SphereFace2Config",
    "PartialFCConfig",
    "DataConfig",
    "SyntheticConfig",
    "TrainConfig",
    "CheckpointConfig",
    "EvalConfig",
    "DeepSpeedConfig",
    "DistConfig",
    "ConfigError",
    "validate_against_dataset",
]

_SECTION = SECTION_CONFIG
_HEADS = tuple(list_heads())


def _head_kwargs(self, name: Optional[str] = None) -> dict:
    """Constructor arguments of head ``name`` (default: the selected one) for
    :func:`fr_dist.heads.create_head`: every field of its section."""
    return dataclasses.asdict(getattr(self, name or self.name))  # the section named as the loss


def _head_config() -> type:
    """``head``: the loss (``head.name``, a registry choice), the GEMM dtype, and one section per
    registered loss, ``head.<loss>.*``, its head class's own ``Config``: a new loss file adds its
    section here by its registry line alone."""
    fields = [
        (
            "name",
            Literal[_HEADS],
            Field("sphereface2", description=f"Classifier head: {' | '.join(_HEADS)}."),
        ),
        (
            "dtype",
            Literal["fp32", "bf16"],
            Field(
                "fp32", description="Classifier matmul precision: fp32 | bf16 (the loss math is always fp32)."
            ),
        ),
    ]
    for name in _HEADS:
        section = head_class(name).Config
        doc = f"{head_class(name).__name__} hyper-parameters (used when head.name={name})."
        fields.append((name, section, Field(default_factory=section, description=doc)))
    cls = dataclasses.make_dataclass("HeadConfig", fields, namespace={"head_kwargs": _head_kwargs})
    cls.__module__ = __name__
    return pydantic_dataclass(cls, config=_SECTION)


HeadConfig = _head_config()


@pydantic_dataclass(config=_SECTION)
class EvalConfig:
    every: int = Field(0, ge=0)
    """Verify every N optimizer steps (0 = only at the end, when bins are given)."""
    bins: list[str] = Field(default_factory=list)
    """insightface .bin verification pair files (lfw.bin, cfp_fp.bin, agedb_30.bin, ...)."""
    batch_size: int = Field(128, ge=1)
    """Images per rank per evaluation forward."""
    nfolds: int = Field(10, ge=2)
    """Folds of the verification protocol (>= 2: k-fold threshold selection)."""
    flip: bool = True
    """Add the embedding of the flipped image (insightface protocol)."""
    keep_best: bool = True
    """Keep the best-accuracy backbone in RUN/best/."""
    plot_dir: Optional[str] = None
    """Write each set's ROC after every verification (<set>_roc.png + <set>_roc.json), in this folder
    relative to the run directory (null = no figures; needs matplotlib, checked at start-up)."""


@pydantic_dataclass(config=_SECTION)
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 1
    """ZeRO stage 0..3 for the backbone (the classifier shards stay outside DeepSpeed)."""
    bf16: bool = True
    """bf16 training inside DeepSpeed (CPU and GPU)."""
    fp16: bool = False
    """fp16 inside DeepSpeed (GPU only; refused on CPU; exclusive with bf16)."""
    config: dict[str, Any] = Field(default_factory=dict)
    """Extra raw DeepSpeed config merged in last (e.g. {zero_optimization: {overlap_comm: true}})."""

    @model_validator(mode="after")
    def _one_precision(self):
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are both true: choose one")
        return self


@pydantic_dataclass(config=_SECTION)
class Config:
    output_dir: str = "runs/demo"
    """Run directory (config.yaml, metrics.jsonl, tb/, checkpoints/<step>/)."""
    seed: int = 0
    """Global seed (backbone init, classifier init, data order)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto (CUDA when available) | cpu | cuda."""
    engine: Literal["ddp", "deepspeed"] = "ddp"
    """Backbone data parallelism: ddp | deepspeed."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """Backbone."""
    head: HeadConfig = Field(default_factory=HeadConfig)
    """Class-sharded classifier head."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Dataset and loader."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Optimisation, schedule, AMP, logging."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Checkpoints and resume."""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    """Verification during / after training."""
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    """DeepSpeed engine options (engine: deepspeed)."""
    dist: DistConfig = Field(default_factory=DistConfig)
    """Process group: collective and rendezvous timeouts."""

    @model_validator(mode="after")
    def _across_sections(self):
        if self.device == "cpu" and self.train.amp == "fp16":
            raise ValueError("train.amp=fp16 needs CUDA (GradScaler); use train.amp=bf16 on CPU")
        if self.device == "cpu" and self.engine == "deepspeed" and self.deepspeed.fp16:
            raise ValueError(
                "deepspeed.fp16=true needs CUDA (DeepSpeed refuses fp16 on CPU); use deepspeed.bf16"
            )
        # head.<loss>.fused_update with train.grad_accum > 1 (or an optimizer the pass does not implement) is
        # not refused here: the trainer builds the unfused head then and warns once
        # (fr_dist.train.resume.head_build_kwargs)
        return self

    def to_dict(self) -> dict:
        """Plain nested dict (YAML/JSON serialisable)."""
        return dataclasses.asdict(self)


def validate_against_dataset(
    cfg: Config, dataset_num_classes: int, dataset_max_label: Optional[int] = None
) -> None:
    """``data.num_classes`` must cover every label of the dataset; call before starting workers.

    Args:
        dataset_num_classes: classes the dataset declares (property file / header).
        dataset_max_label: the largest label actually read from the records (labels are
            0-based), or None when the labels were not read: then only the declared count is
            checked. Passing ``dataset_num_classes - 1`` checks nothing more than None.
    """
    if dataset_max_label is None:
        dataset_max_label = dataset_num_classes - 1
    k = cfg.data.num_classes
    if k:
        if k < dataset_num_classes or k <= dataset_max_label:
            need = max(dataset_num_classes, dataset_max_label + 1)
            raise ConfigError(
                f"data.num_classes={k} is smaller than the dataset needs: {cfg.data.rec} has "
                f"{dataset_num_classes} classes with labels up to {dataset_max_label}; "
                f"set data.num_classes >= {need} or 0 (= read from the dataset)"
            )
    elif dataset_max_label >= dataset_num_classes:
        raise ConfigError(
            f"dataset {cfg.data.rec} declares {dataset_num_classes} classes but has labels up to "
            f"{dataset_max_label}: its property file is inconsistent; set data.num_classes >= "
            f"{dataset_max_label + 1}"
        )
    if dataset_num_classes < 1:
        raise ConfigError(f"dataset {cfg.data.rec} has no classes")
