"""On-disk layout of fr_dist checkpoints: ``RUN/checkpoints/<step>/`` (no training knowledge).

    list_checkpoints(run) / latest_checkpoint(run)    complete folders (with meta.json), oldest first
    read_meta(folder) / verify_checkpoint(folder)      meta.json; sizes + CRC-32 of every listed file
    atomic_save(obj, path)                             torch.save to path.part + fsync + rename
    tmp_dir(run, step) -> finalize(run, step, meta)    write into .tmp-<step>/, then publish atomically
    prune(run, keep)                                   keep the newest ``keep`` complete checkpoints
    safe_load(path)                                    torch.load(weights_only=True): never runs code

Used by ``train/checkpoint.py`` (what goes into a checkpoint) and ``export.py`` (reading one).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zipfile
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "list_checkpoints",
    "latest_checkpoint",
    "step_dir",
    "tmp_dir",
    "describe_files",
    "verify_checkpoint",
    "read_meta",
    "safe_load",
    "atomic_save",
    "finalize",
    "prune",
    "checkpoint_root",
]


class CheckpointError(RuntimeError):
    pass


def checkpoint_root(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


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


def step_dir(output_dir, step: int) -> Path:
    return checkpoint_root(output_dir) / str(step)


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
        import zipfile

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


def tmp_dir(output_dir, step: int) -> Path:
    return checkpoint_root(output_dir) / f".tmp-{step}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj, path: Path) -> None:
    """torch.save to ``path.part`` + fsync + rename."""
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


def finalize(output_dir, step: int, meta: dict) -> Path:
    """Rank 0, after every rank wrote its files into the tmp folder: mark complete and publish.

    ``meta.json`` gets ``files`` (size + CRC-32 of every file): the ranks' ``files_rank<r>.json``
    (each rank describes what it wrote), plus whatever they do not list (DeepSpeed's own files).
    """
    tmp = tmp_dir(output_dir, step)
    files: dict = {}
    for part in sorted(tmp.glob("files_rank*.json")):
        files.update(json.loads(part.read_text()))
        part.unlink()
    rest = [f for f in tmp.rglob("*") if f.is_file() and str(f.relative_to(tmp)) not in files]
    files.update(describe_files(tmp, rest))
    meta = dict(meta, step=step, time=time.time(), format="fr_dist-ckpt-v1", files=files)
    (tmp / "meta.json.part").write_text(json.dumps(meta, indent=1))
    os.replace(tmp / "meta.json.part", tmp / "meta.json")
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(tmp)
    final = checkpoint_root(output_dir) / str(step)
    if final.exists():  # a re-save of the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def prune(output_dir, keep: int, protect: tuple = ()) -> None:
    """Keep the newest ``keep`` complete checkpoints (0 = keep all) and drop stale tmp folders."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith(".tmp-"):
            shutil.rmtree(p, ignore_errors=True)
    if keep > 0:
        for p in list_checkpoints(output_dir)[:-keep]:
            if p.resolve() not in {Path(x).resolve() for x in protect}:
                shutil.rmtree(p, ignore_errors=True)
