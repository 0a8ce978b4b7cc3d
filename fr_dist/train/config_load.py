"""Load, check and document a :class:`~fr_dist.train.config.Config`: YAML + dotted overrides.

    cfg = load_config("configs/demo_cpu.yaml", ["train.lr=0.05", "head.name=partial_fc"])
    save_config(cfg, "runs/demo/config.yaml")        # the resolved config, loadable again
    print(format_help())                             # every key, its default and its doc

Override values are parsed as YAML scalars / flow lists (``train.milestones=[8,14]``,
``train.head_lr=null``, ``data.flip=false``, ``model.kwargs.width=32``).

Checks run before any process group exists:

* an unknown key (in the YAML or an override, at any depth) names its full dotted path and
  the nearest valid key (``train.lrr`` -> ``did you mean 'train.lr'?``);
* a value of the wrong type or an impossible value says why (``train.lr=-0.1 must be > 0``).
  Values are checked once, where they are used: head hyper-parameters by the head classes,
  learning rates / weight decays by :func:`fr_dist.train.optim.build_optimizer`, backbone names
  and arguments by the model registry (each asked here and its error re-raised naming the key);
  :func:`validate` itself holds the rules nothing else owns and those spanning several keys;
* what needs the data (``data.num_classes`` vs the dataset's labels) is
  :func:`fr_dist.train.config.validate_against_dataset`, called before workers start.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import datetime
import difflib
import functools
import inspect
import math
import os
import re
import textwrap
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, get_type_hints

import yaml

from fr_dist.train.config import Config, ConfigError, ModelConfig, all_choices

__all__ = [
    "load_config",
    "save_config",
    "validate",
    "validate_paths",
    "config_errors",
    "field_info",
    "format_help",
]


@contextlib.contextmanager
def config_errors(section: str, keys: dict[str, str]):
    """Re-raise a ValueError / TypeError of a component built from config values as a ConfigError.

    ``keys`` maps the component's argument names to what to call them (``"head.sphereface2.lam=1.0"``);
    the first argument the message names is named (``head.sphereface2.lam=1.0 must be in (0, 1)...``),
    else ``section``. The component owns the rule.
    """
    try:
        yield
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        msg = str(e)
        key = next((v for k, v in keys.items() if re.search(rf"\b{re.escape(k)}\b", msg)), None)
        why = msg.find(" must ")
        raise ConfigError(f"{key}{msg[why:]}" if key and why >= 0 else f"{key or section}: {msg}") from None


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
        "# fr_dist resolved config (every key; load with fr_dist.train.config_load.load_config)\n"
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
    """Name and arguments as the model registry checks them (nothing is built)."""
    from fr_dist.models import registry

    for k in ("embedding_size", "input_size", "dropout", "activation_checkpointing", "channels_last"):
        if k in model.kwargs:
            raise ConfigError(f"model.kwargs.{k}: set it as model.{k}, not in model.kwargs")
    if not model.name.startswith(registry.TIMM_PREFIX):
        _choice(model.name, sorted(registry._REGISTRY), "model.name")
    try:
        registry.check_backbone_args(model.name, model.kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model ({model.name!r}, model.kwargs={model.kwargs}): {e}") from None


def _keys(section: str, values: dict) -> dict:
    return {k: f"{section}.{k}={v!r}" for k, v in values.items()}


def _check_components(cfg: Config) -> None:
    """Ask the heads and the optimizer builder to check their values (tiny probes, no data)."""
    import torch

    from fr_dist.heads import create_head
    from fr_dist.train.optim import build_optimizer

    h = cfg.head
    for name in ("sphereface2", "partial_fc"):
        kwargs = h.head_kwargs(name)
        with config_errors(f"head.{name}", _keys(f"head.{name}", kwargs)):
            create_head(name, embedding_size=1, num_classes=1, **kwargs)
    t, probe = cfg.train, [torch.nn.Parameter(torch.zeros(1))]
    for lr, wd, prefix in ((t.lr, t.weight_decay, ""), (t.head_lr, t.head_weight_decay, "head_")):
        lr, wd = (t.lr if lr is None else lr), (t.weight_decay if wd is None else wd)
        keys = {"lr": f"train.{prefix}lr={lr!r}", "weight_decay": f"train.{prefix}weight_decay={wd!r}"}
        with config_errors("train", keys):
            build_optimizer(t.optimizer, probe, lr=lr, weight_decay=wd)


def validate(cfg: Config) -> None:
    """Check every value; raises :class:`ConfigError` saying which key and why."""
    for key, options in all_choices().items():
        obj = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        _choice(obj, options, key)

    m = cfg.model
    _positive(m.embedding_size, "model.embedding_size")
    _positive(m.input_size, "model.input_size")
    _check(0 <= m.dropout < 1, "model.dropout", m.dropout, "must be in [0, 1)")
    _check_backbone(m)
    _check_components(cfg)

    # ---- head values the head classes do not check (yet)
    sf = cfg.head.sphereface2
    for k in ("r", "t", "lw"):
        _positive(getattr(sf, k), f"head.sphereface2.{k}")
    if sf.margin == "M":
        _check(sf.m >= 1, "head.sphereface2.m", sf.m, "must be >= 1 for the multiplicative margin M")
    else:
        _positive(sf.m, "head.sphereface2.m", strict=False)
    pf = cfg.head.partial_fc
    _check(pf.m1 >= 1, "head.partial_fc.m1", pf.m1, "must be >= 1 (1 = no multiplicative margin)")
    _positive(pf.m2, "head.partial_fc.m2", strict=False)
    _positive(pf.m3, "head.partial_fc.m3", strict=False)

    d = cfg.data
    _positive(d.num_classes, "data.num_classes", strict=False)
    _check(
        d.batch_size >= 1, "data.batch_size", d.batch_size, "must be >= 1 (images per rank per micro-step)"
    )
    _positive(d.num_workers, "data.num_workers", strict=False)
    s = d.synthetic
    _positive(s.num_identities, "data.synthetic.num_identities")
    _positive(s.images_per_identity, "data.synthetic.images_per_identity")
    _positive(s.heldout_identities, "data.synthetic.heldout_identities", strict=False)
    _positive(s.heldout_pairs, "data.synthetic.heldout_pairs", strict=False)

    t = cfg.train
    _check(t.grad_accum >= 1, "train.grad_accum", t.grad_accum, "must be >= 1 (1 = no accumulation)")
    _positive(t.epochs, "train.epochs", strict=False)
    _positive(t.max_steps, "train.max_steps", strict=False)
    if t.epochs == 0 and t.max_steps == 0:
        raise ConfigError("train.epochs and train.max_steps are both 0: nothing to train")
    _check(0 <= t.momentum < 1, "train.momentum", t.momentum, "must be in [0, 1)")
    if t.nesterov and t.optimizer == "sgd" and t.momentum == 0:
        raise ConfigError("train.nesterov=true needs train.momentum > 0")
    _check(0 <= t.min_lr <= 1, "train.min_lr", t.min_lr, "is a fraction of the peak LR and must be in [0, 1]")
    _check(0 < t.gamma <= 1, "train.gamma", t.gamma, "must be in (0, 1]")
    _positive(t.poly_power, "train.poly_power")
    _check(t.log_every >= 1, "train.log_every", t.log_every, "must be >= 1")
    _check(t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", t.max_nonfinite_steps, "must be >= 1")
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

    c = cfg.checkpoint
    _positive(c.every, "checkpoint.every", strict=False)
    _positive(c.keep, "checkpoint.keep", strict=False)
    _check(c.resume != "", "checkpoint.resume", c.resume, "must be none, auto or a checkpoint folder")
    e = cfg.eval
    _positive(e.every, "eval.every", strict=False)
    _check(e.batch_size >= 1, "eval.batch_size", e.batch_size, "must be >= 1")
    _check(e.nfolds >= 2, "eval.nfolds", e.nfolds, "must be >= 2 (k-fold threshold selection)")

    _positive(cfg.dist.timeout_s, "dist.timeout_s")
    _positive(cfg.dist.rendezvous_timeout_s, "dist.rendezvous_timeout_s")

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
