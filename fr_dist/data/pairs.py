"""insightface ``.bin`` verification files: a pickle of (list of encoded images, list of bools).

Read with a restricted unpickler (never ``pickle.load``): only containers, bytes/str, numbers,
bools and numpy arrays/scalars are admitted, so a crafted ``evil.bin`` is refused, not executed.

Images ``2i`` and ``2i+1`` form pair ``i``. Files written under Python 2 need
``encoding='bytes'``; both kinds are read. :func:`sample_pairs` / :func:`make_pairs_bin` build a
pair list (half genuine, half impostor) from labelled images, e.g. held-out synthetic identities.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Sequence

import numpy as np

from fr_dist.errors import BinUnpicklingError

__all__ = ["read_bin", "write_bin", "sample_pairs", "make_pairs_bin"]


# The only globals an insightface .bin may name: numpy arrays / scalars / dtypes (issame as a numpy
# bool array, images as uint8 or object arrays in some community files) and ``_codecs.encode`` (how
# Python 3 writes ``bytes`` at pickle protocol <= 2). Both numpy 1 (numpy.core) and 2 (numpy._core).
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"),
    ("builtins", "bytearray"),
    ("__builtin__", "bytearray"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy", "bool_"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
}


class _BinUnpickler(pickle.Unpickler):
    """Admits containers, bytes/str, numbers, bools and the numpy array types above; nothing else."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise BinUnpicklingError(
            f"refused global {module}.{name}: an insightface .bin holds only image bytes, bools and "
            "numpy arrays (a crafted pickle can run code; this reader never imports anything else)"
        )

    def persistent_load(self, pid):
        raise BinUnpicklingError(f"refused persistent id {pid!r}")


def _restricted_load(f, **kwargs):
    return _BinUnpickler(f, **kwargs).load()


def read_bin(path) -> tuple[list, list]:
    """(list of encoded image bytes, list of bool) with a clear error for anything else.

    The pickle is read by a restricted unpickler (:data:`_ALLOWED_GLOBALS`): a file naming any
    other class or function is refused before anything from it is called.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            try:
                obj = _restricted_load(f)
            except UnicodeDecodeError:  # Python 2 `str` images: keep them as bytes
                f.seek(0)
                obj = _restricted_load(f, encoding="bytes")
    except FileNotFoundError:
        raise
    except BinUnpicklingError as e:
        raise ValueError(f"{path}: not a safe insightface .bin pair file: {e}") from None
    except Exception as e:  # UnpicklingError, EOFError, ValueError...
        raise ValueError(f"{path}: not an insightface .bin pair file ({type(e).__name__}: {e})") from None
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise ValueError(
            f"{path}: not an insightface .bin pair file (expected a pickled (images, issame) pair, "
            f"got {type(obj).__name__})"
        )
    bins, issame = obj
    try:
        bins = [_image_bytes(b) for b in bins]
        issame = [bool(s) for s in np.asarray(issame).reshape(-1).tolist()]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: images must be byte strings and issame booleans ({e})") from None
    if len(bins) != 2 * len(issame):
        raise ValueError(f"{path}: {len(bins)} images for {len(issame)} pairs (expected {2 * len(issame)})")
    return bins, issame


def _image_bytes(b) -> bytes:
    if isinstance(b, bytes):
        return b
    if isinstance(b, np.ndarray):  # a uint8 buffer of the encoded file
        if b.dtype != np.uint8:
            raise TypeError(f"an image stored as a numpy array must be uint8, got {b.dtype}")
        return b.tobytes()
    if isinstance(b, (bytearray, memoryview)):
        return bytes(b)
    if isinstance(b, str):  # Python 2 str decoded as latin-1
        return b.encode("latin-1")
    raise TypeError(f"image entries must be byte strings, got {type(b).__name__}")


def write_bin(path, images: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write an insightface ``.bin`` (pickle protocol 4, readable by insightface's loader)."""
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs (expected {2 * len(issame)})")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(([bytes(b) for b in images], [bool(s) for s in issame]), f, protocol=4)


def sample_pairs(labels: Sequence[int], num_pairs: int, seed: int = 0) -> list[tuple[int, int, bool]]:
    """``num_pairs`` (i, j, same) image-index pairs: ceil(P/2) genuine, floor(P/2) impostor.

    Genuine pairs join two different images of an identity with >= 2 images; impostor pairs two
    different identities. The pair order is shuffled; deterministic from ``seed``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng([int(seed), 0xB1])
    by_id: dict[int, np.ndarray] = {}
    for c in np.unique(labels):
        by_id[int(c)] = np.flatnonzero(labels == c)
    ids = np.array(sorted(by_id))
    multi = np.array([c for c in ids if by_id[int(c)].size >= 2])
    n_same = (num_pairs + 1) // 2
    n_diff = num_pairs - n_same
    if n_same and multi.size == 0:
        raise ValueError("genuine pairs need an identity with at least 2 images")
    if n_diff and ids.size < 2:
        raise ValueError("impostor pairs need at least 2 identities")
    pairs = []
    for _ in range(n_same):
        c = int(rng.choice(multi))
        i, j = rng.choice(by_id[c], size=2, replace=False)
        pairs.append((int(i), int(j), True))
    for _ in range(n_diff):
        a, b = rng.choice(ids, size=2, replace=False)
        pairs.append((int(rng.choice(by_id[int(a)])), int(rng.choice(by_id[int(b)])), False))
    return [pairs[k] for k in rng.permutation(len(pairs))]


def make_pairs_bin(
    path, images: Sequence[bytes], labels: Sequence[int], num_pairs: int, seed: int = 0
) -> dict:
    """Write a ``.bin`` of ``num_pairs`` pairs drawn from labelled encoded images; returns counts."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    pairs = sample_pairs(labels, num_pairs, seed)
    bins, issame = [], []
    for i, j, same in pairs:
        bins += [images[i], images[j]]
        issame.append(same)
    write_bin(path, bins, issame)
    return {
        "path": str(path),
        "pairs": len(pairs),
        "same": int(sum(issame)),
        "diff": len(pairs) - int(sum(issame)),
    }
