"""Writing a checkpoint so that a crash at any point leaves the previous ones intact.

    atomic_save(obj, path)                  torch.save to path.part + fsync + rename
    finalize(run, step, meta)               .tmp-<step>/ -> meta.json (written last) -> <step>/ (rename)
    remove_partial(run) / prune(run, keep)  drop .tmp-* folders / keep the newest ``keep`` checkpoints

Folder names and meta.json's ``files`` record come from :mod:`fr_dist.checkpoint.layout`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from fr_dist.checkpoint.layout import (
    FORMAT,
    checkpoint_root,
    describe_files,
    list_checkpoints,
    step_dir,
    tmp_dir,
)

__all__ = ["atomic_save", "finalize", "remove_partial", "prune"]


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
    meta = dict(meta, step=step, time=time.time(), format=FORMAT, files=files)
    (tmp / "meta.json.part").write_text(json.dumps(meta, indent=1))
    os.replace(tmp / "meta.json.part", tmp / "meta.json")
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(tmp)
    final = step_dir(output_dir, step)
    if final.exists():  # a re-save of the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def remove_partial(output_dir) -> list[Path]:
    """Remove the ``.tmp-*`` folders of interrupted saves; returns the folders removed."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    stale = sorted(p for p in root.iterdir() if p.name.startswith(".tmp-"))
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def prune(output_dir, keep: int, protect: tuple = ()) -> None:
    """Keep the newest ``keep`` complete checkpoints (0 = keep all) and drop stale tmp folders."""
    remove_partial(output_dir)
    if keep > 0:
        for p in list_checkpoints(output_dir)[:-keep]:
            if p.resolve() not in {Path(x).resolve() for x in protect}:
                shutil.rmtree(p, ignore_errors=True)
