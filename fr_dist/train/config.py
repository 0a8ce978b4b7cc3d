"""Typed run configuration: dataclasses with a docstring per field, YAML + dotted CLI overrides.

    cfg = load_config("configs/demo_cpu.yaml", ["train.lr=0.05", "head.name=partial_fc"])

Validation runs before any process group exists: an unknown key (in the YAML or an override,
at any depth) names the nearest valid key, and impossible values say why.
``fr-dist config --help-keys`` prints every key with its default and documentation.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, get_type_hints

import yaml

__all__ = [
    "Config",
    "ConfigError",
    "load_config",
    "save_config",
    "field_docs",
    "format_help",
    "validate_against_dataset",
]


class ConfigError(ValueError):
    """A configuration mistake, reported before anything starts."""


@dataclass
class SphereFace2Config:
    lam: float = 0.7
    """lambda: weight of the positive term (OpenSphere alpha)."""
    r: float = 40.0
    """Scale r of the logits."""
    m: float = 0.4
    """Margin m (cosine for C, angle for A, multiplier for M)."""
    t: float = 3.0
    """Exponent t of the angular map g(z) = 2((z+1)/2)^t - 1."""
    lw: float = 50.0
    """Loss weight (OpenSphere lw)."""
    margin: str = "C"
    """Margin type: C (additive cosine) | A (additive angular) | M (multiplicative angular)."""
    grad: str = "detached"
    """detached (OpenSphere main: d logit / d cos = r) | exact (gradient through g)."""


@dataclass
class PartialFCConfig:
    margin: str = "arcface"
    """arcface (cos(theta + m2)) | cosface (cos - m3) | combined (cos(m1 theta + m2) - m3)."""
    s: float = 64.0
    """Logit scale s."""
    m1: float = 1.0
    """Multiplicative angular margin (combined only)."""
    m2: float = 0.5
    """Additive angular margin (arcface, combined)."""
    m3: float = 0.0
    """Additive cosine margin (cosface, combined)."""
    sample_rate: float = 1.0
    """Partial-FC negative sampling rate in (0, 1]; 1 = plain model parallel."""
    grad: str = "straight_through"
    """straight_through (insightface ArcFace) | exact."""


@dataclass
class HeadConfig:
    name: str = "sphereface2"
    """Classifier head: sphereface2 | partial_fc."""
    dtype: str = "fp32"
    """Classifier matmul precision: fp32 | bf16 (loss math is always fp32)."""
    sphereface2: SphereFace2Config = field(default_factory=SphereFace2Config)
    """SphereFace2 hyper-parameters."""
    partial_fc: PartialFCConfig = field(default_factory=PartialFCConfig)
    """Partial-FC hyper-parameters."""


@dataclass
class ModelConfig:
    name: str = "iresnet50"
    """Backbone registry name (fr-dist: iresnet18/34/50/100/200, iresnet, mobilefacenet, timm/<name>)."""
    embedding_size: int = 512
    """Embedding dimension D."""
    input_size: int = 112
    """Square input image size."""
    dropout: float = 0.0
    """Dropout before the embedding FC."""
    activation_checkpointing: bool = False
    """Recompute stage activations in the backward to save memory."""
    channels_last: bool = False
    """Use channels-last memory format (faster convolutions on recent GPUs)."""
    kwargs: dict = field(default_factory=dict)
    """Extra backbone constructor arguments (e.g. layers, width for the small demo iresnet)."""


@dataclass
class SyntheticConfig:
    generate: bool = False
    """Generate the synthetic face-identity RecordIO set at data.rec's folder if it is missing."""
    out_dir: str = "data/synthetic"
    """Where the synthetic set is written."""
    num_identities: int = 1000
    """Training identities."""
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
    """Images per rank per micro-step."""
    num_workers: int = 2
    """DataLoader workers per rank (torch loader)."""
    loader: str = "torch"
    """torch | dali."""
    flip: bool = True
    """Random horizontal flip."""
    drop_last: bool = True
    """Drop the incomplete last global batch of an epoch."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """Synthetic dataset generation."""


@dataclass
class TrainConfig:
    epochs: int = 20
    """Epochs (ignored when max_steps > 0)."""
    max_steps: int = 0
    """Optimizer steps; 0 = epochs * steps per epoch."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    optimizer: str = "sgd"
    """sgd | adamw."""
    lr: float = 0.1
    """Backbone learning rate (peak)."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = False
    """SGD Nesterov momentum."""
    weight_decay: float = 5e-4
    """Weight decay (not applied to BN/PReLU weights and biases)."""
    head_lr: Optional[float] = None
    """Classifier learning rate; null = lr."""
    head_weight_decay: Optional[float] = None
    """Classifier weight decay; null = weight_decay."""
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    schedule: str = "poly"
    """poly | cosine | step (after linear warmup)."""
    warmup_epochs: float = 0.0
    """Linear warmup length in epochs."""
    warmup_steps: int = 0
    """Linear warmup length in optimizer steps (wins over warmup_epochs when > 0)."""
    poly_power: float = 2.0
    """Power of the polynomial decay."""
    milestones: list = field(default_factory=list)
    """Step schedule milestones, in epochs."""
    gamma: float = 0.1
    """Step schedule factor."""
    min_lr: float = 0.0
    """Final learning rate of poly/cosine, as a fraction of the peak."""
    amp: str = "none"
    """Mixed precision: none | bf16 | fp16 (fp16 needs CUDA; uses a GradScaler)."""
    clip_grad_norm: float = 5.0
    """Backbone gradient-norm clip (0 = off)."""
    log_every: int = 10
    """Log every N optimizer steps."""
    max_nonfinite_steps: int = 5
    """Abort after this many non-finite steps in a row."""
    tensorboard: bool = True
    """Write TensorBoard scalars to RUN/tb."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save every N optimizer steps (0 = only at the end)."""
    keep: int = 3
    """Keep the newest N checkpoints (0 = all)."""
    resume: str = "none"
    """none | auto (newest complete checkpoint of output_dir) | a checkpoint folder."""
    save_at_end: bool = True
    """Save when training ends."""


@dataclass
class EvalConfig:
    every: int = 0
    """Verify every N optimizer steps (0 = only at the end, when bins are given)."""
    bins: list = field(default_factory=list)
    """insightface .bin pair files."""
    batch_size: int = 128
    """Images per rank per forward."""
    nfolds: int = 10
    """Folds of the verification protocol."""
    flip: bool = True
    """Add the embedding of the flipped image (insightface protocol)."""
    keep_best: bool = True
    """Keep the best-accuracy backbone in RUN/best/."""


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1
    """ZeRO stage 0..3 for the backbone."""
    bf16: bool = True
    """bf16 training inside DeepSpeed (CPU and GPU)."""
    fp16: bool = False
    """fp16 inside DeepSpeed (GPU only; DeepSpeed refuses it on CPU)."""
    config: dict = field(default_factory=dict)
    """Extra raw DeepSpeed config merged in."""


@dataclass
class Config:
    output_dir: str = "runs/demo"
    """Run directory (config.yaml, metrics.jsonl, tb/, checkpoints/)."""
    seed: int = 0
    """Global seed (backbone init, classifier init, data order)."""
    device: str = "auto"
    """auto | cpu | cuda."""
    engine: str = "ddp"
    """Backbone data parallelism: ddp | deepspeed."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Backbone."""
    head: HeadConfig = field(default_factory=HeadConfig)
    """Class-sharded classifier."""
    data: DataConfig = field(default_factory=DataConfig)
    """Dataset and loader."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints and resume."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Verification during/after training."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed engine options (engine: deepspeed)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- documentation


def _class_docs(cls) -> dict:
    """Field name -> the string literal right below it in the class body."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for a, b in zip(body, body[1:]):
        if (
            isinstance(a, ast.AnnAssign)
            and isinstance(b, ast.Expr)
            and isinstance(getattr(b, "value", None), ast.Constant)
        ):
            docs[a.target.id] = str(b.value.value)
    return docs


def field_docs(cls=Config, prefix: str = "") -> dict:
    """{dotted key: (default, doc)} for every leaf key."""
    out = {}
    docs = _class_docs(cls)
    hints = get_type_hints(cls)
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        if is_dataclass(hints[f.name]):
            out.update(field_docs(hints[f.name], key + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out[key] = (default, docs.get(f.name, ""))
    return out


def format_help() -> str:
    lines = []
    for key, (default, doc) in field_docs().items():
        lines.append(f"{key} = {default!r}\n    {doc}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- loading


def _suggest(key: str, valid: list, path: str) -> str:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{path}{near[0]}'?" if near else ""
    return f"unknown config key '{path}{key}'{hint} (valid keys here: {', '.join(sorted(valid))})"


def _coerce(value: Any, typ, key: str):
    if value is None:
        return None
    origin = getattr(typ, "__origin__", None)
    if origin is not None and type(None) in getattr(typ, "__args__", ()):  # Optional[X]
        typ = [a for a in typ.__args__ if a is not type(None)][0]
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if typ is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return list(value)
    if typ is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def _build(cls, data: dict, path: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"'{path.rstrip('.') or 'config'}' must be a mapping, got {data!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    for k in data:
        if k not in names:
            raise ConfigError(_suggest(str(k), names, path))
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        typ, key = hints[f.name], f"{path}{f.name}"
        kwargs[f.name] = (
            _build(typ, data[f.name], key + ".")
            if is_dataclass(typ)
            else _coerce(data[f.name], typ, key)
        )
    return cls(**kwargs)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _override_to_dict(item: str) -> dict:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: cannot parse value: {e}") from None
    out: dict = value
    for part in reversed(key.strip().split(".")):
        out = {part: out}
    return out


def load_config(path: Optional[str] = None, overrides: Optional[list] = None) -> Config:
    """YAML file (optional) + dotted overrides -> validated Config."""
    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
    for item in overrides or []:
        data = _merge(data, _override_to_dict(item))
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def save_config(cfg: Config, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ----------------------------------------------------------------------------- validation


def _choice(value, options, key):
    if value not in options:
        near = difflib.get_close_matches(str(value), [str(o) for o in options], n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"{key}={value!r} is not one of {list(options)}{hint}")


def _positive(value, key, strict=True):
    if value is None:
        return
    if (value <= 0) if strict else (value < 0):
        raise ConfigError(f"{key}={value} must be {'> 0' if strict else '>= 0'}")


def validate(cfg: Config) -> None:
    from fr_dist.heads import list_heads
    from fr_dist.heads.margins import SOFTMAX_MARGINS, SPHEREFACE2_MARGINS

    _choice(cfg.device, ["auto", "cpu", "cuda"], "device")
    _choice(cfg.engine, ["ddp", "deepspeed"], "engine")
    _choice(cfg.head.name, list_heads(), "head.name")
    _choice(cfg.head.dtype, ["fp32", "bf16"], "head.dtype")
    sf = cfg.head.sphereface2
    _choice(sf.margin, list(SPHEREFACE2_MARGINS), "head.sphereface2.margin")
    _choice(sf.grad, ["detached", "exact"], "head.sphereface2.grad")
    if not 0 < sf.lam < 1:
        raise ConfigError(f"head.sphereface2.lam={sf.lam} must be in (0, 1)")
    _positive(sf.r, "head.sphereface2.r")
    _positive(sf.lw, "head.sphereface2.lw")
    pf = cfg.head.partial_fc
    _choice(pf.margin, list(SOFTMAX_MARGINS), "head.partial_fc.margin")
    _choice(pf.grad, ["straight_through", "exact"], "head.partial_fc.grad")
    _positive(pf.s, "head.partial_fc.s")
    if not 0 < pf.sample_rate <= 1:
        raise ConfigError(
            f"head.partial_fc.sample_rate={pf.sample_rate} must be in (0, 1] (1 = no sampling)"
        )
    _positive(cfg.model.embedding_size, "model.embedding_size")
    _positive(cfg.model.input_size, "model.input_size")
    if not 0 <= cfg.model.dropout < 1:
        raise ConfigError(f"model.dropout={cfg.model.dropout} must be in [0, 1)")
    d = cfg.data
    _positive(d.num_classes, "data.num_classes", strict=False)
    _positive(d.batch_size, "data.batch_size")
    _positive(d.num_workers, "data.num_workers", strict=False)
    _choice(d.loader, ["torch", "dali"], "data.loader")
    t = cfg.train
    _positive(t.lr, "train.lr")
    _positive(t.head_lr, "train.head_lr")
    _positive(t.weight_decay, "train.weight_decay", strict=False)
    _positive(t.head_weight_decay, "train.head_weight_decay", strict=False)
    _positive(t.grad_accum, "train.grad_accum")
    _positive(t.epochs, "train.epochs", strict=False)
    _positive(t.max_steps, "train.max_steps", strict=False)
    if t.epochs == 0 and t.max_steps == 0:
        raise ConfigError("train.epochs and train.max_steps are both 0: nothing to train")
    _choice(t.optimizer, ["sgd", "adamw"], "train.optimizer")
    _choice(t.schedule, ["poly", "cosine", "step"], "train.schedule")
    _choice(t.amp, ["none", "bf16", "fp16"], "train.amp")
    if not 0 <= t.momentum < 1:
        raise ConfigError(f"train.momentum={t.momentum} must be in [0, 1)")
    if not 0 <= t.min_lr <= 1:
        raise ConfigError(
            f"train.min_lr={t.min_lr} is a fraction of the peak LR and must be in [0, 1]"
        )
    _positive(t.log_every, "train.log_every")
    _positive(t.max_nonfinite_steps, "train.max_nonfinite_steps")
    _positive(t.clip_grad_norm, "train.clip_grad_norm", strict=False)
    _positive(t.warmup_epochs, "train.warmup_epochs", strict=False)
    _positive(t.warmup_steps, "train.warmup_steps", strict=False)
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        raise ConfigError(f"train.betas={t.betas} must be two numbers in [0, 1)")
    if sorted(t.milestones) != list(t.milestones):
        raise ConfigError(f"train.milestones={t.milestones} must be increasing")
    _positive(cfg.checkpoint.every, "checkpoint.every", strict=False)
    _positive(cfg.checkpoint.keep, "checkpoint.keep", strict=False)
    if cfg.checkpoint.resume not in ("none", "auto") and not Path(cfg.checkpoint.resume).exists():
        raise ConfigError(
            f"checkpoint.resume={cfg.checkpoint.resume!r}: no such checkpoint folder (or use auto/none)"
        )
    _positive(cfg.eval.every, "eval.every", strict=False)
    _positive(cfg.eval.nfolds, "eval.nfolds")
    for b in cfg.eval.bins:
        if not Path(b).exists() and not cfg.data.synthetic.generate:
            raise ConfigError(f"eval.bins: {b} does not exist")
    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage={cfg.deepspeed.zero_stage} must be 0, 1, 2 or 3")
    if cfg.device == "cpu" and t.amp == "fp16":
        raise ConfigError("train.amp=fp16 needs CUDA; use bf16 on CPU")


def validate_against_dataset(cfg: Config, dataset_num_classes: int, dataset_max_label: int) -> None:
    """num_classes must cover every label of the dataset."""
    k = cfg.data.num_classes
    if k and k <= dataset_max_label:
        raise ConfigError(
            f"data.num_classes={k} is smaller than the dataset needs: its labels go up to {dataset_max_label} "
            f"({dataset_num_classes} classes); set data.num_classes >= {dataset_max_label + 1} or 0 (from the dataset)"
        )
