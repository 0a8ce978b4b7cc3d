"""Every fr_dist error type is defined once, in fr_dist/errors.py; the old import paths still work."""

from __future__ import annotations

import ast
import builtins
import importlib
import pickle
from pathlib import Path

import pytest

from fr_dist import errors

PKG = Path(__file__).resolve().parents[2] / "fr_dist"

# (old module, name, the builtin it has always derived from)
OLD_HOMES = [
    ("fr_dist.errors", "ConfigError", ValueError),
    ("fr_dist.train.config", "ConfigError", ValueError),
    ("fr_dist.checkpoint_io", "CheckpointError", RuntimeError),
    ("fr_dist.train.checkpoint", "CheckpointError", RuntimeError),
    ("fr_dist.checkpoint", "CheckpointError", RuntimeError),
    ("fr_dist.checkpoint.layout", "CheckpointError", RuntimeError),
    ("fr_dist.comm", "CollectiveError", RuntimeError),
    ("fr_dist.comm", "CollectiveTimeout", RuntimeError),
    ("fr_dist.runtime", "RendezvousError", RuntimeError),
    ("fr_dist.data.recordio", "RecordIOError", ValueError),
    ("fr_dist.data", "RecordIOError", ValueError),
    ("fr_dist.data.pairs", "BinUnpicklingError", pickle.UnpicklingError),
]


@pytest.mark.parametrize("module, name, builtin", OLD_HOMES, ids=[f"{m}.{n}" for m, n, _ in OLD_HOMES])
def test_old_name_is_the_one_in_errors(module, name, builtin):
    cls = getattr(importlib.import_module(module), name)
    assert cls is getattr(errors, name)
    assert cls.__module__ == "fr_dist.errors"
    assert issubclass(cls, errors.FrDistError) and issubclass(cls, builtin)  # old `except`s still catch it


def test_hierarchy_is_unchanged():
    assert issubclass(errors.CollectiveTimeout, errors.CollectiveError)
    assert not issubclass(errors.RendezvousError, errors.CollectiveError)  # no collective ran
    defined = {n for n, v in vars(errors).items() if isinstance(v, type) and v.__module__ == errors.__name__}
    assert set(errors.__all__) == defined
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.FrDistError)


def test_messages_are_unchanged():
    e = errors.RecordIOError("train.rec", "truncated", key=3, offset=24)
    assert str(e) == "train.rec, key 3, byte offset 24: truncated"
    assert (e.path, e.key, e.offset, e.reason) == ("train.rec", 3, 24, "truncated")
    assert str(errors.RecordIOError("train.idx", "bad line")) == "train.idx: bad line"


def _exception_names() -> set[str]:
    return {n for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException)}


def error_classes_outside_errors_py(pkg: Path) -> list[str]:
    """``file:line: name`` of every ``class X(<an exception>)`` in ``pkg`` except in errors.py (by ``ast``:
    a base named like a builtin exception, an fr_dist error, or ``...Error`` / ``...Exception`` / ``...Timeout``)."""
    known = _exception_names() | set(errors.__all__) | {"UnpicklingError", "PickleError"}
    found = []
    for path in sorted(pkg.rglob("*.py")):
        if path == pkg / "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef):
                continue
            bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
            if bases & known or any(b.endswith(("Error", "Exception", "Timeout")) for b in bases):
                found.append(f"{path.relative_to(pkg.parent).as_posix()}:{node.lineno}: {node.name}")
    return found


def test_no_error_type_defined_outside_errors_py():
    """A ``class X(SomeError)`` anywhere else in fr_dist/ is a second home (define it in errors.py)."""
    found = error_classes_outside_errors_py(PKG)
    assert not found, "error types outside fr_dist/errors.py:\n" + "\n".join(found)


def test_checker_sees_an_error_class(tmp_path):
    (tmp_path / "fr_dist" / "sub").mkdir(parents=True)
    (tmp_path / "fr_dist" / "errors.py").write_text("class A(Exception):\n    pass\n")
    (tmp_path / "fr_dist" / "sub" / "x.py").write_text(
        "import pickle\nclass B(pickle.UnpicklingError):\n    pass\nclass C(ValueError):\n    pass\n"
        "class D:\n    pass\n"
    )
    assert error_classes_outside_errors_py(tmp_path / "fr_dist") == [
        "fr_dist/sub/x.py:2: B",
        "fr_dist/sub/x.py:4: C",
    ]
