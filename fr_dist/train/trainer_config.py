"""The ``train`` section of the run config: optimisation, schedule, AMP, logging of the trainer.

Beside :mod:`fr_dist.train.trainer` rather than inside it: the trainer imports the assembled
config (:mod:`fr_dist.train.config`), which imports this class.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

from fr_dist.config_base import SECTION_CONFIG
from fr_dist.train.optim import OPTIMIZERS
from fr_dist.train.schedule import SCHEDULES

__all__ = ["TrainConfig"]


@pydantic_dataclass(config=SECTION_CONFIG)
class TrainConfig:
    """``train``: schedules count optimizer steps; ``min_lr`` is a fraction of the peak LR."""

    epochs: int = Field(20, ge=0)
    """Epochs over the dataset (ignored when max_steps > 0)."""
    max_steps: int = Field(0, ge=0)
    """Optimizer steps to train; 0 = epochs x optimizer steps per epoch."""
    grad_accum: int = Field(1, ge=1)
    """Micro-steps (forward/backward) per optimizer step."""
    optimizer: Literal[OPTIMIZERS] = "sgd"
    """Optimizer of backbone and classifier: sgd | adamw."""
    lr: float = Field(0.1, gt=0)
    """Backbone peak learning rate (after warmup)."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """SGD momentum, in [0, 1)."""
    nesterov: bool = False
    """SGD Nesterov momentum."""
    weight_decay: float = Field(5e-4, ge=0)
    """Weight decay (not applied to BN/PReLU weights and biases: parameters with ndim <= 1)."""
    head_lr: Optional[float] = Field(None, gt=0)
    """Classifier learning rate; null = lr."""
    head_weight_decay: Optional[float] = Field(None, ge=0)
    """Classifier weight decay; null = weight_decay (never applied to SphereFace2's bias b)."""
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas [beta1, beta2], each in [0, 1)."""
    schedule: Literal[SCHEDULES] = "poly"
    """LR decay after the warmup: poly | cosine | step."""
    warmup_epochs: float = Field(0.0, ge=0)
    """Linear warmup (from 0) length in epochs."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup length in optimizer steps (wins over warmup_epochs when > 0)."""
    poly_power: float = Field(2.0, gt=0)
    """Power of the polynomial decay (1 - progress)^power (insightface: 2)."""
    milestones: list[float] = Field(default_factory=list)
    """Step schedule: epochs at which the LR is multiplied by gamma (increasing)."""
    gamma: float = Field(0.1, gt=0, le=1)
    """Step schedule factor, in (0, 1]."""
    min_lr: float = 0.0
    """Final LR of poly/cosine as a fraction of the peak LR, in [0, 1]."""
    amp: Literal["none", "bf16", "fp16"] = "none"
    """Mixed precision of the backbone: none | bf16 | fp16 (fp16 needs CUDA; uses a GradScaler)."""
    clip_grad_norm: float = Field(5.0, ge=0)
    """Backbone gradient-norm clip (0 = off)."""
    log_every: int = Field(10, ge=1)
    """Log (progress line, metrics.jsonl, TensorBoard) every N optimizer steps."""
    max_nonfinite_steps: int = Field(5, ge=1)
    """Abort after this many non-finite (skipped) steps in a row."""
    tensorboard: bool = True
    """Write TensorBoard scalars to RUN/tb."""
    on_resize: Literal["keep_per_rank_batch_scale_lr", "keep_global_batch"] = "keep_per_rank_batch_scale_lr"
    """A resume on another world size than the checkpoint's (elastic restart, a node lost or added):
    keep_per_rank_batch_scale_lr = keep data.batch_size and grad_accum, scale the LRs linearly with the
    global batch (peak LR = lr x global batch / the run's first global batch) | keep_global_batch = keep
    the global batch and LRs by changing grad_accum (old global batch / (batch_size x new world size);
    refused when not a whole number, or with the fused head update, which cannot accumulate)."""

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: list[float]) -> list[float]:
        if len(v) != 2 or not all(0 <= b < 1 for b in v):
            raise ValueError("must be two numbers in [0, 1)")
        return v

    @field_validator("milestones")
    @classmethod
    def _milestones(cls, v: list[float]) -> list[float]:
        if any(m < 0 for m in v) or any(a >= b for a, b in zip(v, v[1:])):
            raise ValueError("must be strictly increasing epochs >= 0")
        return v

    @field_validator("min_lr")
    @classmethod
    def _min_lr(cls, v: float) -> float:
        if not 0 <= v <= 1:
            raise ValueError("is a fraction of the peak LR and must be in [0, 1]")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.epochs == 0 and self.max_steps == 0:
            raise ValueError("epochs and max_steps are both 0: nothing to train")
        if self.nesterov and self.optimizer == "sgd" and self.momentum == 0:
            raise ValueError("nesterov=true needs momentum > 0")
        if self.max_steps == 0 and self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} is longer than epochs={self.epochs}")
        if self.max_steps > 0 and self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} is longer than max_steps={self.max_steps}")
        if self.schedule == "step" and not self.milestones:
            raise ValueError("schedule=step needs milestones, e.g. [10, 16]")
        return self
