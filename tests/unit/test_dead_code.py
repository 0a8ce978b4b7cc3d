"""No top-level function or class in fr_dist/ without a caller outside tests (tools/dead_code.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Known, each with the change that removes it from this list.
ALLOWED = {
    # the reference assembly of the re-sharding tests (checkpoints re-shard through sharding.copy_rows)
    "assemble",
    # the synthetic IJB-layout folder generator (issue 10's target keeps it in data/synthetic.py,
    # through data/ijb_meta.py); its user is tests/unit/test_ijb_synthetic.py
    "make_synthetic_ijb",
}


def _tool():
    spec = importlib.util.spec_from_file_location("dead_code", ROOT / "tools" / "dead_code.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_no_new_unreferenced_definitions():
    found = _tool().find_unreferenced(ROOT)
    new = [f"{f}:{line}: {name}" for f, line, name in found if name not in ALLOWED]
    assert not new, "no caller outside tests (delete, or use it):\n" + "\n".join(new)


def test_allowlist_is_current():
    names = {name for _, _, name in _tool().find_unreferenced(ROOT)}
    stale = ALLOWED - names
    if stale:
        pytest.fail(f"now used or deleted, remove from ALLOWED: {sorted(stale)}")


def test_checker_finds_an_unreferenced_function(tmp_path):
    (tmp_path / "fr_dist").mkdir()
    (tmp_path / "fr_dist" / "a.py").write_text(
        "def used():\n    return 1\n\ndef lonely():\n    return lonely\n\nX = used()\n"
    )
    (tmp_path / "fr_dist" / "__init__.py").write_text('__all__ = ["api"]\n\ndef api():\n    pass\n')
    found = _tool().find_unreferenced(tmp_path)
    assert [(f, name) for f, _, name in found] == [("fr_dist/a.py", "lonely")]
