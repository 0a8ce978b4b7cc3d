"""No dead code in fr_dist/, benchmarks/, tools/: vulture over them, configured by ``[tool.vulture]``
in pyproject.toml (paths, min_confidence, and the framework hooks / public API it may not flag, each with
its reason). Tests are not users: a definition only the tests call is dead (move it into tests/) or public
API (list it there with the reason).

The scan is vulture's, stricter in the two ways the former ``tools/dead_code.py`` was:

* a module's own ``__all__`` is not a use (vulture counts it); a package ``__init__.py``'s ``__all__`` is
  (the package's public API, e.g. ``fr_dist.data.make_pairs_bin``);
* a module-level function or class named only inside its own body (recursion, ``isinstance(x, Self)``)
  is not used.

``python -m vulture`` from the repository root runs the same scan without these two rules.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

vulture = pytest.importorskip("vulture")

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - vulture depends on tomli below 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["vulture"]


class _Scan(vulture.Vulture):
    """vulture without the two uses described in the module docstring."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self._own: str | None = None  # name of the module-level def/class being visited

    def visit(self, node):
        top = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.col_offset == 0
        if not top:
            return super().visit(node)
        outer, self._own = self._own, node.name
        try:
            return super().visit(node)
        finally:
            self._own = outer

    def visit_Name(self, node):
        if not (isinstance(node.ctx, ast.Load) and node.id == self._own):
            super().visit_Name(node)

    def visit_Attribute(self, node):
        if not (isinstance(node.ctx, ast.Load) and node.attr == self._own):
            super().visit_Attribute(node)

    def visit_Assign(self, node):
        if self.filename.name == "__init__.py" or not any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            super().visit_Assign(node)


def find_dead(root: Path = ROOT, ignore_names=None, ignore_decorators=None, scanner=_Scan) -> list:
    """vulture's items (``filename``, ``first_lineno``, ``name``, ``message``) of dead code under
    ``root``'s configured paths; ``ignore_*`` default to pyproject.toml's."""
    v = scanner(
        ignore_names=CONFIG.get("ignore_names", []) if ignore_names is None else ignore_names,
        ignore_decorators=CONFIG.get("ignore_decorators", [])
        if ignore_decorators is None
        else ignore_decorators,
    )
    v.scavenge([str(root / p) for p in CONFIG["paths"] if (root / p).exists()])
    return v.get_unused_code(min_confidence=CONFIG["min_confidence"])


def _lines(items, root: Path = ROOT) -> list[str]:
    return [f"{Path(i.filename).relative_to(root)}:{i.first_lineno}: {i.message}" for i in items]


def test_config():
    assert CONFIG["paths"] == ["fr_dist", "benchmarks", "tools"] and CONFIG["min_confidence"] == 60


def test_no_dead_code():
    found = _lines(find_dead())
    assert not found, (
        "dead code (delete it; a tests-only helper goes to tests/; a framework hook or public API goes to "
        "[tool.vulture] ignore_names in pyproject.toml with its reason):\n" + "\n".join(found)
    )


def test_ignore_lists_are_current():
    """Every ignore_names / ignore_decorators entry still hides something (a stale one would hide a regression)."""
    bare = {i.name for i in find_dead(ignore_names=[], ignore_decorators=[])}
    stale = [n for n in CONFIG.get("ignore_names", []) if n not in bare]
    assert not stale, f"hide nothing any more, remove from [tool.vulture] ignore_names: {stale}"
    hidden = len(find_dead(ignore_decorators=[]))
    for deco in CONFIG.get("ignore_decorators", []):
        rest = [d for d in CONFIG["ignore_decorators"] if d != deco]
        assert len(find_dead(ignore_decorators=rest)) > 0 and hidden > 0, f"{deco} hides nothing any more"


PLANTED = {
    "fr_dist/__init__.py": '__all__ = ["api"]\n\n\ndef api():\n    pass\n',
    "fr_dist/a.py": (
        '__all__ = ["exported_only"]\n\n\n'
        "def used():\n    return 1\n\n\n"
        "def lonely():\n    return 2\n\n\n"
        "def recursive(n):\n    return recursive(n - 1) if n else 0\n\n\n"
        "def exported_only():\n    return 3\n\n\n"
        "class Net:\n    def forward(self, x):\n        return x\n\n\n"
        "print(used(), Net())\n"
    ),
    "tests/test_a.py": "from fr_dist.a import lonely\n\nlonely()\n",  # tests are not users
}


def test_checker_finds_planted_dead_code(tmp_path):
    for rel, src in PLANTED.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(src)
    found = sorted((Path(i.filename).relative_to(tmp_path).as_posix(), i.name) for i in find_dead(tmp_path))
    # `api` is the package's public API; `forward` an nn.Module hook (ignore_names); `used` has a caller
    assert found == [
        ("fr_dist/a.py", "exported_only"),
        ("fr_dist/a.py", "lonely"),
        ("fr_dist/a.py", "recursive"),
    ]
    # plain vulture counts a module's own __all__ and a function's own body as uses: the two rules matter
    plain = {i.name for i in find_dead(tmp_path, scanner=vulture.Vulture)}
    assert "lonely" in plain and "recursive" not in plain and "exported_only" not in plain
