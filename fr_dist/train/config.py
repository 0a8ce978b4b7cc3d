"""Typed run configuration: dataclasses with a docstring per field, YAML + dotted CLI overrides.

    cfg = load_config("configs/demo_cpu.yaml", ["train.lr=0.05", "head.name=partial_fc"])
    save_config(cfg, "runs/demo/config.yaml")        # the resolved config, loadable again
    print(format_help())                             # every key, its default and its doc

Override values are parsed as YAML scalars / flow lists (``train.milestones=[8,14]``,
``train.head_lr=null``, ``data.flip=false``, ``model.kwargs.width=32``).

Validation runs before any process group exists:

* an unknown key (in the YAML or an override, at any depth) names its full dotted path and
  the nearest valid key (``train.lrr`` -> ``did you mean 'train.lr'?``);
* a value of the wrong type or an impossible value says why (``train.lr=-0.1 must be > 0``);
* what needs the data (``data.num_classes`` vs the dataset's labels) is checked by
  :func:`validate_against_dataset`, which the launcher calls before starting workers.

Semantics worth knowing: ``data.batch_size`` is per rank and per micro-step (global batch per
optimizer step = batch_size x world_size x grad_accum); schedules count optimizer steps;
``train.min_lr`` is a fraction of the peak LR.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime
import difflib
import functools
import inspect
import math
import os
import textwrap
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, get_type_hints

import yaml

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
    "load_config",
    "config_from_dict",
    "save_config",
    "validate",
    "validate_paths",
    "validate_against_dataset",
    "check_device",
    "field_docs",
    "field_info",
    "format_help",
    "CHOICES",
    "all_choices",
]


class ConfigError(ValueError):
    """A configuration mistake, reported before anything starts."""


# ----------------------------------------------------------------------------- schema


@dataclass
class SphereFace2Config:
    lam: float = 0.7
    """lambda in (0, 1): weight of the positive term vs the negatives (OpenSphere's lamb)."""
    r: float = 40.0
    """Scale r of the logits (> 0)."""
    m: float = 0.4
    """Margin m (a cosine for C, an angle in radians for A, a multiplier for M)."""
    t: float = 3.0
    """Exponent t of the similarity adjustment g(z) = 2((z+1)/2)^t - 1 (> 0; 1 = off)."""
    lw: float = 50.0
    """Loss weight (OpenSphere's lw), multiplies the loss (> 0)."""
    margin: str = "C"
    """Margin type: C (additive cosine) | A (additive angular) | M (multiplicative angular)."""
    grad: str = "detached"
    """detached (OpenSphere: d logit / d cos = r) | exact (gradient through g)."""


@dataclass
class PartialFCConfig:
    margin: str = "arcface"
    """arcface (cos(theta + m2)) | cosface (cos - m3) | combined (cos(m1 theta + m2) - m3)."""
    s: float = 64.0
    """Logit scale s (> 0)."""
    m1: float = 1.0
    """Multiplicative angular margin (combined only)."""
    m2: float = 0.5
    """Additive angular margin in radians (arcface, combined)."""
    m3: float = 0.0
    """Additive cosine margin (cosface, combined); insightface's CosFace uses 0.4."""
    sample_rate: float = 1.0
    """Partial-FC rate of class centres kept per step, in (0, 1]; 1 = plain model parallel."""
    grad: str = "straight_through"
    """straight_through (insightface ArcFace) | exact (gradient through the margin)."""


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

    def head_kwargs(self) -> dict:
        """Constructor arguments of the selected head for :func:`fr_dist.heads.create_head`."""
        if self.name == "sphereface2":
            s = self.sphereface2
            return dict(lam=s.lam, r=s.r, m=s.m, t=s.t, lw=s.lw, margin=s.margin, grad=s.grad)
        p = self.partial_fc
        return dict(margin=p.margin, s=p.s, m1=p.m1, m2=p.m2, m3=p.m3, sample_rate=p.sample_rate, grad=p.grad)


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

    def to_dict(self) -> dict:
        """Plain nested dict (YAML/JSON serialisable)."""
        return dataclasses.asdict(self)


# Fixed option sets (registry-backed names -- head.name, margins, model.name -- are read from
# their registries in validate()).
CHOICES: dict[str, tuple] = {
    "device": ("auto", "cpu", "cuda"),
    "engine": ("ddp", "deepspeed"),
    "head.dtype": ("fp32", "bf16"),
    "head.sphereface2.grad": ("detached", "exact"),
    "head.partial_fc.grad": ("straight_through", "exact"),
    "data.loader": ("torch", "dali"),
    "train.optimizer": ("sgd", "adamw"),
    "train.schedule": ("poly", "cosine", "step"),
    "train.amp": ("none", "bf16", "fp16"),
}


def all_choices() -> dict[str, tuple]:
    """:data:`CHOICES` plus the registry-backed names (heads, margins)."""
    from fr_dist.heads import list_heads
    from fr_dist.heads.margins import SOFTMAX_MARGINS, SPHEREFACE2_MARGINS

    out = dict(CHOICES)
    out["head.name"] = tuple(list_heads())
    out["head.sphereface2.margin"] = tuple(SPHEREFACE2_MARGINS)
    out["head.partial_fc.margin"] = tuple(SOFTMAX_MARGINS)
    return out


# ----------------------------------------------------------------------------- documentation


@functools.cache
def _class_docs(cls) -> dict[str, str]:
    """Field name -> the string literal right below it in the class body (parsed with ast)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):  # no source (frozen app, REPL class)
        return {}
    body = tree.body[0].body
    docs = {}
    for a, b in zip(body, body[1:]):
        if (
            isinstance(a, ast.AnnAssign)
            and isinstance(a.target, ast.Name)
            and isinstance(b, ast.Expr)
            and isinstance(b.value, ast.Constant)
            and isinstance(b.value.value, str)
        ):
            docs[a.target.id] = inspect.cleandoc(b.value.value)
    return docs


@functools.cache
def _hints(cls) -> dict:
    return get_type_hints(cls)


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _type_name(t) -> str:
    if isinstance(t, type):
        return t.__name__
    return str(t).replace("typing.", "")


def field_info(cls=Config, prefix: str = "", sections: bool = False) -> list[dict]:
    """Every key in declaration order: ``{key, type, default, doc, section}``.

    Leaf keys only, unless ``sections`` (then each nested section comes first with
    ``section=True``).
    """
    out: list[dict] = []
    docs, hints = _class_docs(cls), _hints(cls)
    for f in fields(cls):
        key, typ = f"{prefix}{f.name}", hints[f.name]
        if is_dataclass(typ):
            if sections:
                out.append(
                    dict(
                        key=key,
                        type=typ.__name__,
                        default=None,
                        doc=docs.get(f.name, ""),
                        section=True,
                    )
                )
            out.extend(field_info(typ, key + ".", sections))
        else:
            out.append(
                dict(
                    key=key,
                    type=_type_name(typ),
                    default=_default(f),
                    doc=docs.get(f.name, ""),
                    section=False,
                )
            )
    return out


def field_docs(cls=Config) -> dict[str, str]:
    """``{dotted key: documentation}`` for every leaf key of ``cls``."""
    return {i["key"]: i["doc"] for i in field_info(cls)}


def _leaf_keys(cls=Config) -> list[str]:
    return [i["key"] for i in field_info(cls)]


def format_help(cls=Config) -> str:
    """All keys with type, default, choices and documentation (``fr-dist config --help-keys``)."""
    lines = [
        "fr_dist configuration keys (YAML nesting = dotted override path, e.g. train.lr=0.05):",
        "",
    ]
    options = all_choices() if cls is Config else {}
    for i in field_info(cls, sections=True):
        if i["section"]:
            lines.append(f"[{i['key']}]  {i['doc']}")
            continue
        default = yaml.safe_dump(i["default"], default_flow_style=True).strip()
        default = default.removesuffix("\n...").removesuffix("...").strip()
        choices = options.get(i["key"])
        opt = f"  one of: {' | '.join(choices)}" if choices else ""
        lines.append(f"  {i['key']}: {i['type']} = {default}{opt}")
        lines.append(f"      {i['doc']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(
                f"duplicate key {key!r} at line {key_node.start_mark.line + 1}: "
                "the same key is given twice in one mapping"
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _suggest(name: str, cls, path: str) -> str:
    """'unknown key' message with the nearest sibling, or the nearest key anywhere in the schema."""
    siblings = [f.name for f in fields(cls)]
    full = f"{path}{name}"
    near = difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
    if near:
        hint = f"did you mean '{path}{near[0]}'?"
    else:
        leaves = _leaf_keys(Config)
        same_tail = [k for k in leaves if k.rsplit(".", 1)[-1] == name]
        near = same_tail or difflib.get_close_matches(full, leaves, n=1, cutoff=0.6)
        if not near:
            tails = {k.rsplit(".", 1)[-1]: k for k in leaves}
            t = difflib.get_close_matches(name, list(tails), n=1, cutoff=0.75)
            near = [tails[t[0]]] if t else []
        if not near:
            near = difflib.get_close_matches(name, siblings, n=1, cutoff=0.0)
            near = [f"{path}{n}" for n in near]
        hint = f"did you mean '{near[0]}'?" if near else ""
    where = f"'{path.rstrip('.')}'" if path else "the top level"
    return f"unknown config key '{full}'; {hint} (valid keys in {where}: {', '.join(siblings)})"


def _origin(t):
    return typing.get_origin(t)


def _unwrap_optional(t) -> tuple[Any, bool]:
    if _origin(t) is typing.Union:
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(t)) == 2:
            return args[0], True
    return t, False


def _coerce(value: Any, typ, key: str):
    """Check / convert a YAML value to the field type; errors name the key and the expected type."""
    typ, optional = _unwrap_optional(typ)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: null is not allowed here (expected {_type_name(typ)})")
    origin = _origin(typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if typ is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if typ is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float, datetime.date)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if typ is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r} (write lists as [a, b] in overrides)")
        args = typing.get_args(typ)
        if args and args[0] is not Any:
            return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        return list(value)
    if typ is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def _build(cls, data: Any, path: str = "", source: str = ""):
    """Nested dict -> dataclass instance; unknown keys and wrong types are ConfigErrors."""
    where = f"{source}: " if source else ""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}'{path.rstrip('.') or 'config'}' must be a mapping of keys, got {data!r}")
    hints = _hints(cls)
    names = {f.name for f in fields(cls)}
    for k in data:
        if k not in names:
            raise ConfigError(where + _suggest(str(k), cls, path))
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        typ, key = hints[f.name], f"{path}{f.name}"
        if is_dataclass(typ):
            kwargs[f.name] = _build(typ, data[f.name], key + ".", source)
        else:
            try:
                kwargs[f.name] = _coerce(data[f.name], typ, key)
            except ConfigError as e:
                raise ConfigError(f"{where}{e}") from None
    return cls(**kwargs)


def _check_keys(cls, data: Any, path: str, source: str) -> None:
    """Unknown keys anywhere below ``cls`` (free-form dict fields excepted)."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: '{path.rstrip('.') or 'config'}' must be a mapping of keys, got {data!r}"
        )
    hints = _hints(cls)
    for k, v in data.items():
        if k not in hints:
            raise ConfigError(f"{source}: " + _suggest(str(k), cls, path))
        if is_dataclass(hints[k]):
            _check_keys(hints[k], v, f"{path}{k}.", source)


def _merge(base: dict, over: dict) -> dict:
    """Recursive dict merge: ``over`` wins; nested mappings merge key by key."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _leaf_type(parts: list[str], item: str):
    """Walk the schema along a dotted path; returns the leaf type, or None inside a free-form dict."""
    cls, path = Config, ""
    for i, part in enumerate(parts):
        if not part:
            raise ConfigError(f"override {item!r}: empty key component in '{'.'.join(parts)}'")
        if not is_dataclass(cls):
            return None  # below a dict-typed field (model.kwargs.*, deepspeed.config.*)
        hints = _hints(cls)
        if part not in hints:
            raise ConfigError(f"override {item!r}: " + _suggest(part, cls, path))
        typ = hints[part]
        if i == len(parts) - 1:
            return typ
        if not is_dataclass(typ):
            base, _ = _unwrap_optional(typ)
            if base is dict or _origin(base) is dict:
                return None
            raise ConfigError(
                f"override {item!r}: '{path}{part}' is a value ({_type_name(typ)}), not a section"
            )
        cls, path = typ, f"{path}{part}."
    return None


def _override_to_dict(item: str) -> dict:
    """``a.b.c=value`` -> ``{a: {b: {c: value}}}``; the value is parsed as a YAML scalar / list."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value (e.g. train.lr=0.05)")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    typ = _leaf_type(parts, item)
    try:
        value = yaml.load(raw, Loader=_UniqueKeyLoader) if raw.strip() != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: cannot parse the value as YAML: {e}") from None
    base, _ = _unwrap_optional(typ) if typ is not None else (None, False)
    if base is str and value is not None and not isinstance(value, str):
        value = raw.strip()  # keep e.g. output_dir=2024-01-01 or resume=0001 verbatim
    if is_dataclass(base) and value == "":
        raise ConfigError(f"override {item!r}: '{key}' is a section; give one of its keys")
    out: Any = value
    for part in reversed(parts):
        out = {part: out}
    return out


def config_from_dict(data: dict, source: str = "", validate_values: bool = True) -> Config:
    """Nested dict (e.g. a saved config.yaml) -> validated :class:`Config`."""
    cfg = _build(Config, data or {}, source=source)
    if validate_values:
        validate(cfg)
    return cfg


def load_config(
    path: Optional[str] = None,
    overrides: Optional[list[str]] = None,
    check_paths: bool = True,
) -> Config:
    """YAML file (optional) + dotted overrides (applied in order) -> validated :class:`Config`.

    Args:
        path: YAML recipe; None = the defaults.
        overrides: ``["train.lr=0.05", "head.name=partial_fc", ...]``.
        check_paths: also check that files named by the config exist (``eval.bins``, a
            ``checkpoint.resume`` folder); off to inspect a recipe away from its data.

    Raises:
        ConfigError: unknown key (nearest valid key named), wrong type or impossible value.
    """
    data: dict = {}
    source = str(path) if path else ""
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            data = yaml.load(p.read_text(), Loader=_UniqueKeyLoader)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, got {data!r}")
        _check_keys(Config, data, "", source)  # YAML typos are reported against the file
    for item in overrides or []:
        data = _merge(data, _override_to_dict(item))
    cfg = _build(Config, data)
    validate(cfg)
    if check_paths:
        validate_paths(cfg)
    return cfg


def save_config(cfg: Config, path) -> None:
    """Write the resolved config as YAML (atomically: a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(
        "# fr_dist resolved config (every key; load with fr_dist.train.config.load_config)\n"
        + yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)
    )
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- validation


def _choice(value, options, key):
    if value not in options:
        near = difflib.get_close_matches(str(value), [str(o) for o in options], n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"{key}={value!r} is not one of {list(options)}{hint}")


def _check(cond: bool, key: str, value, why: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r} {why}")


def _positive(value, key, strict=True):
    if value is None:
        return
    if (value <= 0) if strict else (value < 0):
        raise ConfigError(f"{key}={value!r} must be {'> 0' if strict else '>= 0'}")


def _check_backbone(model: ModelConfig) -> None:
    """Backbone name in the registry (or timm/...) and kwargs it accepts.

    The backbone is built on the meta device (no memory, milliseconds), so an argument unknown
    anywhere down the constructor chain fails here, before any process starts.
    """
    try:
        import torch

        from fr_dist.models import registry as reg
    except ImportError:  # pragma: no cover - models are part of fr_dist
        return
    if model.name.startswith(reg.TIMM_PREFIX):
        _check(
            len(model.name) > len(reg.TIMM_PREFIX),
            "model.name",
            model.name,
            "needs a timm model name after timm/",
        )
        return  # timm is an optional extra: checked when the model is built
    known = sorted(getattr(reg, "_REGISTRY", {}))
    if known:
        _choice(model.name, known, "model.name")
    for k in (
        "embedding_size",
        "input_size",
        "dropout",
        "activation_checkpointing",
        "channels_last",
    ):
        if k in model.kwargs:
            raise ConfigError(f"model.kwargs.{k}: set it as model.{k}, not in model.kwargs")
    try:
        with torch.device("meta"):
            reg.create_backbone(
                model.name,
                embedding_size=model.embedding_size,
                input_size=model.input_size,
                dropout=model.dropout,
                **model.kwargs,
            )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model ({model.name!r}, model.kwargs={model.kwargs}): {e}") from None
    except Exception:  # noqa: BLE001 - a constructor the meta device cannot run: build decides
        return


def validate(cfg: Config) -> None:
    """Check every value; raises :class:`ConfigError` saying which key and why."""
    for key, options in all_choices().items():
        obj = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        _choice(obj, options, key)

    # ---- model
    m = cfg.model
    _positive(m.embedding_size, "model.embedding_size")
    _positive(m.input_size, "model.input_size")
    _check(0 <= m.dropout < 1, "model.dropout", m.dropout, "must be in [0, 1)")
    _check_backbone(m)

    # ---- head
    sf = cfg.head.sphereface2
    _check(0 < sf.lam < 1, "head.sphereface2.lam", sf.lam, "must be in (0, 1)")
    _positive(sf.r, "head.sphereface2.r")
    _positive(sf.t, "head.sphereface2.t")
    _positive(sf.lw, "head.sphereface2.lw")
    if sf.margin == "M":
        _check(sf.m >= 1, "head.sphereface2.m", sf.m, "must be >= 1 for the multiplicative margin M")
    else:
        _positive(sf.m, "head.sphereface2.m", strict=False)
    pf = cfg.head.partial_fc
    _positive(pf.s, "head.partial_fc.s")
    _check(
        0 < pf.sample_rate <= 1,
        "head.partial_fc.sample_rate",
        pf.sample_rate,
        "must be in (0, 1]: the fraction of class centres used per step (1 = all, no sampling)",
    )
    _check(pf.m1 >= 1, "head.partial_fc.m1", pf.m1, "must be >= 1 (1 = no multiplicative margin)")
    _positive(pf.m2, "head.partial_fc.m2", strict=False)
    _positive(pf.m3, "head.partial_fc.m3", strict=False)

    # ---- data
    d = cfg.data
    _positive(d.num_classes, "data.num_classes", strict=False)
    _check(
        d.batch_size >= 1,
        "data.batch_size",
        d.batch_size,
        "must be >= 1 (images per rank per micro-step)",
    )
    _positive(d.num_workers, "data.num_workers", strict=False)
    s = d.synthetic
    _positive(s.num_identities, "data.synthetic.num_identities")
    _positive(s.images_per_identity, "data.synthetic.images_per_identity")
    _positive(s.heldout_identities, "data.synthetic.heldout_identities", strict=False)
    _positive(s.heldout_pairs, "data.synthetic.heldout_pairs", strict=False)

    # ---- train
    t = cfg.train
    _positive(t.lr, "train.lr")
    _positive(t.head_lr, "train.head_lr")
    _positive(t.weight_decay, "train.weight_decay", strict=False)
    _positive(t.head_weight_decay, "train.head_weight_decay", strict=False)
    _check(t.grad_accum >= 1, "train.grad_accum", t.grad_accum, "must be >= 1 (1 = no accumulation)")
    _positive(t.epochs, "train.epochs", strict=False)
    _positive(t.max_steps, "train.max_steps", strict=False)
    if t.epochs == 0 and t.max_steps == 0:
        raise ConfigError("train.epochs and train.max_steps are both 0: nothing to train")
    _check(0 <= t.momentum < 1, "train.momentum", t.momentum, "must be in [0, 1)")
    if t.nesterov and t.optimizer == "sgd" and t.momentum == 0:
        raise ConfigError("train.nesterov=true needs train.momentum > 0")
    _check(
        0 <= t.min_lr <= 1,
        "train.min_lr",
        t.min_lr,
        "is a fraction of the peak LR and must be in [0, 1]",
    )
    _check(0 < t.gamma <= 1, "train.gamma", t.gamma, "must be in (0, 1]")
    _positive(t.poly_power, "train.poly_power")
    _check(t.log_every >= 1, "train.log_every", t.log_every, "must be >= 1")
    _check(
        t.max_nonfinite_steps >= 1,
        "train.max_nonfinite_steps",
        t.max_nonfinite_steps,
        "must be >= 1",
    )
    _positive(t.clip_grad_norm, "train.clip_grad_norm", strict=False)
    _positive(t.warmup_epochs, "train.warmup_epochs", strict=False)
    _positive(t.warmup_steps, "train.warmup_steps", strict=False)
    if t.max_steps == 0 and t.warmup_epochs > t.epochs:
        raise ConfigError(f"train.warmup_epochs={t.warmup_epochs} is longer than train.epochs={t.epochs}")
    if t.max_steps > 0 and t.warmup_steps > t.max_steps:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps} is longer than train.max_steps={t.max_steps}")
    _check(
        len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas),
        "train.betas",
        t.betas,
        "must be two numbers in [0, 1)",
    )
    _check(
        all(m >= 0 for m in t.milestones) and all(a < b for a, b in zip(t.milestones, t.milestones[1:])),
        "train.milestones",
        t.milestones,
        "must be strictly increasing epochs >= 0",
    )
    if t.schedule == "step" and not t.milestones:
        raise ConfigError("train.schedule=step needs train.milestones (epochs), e.g. [10, 16]")

    # ---- checkpoint / eval
    c = cfg.checkpoint
    _positive(c.every, "checkpoint.every", strict=False)
    _positive(c.keep, "checkpoint.keep", strict=False)
    _check(c.resume != "", "checkpoint.resume", c.resume, "must be none, auto or a checkpoint folder")
    e = cfg.eval
    _positive(e.every, "eval.every", strict=False)
    _check(e.batch_size >= 1, "eval.batch_size", e.batch_size, "must be >= 1")
    _check(e.nfolds >= 2, "eval.nfolds", e.nfolds, "must be >= 2 (k-fold threshold selection)")

    # ---- engine / precision
    ds = cfg.deepspeed
    _check(ds.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", ds.zero_stage, "must be 0, 1, 2 or 3")
    if ds.bf16 and ds.fp16:
        raise ConfigError("deepspeed.bf16 and deepspeed.fp16 are both true: choose one")
    if cfg.device == "cpu":
        if t.amp == "fp16":
            raise ConfigError("train.amp=fp16 needs CUDA (GradScaler); use train.amp=bf16 on CPU")
        if cfg.engine == "deepspeed" and ds.fp16:
            raise ConfigError(
                "deepspeed.fp16=true needs CUDA (DeepSpeed refuses fp16 on CPU); use deepspeed.bf16"
            )


def validate_paths(cfg: Config) -> None:
    """Files the config names must exist (the synthetic set's files may be generated later)."""
    syn = cfg.data.synthetic
    syn_dir = Path(syn.out_dir).resolve()
    for b in cfg.eval.bins:
        p = Path(b)
        if p.exists():
            continue
        if syn.generate and syn_dir in p.resolve().parents:
            continue  # written by the synthetic generator before training
        raise ConfigError(f"eval.bins: {b} does not exist")
    r = cfg.checkpoint.resume
    if r not in ("none", "auto") and not Path(r).is_dir():
        raise ConfigError(
            f"checkpoint.resume={r!r}: no such checkpoint folder (use auto, none or RUN/checkpoints/<step>)"
        )


def check_device(cfg: Config, device_type: str) -> None:
    """Checks that need the resolved device (``device=auto`` on a machine without CUDA)."""
    if device_type != "cuda":
        if cfg.train.amp == "fp16":
            raise ConfigError(
                f"train.amp=fp16 needs CUDA but this run uses {device_type}; use train.amp=bf16"
            )
        if cfg.engine == "deepspeed" and cfg.deepspeed.fp16:
            raise ConfigError(
                f"deepspeed.fp16=true needs CUDA but this run uses {device_type}; use deepspeed.bf16=true"
            )


def validate_against_dataset(cfg: Config, dataset_num_classes: int, dataset_max_label: int) -> None:
    """``data.num_classes`` must cover every label of the dataset; call before starting workers.

    Args:
        dataset_num_classes: classes the dataset declares (property file / header).
        dataset_max_label: the largest label actually present (labels are 0-based).
    """
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
