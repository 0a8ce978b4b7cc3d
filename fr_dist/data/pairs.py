"""insightface ``.bin`` verification files: a pickle of (list of encoded images, list of bools).

Images ``2i`` and ``2i+1`` form pair ``i``. Files written under Python 2 need
``encoding='bytes'``; both kinds are read. :func:`sample_pairs` / :func:`make_pairs_bin` build a
pair list (half genuine, half impostor) from labelled images, e.g. held-out synthetic identities.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["read_bin", "write_bin", "sample_pairs", "make_pairs_bin"]


def read_bin(path) -> tuple[list, list]:
    """(list of encoded image bytes, list of bool) with a clear error for anything else."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            try:
                obj = pickle.load(f)
            except UnicodeDecodeError:  # Python 2 `str` images: keep them as bytes
                f.seek(0)
                obj = pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise
    except Exception as e:  # UnpicklingError, EOFError, ValueError, ImportError of odd classes...
        raise ValueError(f"{path}: not an insightface .bin pair file ({type(e).__name__}: {e})") from None
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise ValueError(
            f"{path}: not an insightface .bin pair file (expected a pickled (images, issame) pair, "
            f"got {type(obj).__name__})"
        )
    bins, issame = obj
    try:
        bins = [b if isinstance(b, bytes) else bytes(b) for b in bins]
        issame = [bool(s) for s in issame]
    except TypeError as e:
        raise ValueError(f"{path}: images must be byte strings and issame booleans ({e})") from None
    if len(bins) != 2 * len(issame):
        raise ValueError(f"{path}: {len(bins)} images for {len(issame)} pairs (expected {2 * len(issame)})")
    return bins, issame


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
