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
    Never raises for a damaged folder: whatever is wrong with it (meta.json included) is the reason.
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
                    # torch's zip reader (miniz) takes a member whose DOS attributes have the directory
                    # bit for a directory and reads no data: the tensor silently loads as zeros
                    odd = [i.filename for i in z.infolist() if i.external_attr & 0x10 and not i.is_dir()]
            except Exception as e:  # BadZipFile, EOFError, and what a flipped header bit gives: an
                # "encrypted" member (RuntimeError), an unknown compression (NotImplementedError), zlib.error
                return f"{f.relative_to(path)} is damaged ({type(e).__name__}: {e})"
            if bad is not None:
                return f"{f.relative_to(path)} is damaged (member {bad} fails its CRC)"
            if odd:
                return f"{f.relative_to(path)} is damaged (member {odd[0]} is marked as a directory)"
        return None
    if not isinstance(files, dict):
        return f"meta.json's files is a {type(files).__name__}, not a mapping of file records"
    for rel, info in sorted(files.items()):
        reason = _verify_file(path, rel, info, deep)
        if reason is not None:
            return reason
    return None


def _verify_file(folder: Path, rel: str, info, deep: bool) -> Optional[str]:
    """Why file ``rel`` of a checkpoint does not match its meta.json record ``info`` (None: it does)."""
    if not (isinstance(info, dict) and type(info.get("size")) is int and isinstance(info.get("crc32"), str)):
        return f"meta.json's record of {rel!r:.200} is malformed ({info!r:.100}; expected size and crc32)"
    parts = Path(rel).parts
    if not parts or Path(rel).is_absolute() or ".." in parts:
        return f"meta.json names {rel!r:.200}, which is not a file inside the checkpoint"
    f = folder / rel
    try:
        if not f.is_file():
            return f"{rel} is missing"
        size = f.stat().st_size
        if size != info["size"]:
            return f"{rel} has {size} bytes, meta.json records {info['size']} (truncated or overwritten)"
        if deep and _crc32(f) != info["crc32"]:
            return f"{rel} fails its CRC-32 check (meta.json {info['crc32']:.20})"
    except (OSError, ValueError) as e:  # unreadable, a name the OS refuses
        return f"{rel!r:.200} cannot be read ({e})"
    return None


def read_meta(path) -> dict:
    """meta.json of checkpoint folder ``path`` (a mapping); a missing or malformed one is a CheckpointError."""
    path = Path(path)
    meta = path / "meta.json"
    if not meta.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no meta.json)")
    try:
        data = json.loads(meta.read_text())
    except (ValueError, RecursionError) as e:  # bad JSON / UTF-8, too deeply nested
        raise CheckpointError(f"{meta}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{meta}: not a JSON object (got {type(data).__name__})")
    return data


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
