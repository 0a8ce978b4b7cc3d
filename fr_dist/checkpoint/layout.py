"""On-disk layout of fr_dist checkpoints: ``RUN/checkpoints/<step>/`` (reading side; no training knowledge).

    checkpoint_root(run) / step_dir(run, step) / tmp_dir(run, step)   folder names
    list_checkpoints(run) / latest_checkpoint(run)    complete folders (with meta.json), oldest first
    newest_usable(run, on_skip)                       the newest complete folder that verifies
    read_meta(folder) / verify_checkpoint(folder)     meta.json; sizes + CRC-32 of every listed file
    describe_files(folder, paths)                     what meta.json records of each file
    safe_load(path)                                   torch.load(weights_only=True): never runs code

The writing side (temp folder, fsync, rename, meta.json last, keep-N) is :mod:`fr_dist.checkpoint.atomic`.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from fr_dist.errors import CheckpointError

__all__ = [
    "CheckpointError",
    "checkpoint_root",
    "step_dir",
    "tmp_dir",
    "list_checkpoints",
    "latest_checkpoint",
    "newest_usable",
    "describe_files",
    "verify_checkpoint",
    "read_meta",
    "safe_load",
]

FORMAT = "fr_dist-ckpt-v1"
"""meta.json's ``format`` of the checkpoints this package writes."""


def checkpoint_root(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir(output_dir, step: int) -> Path:
    return checkpoint_root(output_dir) / str(step)


def tmp_dir(output_dir, step: int) -> Path:
    """Where checkpoint ``step`` is written before it is published as :func:`step_dir`."""
    return checkpoint_root(output_dir) / f".tmp-{step}"


def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints (with meta.json), oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.isdigit() and (p / "meta.json").is_file()]
    return sorted(done, key=lambda p: int(p.name))


def latest_checkpoint(output_dir) -> Optional[Path]:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def newest_usable(output_dir, on_skip: Optional[Callable[[Path, str], None]] = None) -> Optional[Path]:
    """The newest complete checkpoint that verifies (None: none does); ``on_skip(path, reason)`` is
    called for each newer one that does not."""
    for p in reversed(list_checkpoints(output_dir)):
        reason = verify_checkpoint(p)
        if reason is None:
            return p
        if on_skip is not None:
            on_skip(p, reason)
    return None


def _crc32(path: Path, chunk: int = 8 << 20) -> str:
    crc = 0
    with open(path, "rb") as f:
        while True:
            buf = f.read(chunk)
            if not buf:
                return f"{crc & 0xFFFFFFFF:08x}"
            crc = zlib.crc32(buf, crc)


def describe_files(folder: Path, paths) -> dict:
    """``{relative path: {size, crc32}}`` of ``paths`` inside ``folder`` (streaming CRC-32)."""
    return {
        str(Path(p).relative_to(folder)): {"size": Path(p).stat().st_size, "crc32": _crc32(Path(p))}
        for p in paths
    }


def verify_checkpoint(path, deep: bool = True) -> Optional[str]:
    """None when ``path`` is a usable checkpoint, else the reason it is not (missing/short/corrupt file).

    With meta.json's ``files`` list: every file exists with its size (and CRC-32 when ``deep``).
    Older checkpoints (no list): every ``.pt`` must be a zip whose member CRCs check out.
    """
    path = Path(path)
    try:
        meta = read_meta(path)
    except (CheckpointError, ValueError, OSError) as e:
        return str(e)
    files = meta.get("files")
    if files is None:
        for f in sorted(path.glob("**/*.pt")):
            try:
                with zipfile.ZipFile(f) as z:
                    bad = z.testzip() if deep else None
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                return f"{f.relative_to(path)} is damaged ({e})"
            if bad is not None:
                return f"{f.relative_to(path)} is damaged (member {bad} fails its CRC)"
        return None
    for rel, info in sorted(files.items()):
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        size = f.stat().st_size
        if size != info["size"]:
            return f"{rel} has {size} bytes, meta.json records {info['size']} (truncated or overwritten)"
        if deep and _crc32(f) != info["crc32"]:
            return f"{rel} fails its CRC-32 check (meta.json {info['crc32']})"
    return None


def read_meta(path) -> dict:
    path = Path(path)
    meta = path / "meta.json"
    if not meta.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no meta.json)")
    try:
        return json.loads(meta.read_text())
    except ValueError as e:
        raise CheckpointError(f"{meta}: not valid JSON ({e})") from None


def _safe_globals() -> list:
    """numpy's array reconstruction (RNG states of checkpoints written before they were tensors)."""
    ma = getattr(np, "_core", None) or np.core
    rec = ma.multiarray._reconstruct
    out = [rec, (rec, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype]
    out += [type(np.dtype(t)) for t in ("uint32", "int64", "float64", "uint8", "bool")]
    return out


def safe_load(path, map_location="cpu", mmap: bool = False):
    """``torch.load(weights_only=True)`` (tensors, containers, numbers, strings; no code), with
    numpy's array reconstruction allowed; any failure is a CheckpointError naming the file.

    ``mmap=True`` maps the tensors' storages instead of reading them (zip-format files, CPU): only the
    pages a caller touches are read, so a rank that re-shards from W saved shards reads its own rows,
    not W whole files."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            if mmap and map_location == "cpu" and zipfile.is_zipfile(path):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing from the checkpoint") from None
    except Exception as e:  # UnpicklingError (a refused global), zip errors of a damaged file, ...
        msg = str(e).strip().splitlines()
        short = next((ln for ln in msg if "Unsupported global" in ln or "WeightsUnpickler" in ln), None)
        short = short or (msg[0] if msg else type(e).__name__)
        raise CheckpointError(
            f"{path}: refused or unreadable ({type(e).__name__}: {short.strip()}); fr_dist loads "
            "checkpoints with weights_only=True and never runs code from a checkpoint file"
        ) from None
