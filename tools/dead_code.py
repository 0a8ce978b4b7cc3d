"""List top-level functions and classes of fr_dist/ that nothing outside tests refers to.

    python tools/dead_code.py            # one line per unreferenced definition; exit 1 if any

How: every ``fr_dist/**/*.py`` is parsed with ``ast``; a top-level ``def`` / ``class`` counts as
used when its name appears as a name, an attribute or an imported name in any product file
(``fr_dist/``, ``benchmarks/``, ``tools/``) other than inside its own body, or as a console
script / entry point in ``pyproject.toml``, or is listed in a package's ``__init__.py``
``__all__`` (the package's public API, e.g. ``fr_dist.data.make_pairs_bin``). Other strings (a
module's own ``__all__``) do not count; tests do not count. A name is matched without resolving which module it comes from, so two definitions with
the same name keep each other alive: the list errs towards silence, never towards deleting code
something uses. Dunder names (``__getattr__``) are module hooks and are skipped.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("fr_dist", "benchmarks", "tools")


def _definitions(tree: ast.Module) -> list[ast.AST]:
    return [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]


def _used_names(tree: ast.AST, skip: set[int]) -> set[str]:
    """Names used in ``tree`` outside the nodes whose ids are in ``skip`` (a definition's own body)."""
    out: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if id(node) in skip:
            continue
        if isinstance(node, ast.Name):
            out.add(node.id)
        elif isinstance(node, ast.Attribute):
            out.add(node.attr)
        elif isinstance(node, ast.alias):
            out.add(node.name.rsplit(".", 1)[-1])
        stack.extend(ast.iter_child_nodes(node))
    return out


def _entry_points() -> set[str]:
    py = ROOT / "pyproject.toml"
    text = py.read_text() if py.is_file() else ""
    return set(re.findall(r'=\s*"[\w.]+:(\w+)"', text))


def _package_api(root: Path) -> set[str]:
    """Names in the ``__all__`` of every package ``__init__.py`` under fr_dist/."""
    out: set[str] = set()
    for init in (root / "fr_dist").rglob("__init__.py"):
        for node in ast.parse(init.read_text()).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
                out |= {e.value for e in getattr(node.value, "elts", []) if isinstance(e, ast.Constant)}
    return out


def find_unreferenced(root: Path = ROOT) -> list[tuple[str, int, str]]:
    """[(file relative to root, line, name)] of top-level definitions in fr_dist/ with no product use."""
    trees = {}
    for top in PRODUCT:
        for path in sorted((root / top).rglob("*.py")):
            trees[path] = ast.parse(path.read_text(), str(path))
    uses_elsewhere: dict[Path, set[str]] = {p: _used_names(t, set()) for p, t in trees.items()}
    entry = _entry_points() | _package_api(root)
    found = []
    for path, tree in trees.items():
        if path.relative_to(root).parts[0] != "fr_dist":
            continue
        for d in _definitions(tree):
            name = d.name
            if name.startswith("__") or name in entry:
                continue
            used = any(name in names for p, names in uses_elsewhere.items() if p != path)
            if not used:  # in its own file, outside its own body
                used = name in _used_names(tree, {id(d)})
            if not used:
                found.append((str(path.relative_to(root)), d.lineno, name))
    return found


def main() -> int:
    found = find_unreferenced()
    for f, line, name in found:
        print(f"{f}:{line}: {name} has no caller outside tests")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
