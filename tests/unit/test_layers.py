"""Import layering of fr_dist: no module imports from a layer above its own (lazy imports included).

Layers, bottom -> top (a module may import its own layer and those below):

0. ``runtime``, ``comm``, ``sharding``, ``checkpoint_io``, ``errors``, ``signals``, ``testing``, ``models/*``, ``data/*``:
   process group, collectives, row arithmetic, on-disk layout, backbones, data.
1. ``heads/*``: the sharded classifiers (math + named collectives).
2. ``eval/*``, ``export``, ``plan``, ``doctor``: use trained models / describe runs; no training.
3. ``train/*``: config, trainer, checkpoints, engines.
4. command lines: ``cli``, ``data/cli.py``, ``eval/cli.py``, ``plan/cli.py`` (they wire the layers below to argv;
   ``data/cli.py`` and ``eval/cli.py`` are the ``fr-dist data`` / ``fr-dist eval`` subcommands,
   so they sit with ``cli`` even though they live in their package's folder).

The checker reads every ``import`` / ``from ... import`` of every module with ``ast`` (inside
functions too: a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "fr_dist"

LAYERS = {
    "runtime": 0,
    "comm": 0,
    "sharding": 0,
    "checkpoint_io": 0,
    "checkpoint": 0,  # layout, atomic save, manager, states, deepspeed: errors + comm only
    "errors": 0,
    "config_base": 0,
    "launch": 0,
    "signals": 0,
    "testing": 0,
    "__init__": 0,
    "models": 0,
    "data": 0,
    "heads": 1,
    "eval": 2,
    "export": 2,
    "plan": 2,
    "doctor": 2,
    "train": 3,
    "convert": 3,  # arcface_torch / OpenSphere runs in and out: builds a trainer to write a run
    "cli": 4,
    "data.cli": 4,
    "eval.cli": 4,
    "plan.cli": 4,
}

# Known violations, each to be removed by the change named beside it.
ALLOWED: set = set()  # none left


def layer(module: str) -> int:
    """Layer of a dotted ``fr_dist...`` module name (the most specific entry of LAYERS wins)."""
    parts = module.split(".")[1:] or ["__init__"]
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in LAYERS:
            return LAYERS[key]
    raise KeyError(f"{module}: no layer assigned; add it to LAYERS in {Path(__file__).name}")


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _is_module(dotted: str) -> bool:
    rel = Path(*dotted.split("."))
    return (PKG.parent / rel).with_suffix(".py").is_file() or (PKG.parent / rel / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """fr_dist modules ``path`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    return imports_in(path.read_text(), me, package)


def imports_in(source: str, me: str, package: str) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "fr_dist"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "fr_dist":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if _is_module(sub) else base)
    out.discard(me)
    return out


def violations() -> list[tuple[str, str, int, int]]:
    found = []
    for path in sorted(PKG.rglob("*.py")):
        me = module_name(path)
        for target in sorted(imports_of(path)):
            if layer(target) > layer(me):
                found.append((me, target, layer(me), layer(target)))
    return found


def test_every_module_has_a_layer():
    for path in sorted(PKG.rglob("*.py")):
        layer(module_name(path))


def test_no_import_from_a_higher_layer():
    bad = [v for v in violations() if (v[0], v[1]) not in ALLOWED]
    assert not bad, "imports that run up the layers:\n" + "\n".join(
        f"  {a} (layer {la}) imports {b} (layer {lb})" for a, b, la, lb in bad
    )


def test_allowlist_is_current():
    """An allowlisted violation that has been fixed must leave ALLOWED (it would hide a regression)."""
    current = {(a, b) for a, b, _, _ in violations()}
    stale = ALLOWED - current
    if stale:
        pytest.fail(f"fixed, remove from ALLOWED: {sorted(stale)}")


def test_checker_sees_lazy_relative_and_from_imports():
    src = (
        "import os\nfrom fr_dist import comm\nfrom fr_dist.heads import create_head\n"
        "def f():\n    from fr_dist.train import config\n    import fr_dist.cli\n    from .margins import x\n"
    )
    found = imports_in(src, "fr_dist.heads.probe", "fr_dist.heads")
    assert found == {
        "fr_dist.comm",
        "fr_dist.heads",
        "fr_dist.train.config",
        "fr_dist.cli",
        "fr_dist.heads.margins",
    }
    assert [layer(m) for m in sorted(found)] == [4, 0, 1, 1, 3]  # cli, comm, heads, heads.margins, train
    assert layer("fr_dist.eval.cli") == 4 and layer("fr_dist.eval.ijb") == 2 and layer("fr_dist") == 0


# ---- a visible graph: module size and imports hidden inside functions --------------------------------
MAX_LINES = 500
MAX_LAZY_INTERNAL_IMPORTS = 20


def lazy_internal_imports(root: Path = PKG.parent) -> list[str]:
    """``file:line`` of every fr_dist-internal import inside a function (optional extras don't count)."""
    found = []
    for path in sorted((root / "fr_dist").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                internal = (
                    isinstance(node, ast.ImportFrom)
                    and (node.level > 0 or (node.module or "").startswith("fr_dist"))
                ) or (isinstance(node, ast.Import) and any(a.name.startswith("fr_dist") for a in node.names))
                if internal:
                    found.append(f"{path.relative_to(root)}:{node.lineno}")
    return sorted(set(found))


def test_no_module_over_500_lines():
    big = {
        str(p.relative_to(PKG.parent)): n
        for p in PKG.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not big, f"split by job (<= {MAX_LINES} lines): {big}"


def test_few_imports_hidden_in_functions():
    lazy = lazy_internal_imports()
    assert len(lazy) <= MAX_LAZY_INTERNAL_IMPORTS, "move to the module top (or fix the cycle):\n" + "\n".join(
        lazy
    )


def test_lazy_import_counter_sees_one(tmp_path):
    (tmp_path / "fr_dist").mkdir()
    (tmp_path / "fr_dist" / "a.py").write_text(
        "from fr_dist import comm\ndef f():\n    import os\n    from fr_dist.heads import x\n    from . import y\n"
    )
    assert lazy_internal_imports(tmp_path) == ["fr_dist/a.py:4", "fr_dist/a.py:5"]
