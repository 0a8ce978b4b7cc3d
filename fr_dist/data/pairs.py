"""insightface ``.bin`` verification files: a pickle of (list of encoded images, list of bools).

Images ``2i`` and ``2i+1`` form pair ``i``. Files written under Python 2 need ``encoding='bytes'``.
"""

from __future__ import annotations

import pickle
from pathlib import Path

__all__ = ["read_bin", "write_bin"]


def read_bin(path) -> tuple[list, list]:
    """(list of encoded image bytes, list of bool) with a clear error for anything else."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            try:
                bins, issame = pickle.load(f)
            except UnicodeDecodeError:
                f.seek(0)
                bins, issame = pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: not an insightface .bin pair file ({type(e).__name__}: {e})") from None
    bins = [bytes(b) if not isinstance(b, bytes) else b for b in bins]
    issame = [bool(s) for s in issame]
    if len(bins) != 2 * len(issame):
        raise ValueError(f"{path}: {len(bins)} images for {len(issame)} pairs (expected {2 * len(issame)})")
    return bins, issame


def write_bin(path, images: list, issame: list) -> None:
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs")
    with open(path, "wb") as f:
        pickle.dump((list(images), [bool(s) for s in issame]), f, protocol=4)
