"""Typed run configuration: the schema, dataclasses with a docstring per field.

Loading (YAML + dotted overrides), checking, saving and ``--help-keys`` live in
:mod:`fr_dist.train.config_load`; this module is the schema they read. Head hyper-parameter
defaults are read from the head constructors (one source), so a changed default there is the
config's default too.

Semantics worth knowing: ``data.batch_size`` is per rank and per micro-step (global batch per
optimizer step = batch_size x world_size x grad_accum); schedules count optimizer steps;
``train.min_lr`` is a fraction of the peak LR.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Optional

from fr_dist.errors import ConfigError
from fr_dist.heads import PartialFCHead, SphereFace2Head

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
    "ConfigError",
    "validate_against_dataset",
    "CHOICES",
    "all_choices",
]


def _defaults(cls) -> dict[str, Any]:
    """Keyword defaults of ``cls``'s constructor: the one place head hyper-parameters are written."""
    params = inspect.signature(cls).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


_SF2, _PFC = _defaults(SphereFace2Head), _defaults(PartialFCHead)

# ----------------------------------------------------------------------------- schema


@dataclass
class SphereFace2Config:
    lam: float = _SF2["lam"]
    """lambda in (0, 1): weight of the positive term vs the negatives (OpenSphere's lamb)."""
    r: float = _SF2["r"]
    """Scale r of the logits (> 0)."""
    m: float = _SF2["m"]
    """Margin m (a cosine for C, an angle in radians for A, a multiplier for M)."""
    t: float = _SF2["t"]
    """Exponent t of the similarity adjustment g(z) = 2((z+1)/2)^t - 1 (> 0; 1 = off)."""
    lw: float = _SF2["lw"]
    """Loss weight (OpenSphere's lw), multiplies the loss (> 0)."""
    margin: str = _SF2["margin"]
    """Margin type: C (additive cosine) | A (additive angular) | M (multiplicative angular)."""
    grad: str = _SF2["grad"]
    """detached (OpenSphere: d logit / d cos = r) | exact (gradient through g)."""
    chunk_size: int = 0
    """Classes per chunk of the fused single-pass loss (0 = automatic from a ~1-2 MB budget)."""
    fused_update: bool = False
    """Update the class proxies inside the head's pass (train.optimizer: SGD with train.momentum /
    nesterov, or AdamW with train.betas; the head weight decay and LR schedule): no [n, D] gradient.
    Needs grad_accum=1. With negative sampling the update is lazy (unused rows keep their state)."""
    proxy_dtype: str = "fp32"
    """Storage of proxies and their momentum: fp32 | bf16 (compute stays fp32; needs fused_update)."""
    master_weights: bool = False
    """With proxy_dtype=bf16: keep an fp32 master copy of the proxies (updates applied to it)."""
    sample_rate: float = 1.0
    """Negative sampling: keep all positives plus int(sample_rate x n_local) random negatives per rank,
    weighted by 1/p (unbiased). 1 = all classes."""
    num_negatives: int = 0
    """Negative sampling with a fixed number of negatives per rank (0 = off; exclusive with sample_rate)."""
    kernel: str = "auto"
    """Elementwise part of the fused chunk: auto (a Triton kernel on CUDA when triton is installed,
    else torch ops) | eager | triton."""


@dataclass
class PartialFCConfig:
    margin: str = _PFC["margin"]
    """arcface (cos(theta + m2)) | cosface (cos - m3) | combined (cos(m1 theta + m2) - m3)."""
    s: float = _PFC["s"]
    """Logit scale s (> 0)."""
    m1: float = _PFC["m1"]
    """Multiplicative angular margin (combined only)."""
    m2: float = _PFC["m2"]
    """Additive angular margin in radians (arcface, combined)."""
    m3: float = _PFC["m3"]
    """Additive cosine margin (cosface, combined); insightface's CosFace uses 0.4."""
    sample_rate: float = _PFC["sample_rate"]
    """Partial-FC rate of class centres kept per step, in (0, 1]; 1 = plain model parallel."""
    grad: str = _PFC["grad"]
    """straight_through (insightface ArcFace) | exact (gradient through the margin)."""
    chunk_size: Optional[int] = _PFC["chunk_size"]
    """Classes per chunk of the fused softmax (online max / sum-exp, recompute in the backward, never
    more than [W*B, chunk_size] logits alive); null = materialise the [W*B, n_local] block once (faster)."""


@dataclass
class HeadConfig:
    name: str = "sphereface2"
    """Classifier head: sphereface2 | partial_fc."""
    dtype: str = "fp32"
    """Classifier matmul precision: fp32 | bf16 (the loss math is always fp32)."""
    sphereface2: SphereFace2Config = field(default_factory=SphereFace2Config)
    """SphereFace2 hyper-parameters (used when head.name=sphereface2)."""
    partial_fc: PartialFCConfig = field(default_factory=PartialFCConfig)
    """Partial-FC hyper-parameters (used when head.name=partial_fc)."""

    def head_kwargs(self, name: Optional[str] = None) -> dict:
        """Constructor arguments of head ``name`` (default: the selected one) for
        :func:`fr_dist.heads.create_head`: every field of its section."""
        section = self.sphereface2 if (name or self.name) == "sphereface2" else self.partial_fc
        return dataclasses.asdict(section)


@dataclass
class ModelConfig:
    name: str = "iresnet50"
    """Backbone registry name: iresnet18/34/50/100/200, iresnet (configurable), mobilefacenet, timm/<name>."""
    embedding_size: int = 512
    """Embedding dimension D."""
    input_size: int = 112
    """Square input image size in pixels."""
    dropout: float = 0.0
    """Dropout probability before the embedding FC, in [0, 1)."""
    activation_checkpointing: bool = False
    """Recompute stage activations in the backward to save memory."""
    channels_last: bool = False
    """Use channels-last memory format (faster convolutions on recent GPUs)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra backbone constructor arguments (e.g. layers, width, stem_stride for `iresnet`)."""


@dataclass
class SyntheticConfig:
    generate: bool = False
    """Generate the synthetic face-identity RecordIO set into out_dir when data.rec is missing."""
    out_dir: str = "data/synthetic"
    """Where the synthetic set is written (train.rec/.idx/property, heldout.bin)."""
    num_identities: int = 1000
    """Training identities (classes)."""
    images_per_identity: int = 16
    """Images per training identity."""
    heldout_identities: int = 200
    """Identities kept out of training for the verification pairs."""
    heldout_pairs: int = 1000
    """Verification pairs in heldout.bin (half genuine)."""
    seed: int = 1234
    """Generator seed (the dataset is a pure function of it)."""


@dataclass
class DataConfig:
    rec: str = "data/synthetic/train.rec"
    """MXNet RecordIO file (train.idx and property beside it)."""
    num_classes: int = 0
    """Classes K; 0 = read from the dataset; else must be >= the dataset's classes."""
    batch_size: int = 128
    """Images per rank per micro-step (global batch = batch_size x world size x grad_accum)."""
    num_workers: int = 2
    """DataLoader worker processes per rank (torch loader; 0 = load in the main process)."""
    loader: str = "torch"
    """Loader backend: torch | dali (GPU JPEG decode; needs the dali extra)."""
    flip: bool = True
    """Random horizontal flip augmentation."""
    drop_last: bool = True
    """Drop the incomplete last global batch of an epoch."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """Synthetic dataset generation (CPU demo, tests)."""


@dataclass
class TrainConfig:
    epochs: int = 20
    """Epochs over the dataset (ignored when max_steps > 0)."""
    max_steps: int = 0
    """Optimizer steps to train; 0 = epochs x optimizer steps per epoch."""
    grad_accum: int = 1
    """Micro-steps (forward/backward) per optimizer step."""
    optimizer: str = "sgd"
    """Optimizer of backbone and classifier: sgd | adamw."""
    lr: float = 0.1
    """Backbone peak learning rate (after warmup)."""
    momentum: float = 0.9
    """SGD momentum, in [0, 1)."""
    nesterov: bool = False
    """SGD Nesterov momentum."""
    weight_decay: float = 5e-4
    """Weight decay (not applied to BN/PReLU weights and biases: parameters with ndim <= 1)."""
    head_lr: Optional[float] = None
    """Classifier learning rate; null = lr."""
    head_weight_decay: Optional[float] = None
    """Classifier weight decay; null = weight_decay (never applied to SphereFace2's bias b)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas [beta1, beta2], each in [0, 1)."""
    schedule: str = "poly"
    """LR decay after the warmup: poly | cosine | step."""
    warmup_epochs: float = 0.0
    """Linear warmup (from 0) length in epochs."""
    warmup_steps: int = 0
    """Linear warmup length in optimizer steps (wins over warmup_epochs when > 0)."""
    poly_power: float = 2.0
    """Power of the polynomial decay (1 - progress)^power (insightface: 2)."""
    milestones: list[float] = field(default_factory=list)
    """Step schedule: epochs at which the LR is multiplied by gamma (increasing)."""
    gamma: float = 0.1
    """Step schedule factor, in (0, 1]."""
    min_lr: float = 0.0
    """Final LR of poly/cosine as a fraction of the peak LR, in [0, 1]."""
    amp: str = "none"
    """Mixed precision of the backbone: none | bf16 | fp16 (fp16 needs CUDA; uses a GradScaler)."""
    clip_grad_norm: float = 5.0
    """Backbone gradient-norm clip (0 = off)."""
    log_every: int = 10
    """Log (progress line, metrics.jsonl, TensorBoard) every N optimizer steps."""
    max_nonfinite_steps: int = 5
    """Abort after this many non-finite (skipped) steps in a row."""
    tensorboard: bool = True
    """Write TensorBoard scalars to RUN/tb."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save every N optimizer steps (0 = only at the end)."""
    keep: int = 3
    """Keep the newest N checkpoints (0 = keep all)."""
    resume: str = "none"
    """none | auto (newest complete checkpoint under output_dir) | a checkpoint folder."""
    save_at_end: bool = True
    """Save a checkpoint when training ends."""
    save_on_signal: bool = True
    """On SIGTERM/SIGUSR1 (Slurm preemption, torchrun shutdown) save a checkpoint at the next
    log step (ranks agree through a 1-element all-reduce every train.log_every steps) and stop."""


@dataclass
class EvalConfig:
    every: int = 0
    """Verify every N optimizer steps (0 = only at the end, when bins are given)."""
    bins: list[str] = field(default_factory=list)
    """insightface .bin verification pair files (lfw.bin, cfp_fp.bin, agedb_30.bin, ...)."""
    batch_size: int = 128
    """Images per rank per evaluation forward."""
    nfolds: int = 10
    """Folds of the verification protocol (>= 2)."""
    flip: bool = True
    """Add the embedding of the flipped image (insightface protocol)."""
    keep_best: bool = True
    """Keep the best-accuracy backbone in RUN/best/."""


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1
    """ZeRO stage 0..3 for the backbone (the classifier shards stay outside DeepSpeed)."""
    bf16: bool = True
    """bf16 training inside DeepSpeed (CPU and GPU)."""
    fp16: bool = False
    """fp16 inside DeepSpeed (GPU only; refused on CPU; exclusive with bf16)."""
    config: dict[str, Any] = field(default_factory=dict)
    """Extra raw DeepSpeed config merged in last (e.g. {zero_optimization: {overlap_comm: true}})."""


@dataclass
class DistConfig:
    timeout_s: float = 180.0
    """Process-group timeout in seconds: a collective that a rank does not join within it (hung,
    stopped or dead peer) raises CollectiveTimeout naming the collective, instead of hanging."""
    rendezvous_timeout_s: float = 300.0
    """Seconds to wait for every rank to join at start-up (init_process_group / TCP store)."""


@dataclass
class Config:
    output_dir: str = "runs/demo"
    """Run directory (config.yaml, metrics.jsonl, tb/, checkpoints/<step>/)."""
    seed: int = 0
    """Global seed (backbone init, classifier init, data order)."""
    device: str = "auto"
    """auto (CUDA when available) | cpu | cuda."""
    engine: str = "ddp"
    """Backbone data parallelism: ddp | deepspeed."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Backbone."""
    head: HeadConfig = field(default_factory=HeadConfig)
    """Class-sharded classifier head."""
    data: DataConfig = field(default_factory=DataConfig)
    """Dataset and loader."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation, schedule, AMP, logging."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints and resume."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Verification during / after training."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed engine options (engine: deepspeed)."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Process group: collective and rendezvous timeouts."""

    def to_dict(self) -> dict:
        """Plain nested dict (YAML/JSON serialisable)."""
        return dataclasses.asdict(self)


# Fixed option sets (registry-backed names -- head.name, margins, model.name -- are read from
# their registries in validate()).
CHOICES: dict[str, tuple] = {
    "device": ("auto", "cpu", "cuda"),
    "engine": ("ddp", "deepspeed"),
    "head.dtype": ("fp32", "bf16"),
    "data.loader": ("torch", "dali"),
    "train.amp": ("none", "bf16", "fp16"),
}


def all_choices() -> dict[str, tuple]:
    """:data:`CHOICES` plus the names owned by their modules (heads, margins, gradient modes,
    optimizers, schedules), read from there."""
    from fr_dist.heads import list_heads
    from fr_dist.heads.margins import SOFTMAX_MARGINS, SPHEREFACE2_MARGINS
    from fr_dist.heads.softmax import SOFTMAX_GRAD_MODES
    from fr_dist.heads.sphereface2 import GRAD_MODES, KERNELS
    from fr_dist.train.optim import OPTIMIZERS
    from fr_dist.train.schedule import SCHEDULES

    return dict(
        CHOICES,
        **{
            "head.name": tuple(list_heads()),
            "head.sphereface2.margin": tuple(SPHEREFACE2_MARGINS),
            "head.sphereface2.grad": tuple(GRAD_MODES),
            "head.sphereface2.kernel": tuple(KERNELS),
            "head.partial_fc.margin": tuple(SOFTMAX_MARGINS),
            "head.partial_fc.grad": tuple(SOFTMAX_GRAD_MODES),
            "train.optimizer": tuple(OPTIMIZERS),
            "train.schedule": tuple(SCHEDULES),
        },
    )


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
