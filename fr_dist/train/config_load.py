"""Load, save and document a :class:`~fr_dist.train.config.Config`: YAML recipes + dotted overrides.

    cfg = load_config("configs/demo_cpu.yaml", ["train.lr=0.05", "head.name=partial_fc"])
    save_config(cfg, "runs/demo/config.yaml")        # the resolved config, loadable again
    print(format_help())                             # every key, its default and its doc

A recipe may start from other YAML files: ``defaults: [base/insightface.yaml, datasets/ms1mv3.yaml]``
(paths relative to the file naming them; each may have its own ``defaults``). They merge in order,
key by key, later files winning, the recipe itself last, then the overrides (in order). Override
values are YAML scalars / flow lists (``train.milestones=[8,14]``, ``train.head_lr=null``,
``model.kwargs.width=32``); YAML reads ``1e-3`` as a number and ``2024-01-01`` as a string here.

Validation is pydantic's, on the components' own sections (see :mod:`fr_dist.train.config`),
before any process group exists; this module only words its errors: an unknown key names its
full dotted path and the nearest valid key (``train.lrr`` -> ``did you mean 'train.lr'?``), a bad
value says why (``train.lr=-0.1 must be > 0``), a YAML mistake names its file. What needs the data
is :func:`fr_dist.train.config.validate_against_dataset`, called before workers start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import TypeAdapter, ValidationError

from fr_dist.train.config import Config, ConfigError

__all__ = [
    "load_config",
    "save_config",
    "config_from_dict",
    "validate_paths",
    "path_problems",
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


# ----------------------------------------------------------------------------- the schema, walked


def _fields(cls) -> dict:
    return cls.__pydantic_fields__


def _section(t):
    """The section class a field holds, or None for a value."""
    return t if isinstance(t, type) and dataclasses.is_dataclass(t) else None


def _unwrap(t):
    """Optional[X] / Annotated[X, ...] -> X."""
    if typing.get_origin(t) is typing.Annotated:
        return _unwrap(typing.get_args(t)[0])
    args = [a for a in typing.get_args(t) if a is not type(None)]
    return _unwrap(args[0]) if typing.get_origin(t) is typing.Union and len(args) == 1 else t


def _choices(t) -> tuple:
    t = _unwrap(t)
    return typing.get_args(t) if typing.get_origin(t) is Literal else ()


def _type_name(t) -> str:
    base, choices = _unwrap(t), _choices(t)
    if choices:
        name = type(choices[0]).__name__
    else:
        name = base.__name__ if type(base) is type else str(base).replace("typing.", "")
    return f"Optional[{name}]" if type(None) in typing.get_args(t) else name


def field_info(cls=Config, prefix: str = "", sections: bool = False) -> list[dict]:
    """Every key in declaration order: ``{key, type, default, doc, section, choices}``.

    Leaf keys only, unless ``sections`` (then each section comes first with ``section=True``).
    """
    out: list[dict] = []
    for name, f in _fields(cls).items():
        key, t = f"{prefix}{name}", f.annotation
        info, sub = dict(key=key, doc=f.description or ""), _section(t)
        if sub is None:
            default = f.get_default(call_default_factory=True)
            out.append(dict(info, type=_type_name(t), default=default, section=False, choices=_choices(t)))
            continue
        if sections:
            out.append(dict(info, type=sub.__name__, default=None, section=True, choices=()))
        out.extend(field_info(sub, key + ".", sections))
    return out


def format_help(cls=Config) -> str:
    """All keys with type, default, choices and documentation (``fr-dist config --help-keys``)."""
    lines = ["fr_dist configuration keys (YAML nesting = dotted override path, e.g. train.lr=0.05):", ""]
    for i in field_info(cls, sections=True):
        if i["section"]:
            lines.append(f"[{i['key']}]  {i['doc']}")
            continue
        default = yaml.safe_dump(i["default"], default_flow_style=True).strip()
        default = default.removesuffix("...").strip()
        opt = f"  one of: {' | '.join(map(str, i['choices']))}" if i["choices"] else ""
        doc = i["doc"].replace("\n", "\n      ")
        lines += [f"  {i['key']}: {i['type']} = {default}{opt}", f"      {doc}"]
    return "\n".join(lines)


def _suggest(name: str, cls, path: str) -> str:
    """'unknown key' message with the nearest sibling, or the nearest key anywhere in the schema."""
    siblings, full = list(_fields(cls)), f"{path}{name}"
    near = difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
    if near:
        hint = f"did you mean '{path}{near[0]}'?"
    else:
        leaves = [i["key"] for i in field_info(Config)]
        near = [k for k in leaves if k.rsplit(".", 1)[-1] == name]
        near = near or difflib.get_close_matches(full, leaves, n=1, cutoff=0.6)
        if not near:
            tails = {k.rsplit(".", 1)[-1]: k for k in leaves}
            near = [tails[t] for t in difflib.get_close_matches(name, list(tails), n=1, cutoff=0.75)]
        near = near or [f"{path}{n}" for n in difflib.get_close_matches(name, siblings, n=1, cutoff=0.0)]
        hint = f"did you mean '{near[0]}'?" if near else ""
    where = f"'{path.rstrip('.')}'" if path else "the top level"
    return f"unknown config key '{full}'; {hint} (valid keys in {where}: {', '.join(siblings)})"


# ----------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, reads 1e-3 as a float and dates as strings."""


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, (str, int, float, bool, type(None))):
            raise ConfigError(
                f"key {key!r:.60} at line {key_node.start_mark.line + 1} is not a scalar (a config key is a name)"
            )
        if key in seen:
            raise ConfigError(
                f"duplicate key {key!r} at line {key_node.start_mark.line + 1}: "
                "the same key is given twice in one mapping"
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.yaml_implicit_resolvers = {
    c: [(tag, rx) for tag, rx in rs if tag != "tag:yaml.org,2002:timestamp"]
    for c, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(  # YAML 1.2 floats without a dot (5e-4)
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789")
)


_MAX_VALUES = 100_000
"""The most values one YAML document may hold once its aliases are expanded (recipes hold a few hundred):
a few lines of nested aliases ("billion laughs") would otherwise expand to 10^9 values when validated."""


def _yaml(text: str, where: str):
    """``text`` parsed by :class:`_Loader`; every failure (a YAML error, a constructor's ValueError on
    ``!!int x``, nesting past the recursion limit) and an alias bomb is a :class:`ConfigError`."""
    try:
        data = yaml.load(text, Loader=_Loader)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except Exception as e:  # yaml.YAMLError, ValueError / AttributeError of a constructor, RecursionError
        raise ConfigError(f"{where}: invalid YAML: {type(e).__name__}: {e}") from None
    try:
        _count_values(data, {}, set())
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply") from None
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    return data


def _count_values(x, sizes: dict, open_: set) -> int:
    """Values in ``x`` with aliases expanded (a shared node counts each time it is used); raises
    ValueError past :data:`_MAX_VALUES` or for a node that contains itself (a recursive alias)."""
    if not isinstance(x, (dict, list)):
        return 1
    if id(x) in sizes:
        return sizes[id(x)]
    if id(x) in open_:
        raise ValueError("a recursive alias (a node that contains itself)")
    open_.add(id(x))
    children = [v for kv in x.items() for v in kv] if isinstance(x, dict) else x
    n = 1 + sum(_count_values(c, sizes, open_) for c in children)
    open_.discard(id(x))
    if n > _MAX_VALUES:
        raise ValueError(f"its aliases expand to more than {_MAX_VALUES} values")
    sizes[id(x)] = n
    return n


def _read_recipe(path: Path, chain: tuple = ()) -> list[tuple[str, dict]]:
    """``path`` and, first, its ``defaults`` (recursively): ``[(file, mapping), ...]`` in merge order."""
    named_by = f" (in the defaults of {chain[-1]})" if chain else ""
    try:
        if path.resolve() in chain:
            raise ConfigError(f"{path}: its defaults include it again (a cycle)")
        if not path.is_file():
            raise ConfigError(f"config file {path} not found{named_by}")
        raw = path.read_bytes()
    except (OSError, ValueError) as e:  # a name too long, a NUL byte, unreadable
        raise ConfigError(f"config file {str(path)!r:.300}{named_by} cannot be read: {e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    data = _yaml(text, str(path))
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {data!r}")
    defaults = data.pop("defaults", [])
    if not isinstance(defaults, list) or not all(isinstance(d, str) for d in defaults):
        raise ConfigError(f"{path}: defaults must be a list of YAML files, relative to {path.parent}")
    layers = [x for d in defaults for x in _read_recipe(path.parent / d, (*chain, path.resolve()))]
    return [*layers, (str(path), data)]


def _merge(base: dict, over: dict) -> dict:
    """Recursive dict merge: ``over`` wins; nested mappings merge key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _override_to_dict(item: str) -> dict:
    """``a.b.c=value`` -> ``{a: {b: {c: value}}}``; the key is checked against the schema."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value (e.g. train.lr=0.05)")
    key, raw = item.split("=", 1)
    parts, cls, leaf = key.strip().split("."), Config, None
    for i, part in enumerate(parts):
        if not part:
            raise ConfigError(f"override {item!r}: empty key component in '{key.strip()}'")
        if part not in _fields(cls):
            path = "".join(p + "." for p in parts[:i])
            raise ConfigError(f"override {item!r}: {_suggest(part, cls, path)}")
        leaf = _fields(cls)[part].annotation
        cls = _section(leaf)
        if cls is None and i < len(parts) - 1:
            if _unwrap(leaf) is dict or typing.get_origin(_unwrap(leaf)) is dict:
                leaf = None  # below a free-form mapping (model.kwargs.*, deepspeed.config.*)
                break
            raise ConfigError(f"override {item!r}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
    try:
        value = _yaml(raw, "value") if raw.strip() != "" else ""
    except ConfigError as e:
        raise ConfigError(f"override {item!r:.300}: cannot parse the value as YAML: {e}") from None
    if _unwrap(leaf) is str and value is not None and not isinstance(value, str):
        value = raw.strip()  # keep e.g. output_dir=2024 or resume=0001 verbatim
    if _section(leaf) and value == "":
        raise ConfigError(f"override {item!r}: '{key}' is a section; give one of its keys")
    for part in reversed(parts):
        value = {part: value}
    return value


# ----------------------------------------------------------------------------- validation, worded

_ADAPTER = TypeAdapter(Config)


def _bounds(f, ctx: dict) -> str:
    b = {k: v for m in f.metadata for k in ("gt", "ge", "lt", "le") if (v := getattr(m, k, None)) is not None}
    b = b or ctx
    lo, hi = ("gt" in b, b.get("gt", b.get("ge"))), ("lt" in b, b.get("lt", b.get("le")))
    if lo[1] is not None and hi[1] is not None:
        return f"in {'(' if lo[0] else '['}{lo[1]:g}, {hi[1]:g}{')' if hi[0] else ']'}"
    op, v = next((op, b[k]) for k, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")) if k in b)
    return f"{op} {v:g}"


def _explain(err: dict, layers: list) -> str:
    """One pydantic error -> a sentence naming the dotted key (and the file that set it)."""
    loc, kind, value, ctx = err["loc"], err["type"], err["input"], err.get("ctx") or {}
    cls, n = Config, 0  # loc[:n] names a section (cls); loc[n], if any, one of its fields
    while n < len(loc) and _section(getattr(_fields(cls).get(loc[n]), "annotation", None)):
        cls, n = _fields(cls)[loc[n]].annotation, n + 1
    field = _fields(cls).get(loc[n]) if n < len(loc) else None
    section = ".".join(map(str, loc[:n]))
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    where = next((src for src, d in reversed(layers) if _has(d, loc)), None)
    where = f"{where}: " if where else ""
    if kind == "unexpected_keyword_argument":
        return where + _suggest(str(loc[-1]), cls, section + "." if section else "")
    if kind in ("dataclass_type", "dataclass_args_type"):
        return f"{where}'{key}' must be a mapping of keys, got {value!r}"
    if n == len(loc):  # a section's own rule: its fields are named bare, name them in full
        msg = str(ctx.get("error", err["msg"]))
        if not section:
            return msg
        names = "|".join(map(re.escape, _fields(cls)))
        msg, named = re.subn(rf"(?<![\w.'\"])({names})(?=[=\s.:,)]|$)", rf"{section}.\1", msg)
        return msg if named else f"{section}: {msg}"
    if value is None:
        return f"{where}{key}: null is not allowed here"
    if field is not None and _unwrap(field.annotation) is float and type(value) is int:
        value = float(value)  # as the field holds it: sample_rate=0.0
    if kind == "literal_error":
        near = difflib.get_close_matches(str(value), list(map(str, _choices(field.annotation))), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        return f"{where}{key}={value!r} is not one of {ctx['expected']}{hint}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{where}{key}={value!r} must be {_bounds(field, ctx)}"
    if kind == "value_error":
        return f"{where}{key}={value!r} {ctx['error']}"
    return f"{where}{key}={value!r}: {err['msg'][0].lower()}{err['msg'][1:]}"


def _has(data, loc) -> bool:
    for p in loc:
        if not isinstance(data, dict) or p not in data:
            return False
        data = data[p]
    return True


def config_from_dict(data: Any, layers: list = ()) -> Config:
    """A nested mapping -> validated :class:`Config` (``layers``: ``[(file or None, mapping)]`` it
    was merged from, to name the file that set a bad key). Raises :class:`ConfigError`."""
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as e:
        raise ConfigError("\n".join(_explain(err, list(layers)) for err in e.errors())) from None


def load_config(
    path: Optional[str] = None,
    overrides: Optional[list[str]] = None,
    check_paths: bool = True,
) -> Config:
    """YAML recipe (optional, with its ``defaults``) + dotted overrides -> validated :class:`Config`.

    Args:
        path: YAML recipe; None = the defaults.
        overrides: ``["train.lr=0.05", "head.name=partial_fc", ...]``, applied in order.
        check_paths: also check that files named by the config exist (``eval.bins``, a
            ``checkpoint.resume`` folder); off to inspect a recipe away from its data.

    Raises:
        ConfigError: unknown key (nearest valid key named), wrong type or impossible value.
    """
    layers: list = _read_recipe(Path(path)) if path else []
    layers += [(None, _override_to_dict(item)) for item in overrides or []]
    data: dict = {}
    for _, d in layers:
        data = _merge(data, d)
    cfg = config_from_dict(data, layers)
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


def _unusable_path(p: str, is_dir: bool = False) -> Optional[str]:
    """Why ``p`` is not an existing file / folder (None: it is); a name the OS refuses says why."""
    try:
        ok = Path(p).is_dir() if is_dir else Path(p).exists()
    except (OSError, ValueError) as e:  # a name too long, a NUL byte
        return f"is not a usable path ({e})"
    return None if ok else "does not exist"


def path_problems(cfg: Config) -> list[str]:
    """Files the config names that do not exist (the synthetic set's files may be generated later)."""
    syn = cfg.data.synthetic
    syn_dir, out = Path(syn.out_dir).resolve(), []
    for b in cfg.eval.bins:
        why = _unusable_path(b)
        if why == "does not exist" and syn.generate:
            try:
                why = None if syn_dir in Path(b).resolve().parents else why
            except (OSError, ValueError):
                pass
        if why:
            out.append(f"eval.bins: {b} {why}")
    r = cfg.checkpoint.resume
    if r not in ("none", "auto") and _unusable_path(r, is_dir=True):
        out.append(
            f"checkpoint.resume={r!r}: no such checkpoint folder (use auto, none or RUN/checkpoints/<step>)"
        )
    return out


def validate_paths(cfg: Config) -> None:
    """Raise :class:`ConfigError` for the first of :func:`path_problems`."""
    problems = path_problems(cfg)
    if problems:
        raise ConfigError(problems[0])
