"""Step-level, atomic, world-size independent checkpoints: ``RUN/checkpoints/<step>/``.

Layout of one checkpoint (every file written by ``torch.save``)::

    <step>/backbone.pt           backbone state dict (rank 0; DDP/DeepSpeed wrappers stripped)
    <step>/backbone_optim.pt     backbone optimizer state (rank 0; replicated under DDP)
    <step>/deepspeed/            DeepSpeed engine checkpoint (engine: deepspeed; same-world-size resume);
                                 then backbone.pt holds the fp32 master weights and backbone_optim.pt
                                 the gathered optimizer state by parameter name (any world size)
    <step>/head_rank<r>.pt       classifier shard of rank r: class_start, num_local, num_classes,
                                 embedding_size, weight rows, replicated params (bias), the shard's
                                 optimizer state (momentum / Adam moments per row), sampler generator
    <step>/rng_rank<r>.pt        torch / numpy / python (/ cuda) RNG states of rank r
    <step>/trainer.pt            step, epoch, schedulers, GradScaler, data sampler, world size (rank 0)
    <step>/config.yaml           the resolved config
    <step>/meta.json             written last: the completeness marker, with every file's size and
                                 CRC-32 (``files``), computed by the rank that wrote the file

Atomicity: everything is written into ``checkpoints/.tmp-<step>/``; after a barrier rank 0 writes
``meta.json`` and renames the folder to ``<step>/``. A crash at any point leaves the previous
checkpoints untouched and at worst a ``.tmp-*`` folder, which resume ignores and the next save
removes. ``resume=auto`` picks the newest folder that has ``meta.json`` *and verifies* (sizes and
CRC-32 of meta.json's file list; zip CRCs for checkpoints written before the list existed); a
damaged one is skipped with a message and the previous complete one is used. Rank 0 decides and
broadcasts, so every rank resumes from the same step.

Failures: any rank's OSError while saving (ENOSPC, EACCES, ...) is agreed on by an all-reduce of a
flag before ``finalize``; rank 0 removes the ``.tmp-<step>`` folder and every rank raises a
:class:`CheckpointError` naming the path and the cause ("disk full"). No rank waits at a barrier
for a rank that already failed, and the previous checkpoints are untouched.

Loading never unpickles code: every ``torch.load`` is ``weights_only=True`` (:func:`safe_load`),
with only numpy's array reconstruction allow-listed for the RNG states of older checkpoints.

Re-sharding: on load each rank reads the row ranges of every saved shard that overlap its own
``[class_start, class_start + num_local)`` and copies those rows (weights and row-wise optimizer
state), so a checkpoint saved on W ranks resumes on any W' (including ranks with zero classes)
without materialising the full [K, D] matrix on one rank (``ShardedClassifier.load_resharded``,
row arithmetic in ``fr_dist/sharding.py``).

What is saved is a ``{name: state}`` mapping handed over by the caller (torchtitan's
``CheckpointManager(states=...)``); this module knows no trainer attribute:

* a state with ``save_files(folder, rank) -> {file: object}`` / ``load_files(folder, meta)`` owns
  its files (the backbone engine; :class:`HeadShards` -> ``head_rank<r>.pt``; :class:`RngState`);
* any other state is ``Stateful`` (``state_dict()`` / ``load_state_dict()``) and saved by rank 0
  into ``trainer.pt`` under its name, except ``"trainer"`` (step, epoch, ...), whose keys sit at
  the top level of ``trainer.pt`` (the layout checkpoints have had since v1).

The on-disk helpers (list / latest / verify / atomic save / finalize / prune / safe_load) live in
``fr_dist/checkpoint_io.py``.
"""

from __future__ import annotations

import errno
import json
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from fr_dist import checkpoint_io as io
from fr_dist.checkpoint_io import (  # re-exported: the checkpoint API of fr_dist.train
    CheckpointError,
    atomic_save,
    checkpoint_root,
    finalize,
    latest_checkpoint,
    list_checkpoints,
    prune,
    read_meta,
    safe_load,
    step_dir,
    tmp_dir,
    verify_checkpoint,
)
from fr_dist.train.logging import rank0_print

__all__ = [
    "CheckpointError",
    "HeadShards",
    "RngState",
    "save_checkpoint",
    "load_checkpoint",
    "resume_path",
    "load_head_shard",
    "rng_state",
    "set_rng_state",
    "atomic_save",
    "finalize",
    "latest_checkpoint",
    "list_checkpoints",
    "prune",
    "read_meta",
    "safe_load",
    "step_dir",
    "tmp_dir",
    "verify_checkpoint",
]


def _clean_stale_tmp(output_dir) -> None:
    root = checkpoint_root(output_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                rank0_print(0, f"checkpoint: removing the partial {p} (an interrupted save)")
                shutil.rmtree(p, ignore_errors=True)


def resume_path(output_dir, resume: str, rank: int = 0) -> Optional[Path]:
    """``checkpoint.resume``: none -> None, auto -> newest complete checkpoint that verifies (or None),
    else that folder (verified; a damaged explicit choice is an error).

    With a process group, rank 0 verifies and broadcasts its choice: every rank gets the same path.
    """
    if resume == "none":
        return None
    from fr_dist import comm

    chosen = -1
    if resume != "auto":
        reason = verify_checkpoint(resume) if rank == 0 else None
        if reason is not None:
            raise CheckpointError(f"checkpoint.resume={resume}: not usable: {reason}")
        return Path(resume)
    if rank == 0:
        _clean_stale_tmp(output_dir)
        for p in reversed(list_checkpoints(output_dir)):
            reason = verify_checkpoint(p)
            if reason is None:
                chosen = int(p.name)
                break
            rank0_print(rank, f"resume=auto: skipping checkpoint {p}: {reason}; trying the previous one")
    chosen = int(comm.broadcast(torch.tensor([chosen], dtype=torch.int64), 0, name="resume_step").item())
    return None if chosen < 0 else step_dir(output_dir, chosen)


# ----------------------------------------------------------------------------- head shards


def _head_files(folder: Path) -> list[Path]:
    files = sorted(Path(folder).glob("head_rank*.pt"), key=lambda p: int(p.stem.replace("head_rank", "")))
    if not files:
        raise CheckpointError(f"{folder}: no head_rank*.pt files")
    return files


def load_head_shard(head, optimizer, folder: Path) -> None:
    """Fill this rank's rows (and row-wise optimizer state) from the saved shards of any world size."""
    # mapped, not read: each rank reads only the saved rows that overlap its own (1x the head's bytes
    # over all ranks on a resume at the same world size, instead of W x)
    shards = (safe_load(f, mmap=True) for f in _head_files(folder))
    head.load_resharded(shards, optimizer, source=f"checkpoint {folder}")


class HeadShards:
    """A sharded classifier and its optimizer as a checkpoint state: ``head_rank<r>.pt`` per rank."""

    def __init__(self, head, optimizer):
        self.head, self.optimizer = head, optimizer

    def save_files(self, folder: Path, rank: int) -> dict:
        return {f"head_rank{rank}.pt": self.head.shard_state(self.optimizer)}

    def load_files(self, folder: Path, meta: dict) -> None:
        load_head_shard(self.head, self.optimizer, folder)


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    np_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    st = dict(torch=torch.get_rng_state(), numpy=np_state, python=random.getstate())
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    name, keys, *rest = st["numpy"]
    if torch.is_tensor(keys):
        keys = keys.numpy().astype(np.uint32)
    np.random.set_state((name, keys, *rest))
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(st["cuda"])


class RngState:
    """torch / numpy / python RNG states of this rank (``rng_rank<r>.pt``); restored only on the
    world size they were saved on (another world size has other per-rank streams)."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def save_files(self, folder: Path, rank: int) -> dict:
        return {f"rng_rank{rank}.pt": rng_state()}

    def load_files(self, folder: Path, meta: dict) -> None:
        path = Path(folder) / f"rng_rank{self.rank}.pt"
        if path.exists() and meta.get("world_size") == self.world_size:
            set_rng_state(safe_load(path))


# ----------------------------------------------------------------------------- failures


def _all_ok(ok: bool, name: str) -> bool:
    """True when every rank reports ``ok`` (an all-reduce of a flag; no process group: ``ok``)."""
    from fr_dist import comm

    flag = torch.tensor([0.0 if ok else 1.0])
    return float(comm.all_reduce(flag, "max", name=name).item()) == 0.0


def _cause(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return "disk full (ENOSPC)"
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"not writable ({errno.errorcode.get(e.errno, e.errno)}: {e.strerror})"
    if isinstance(e, OSError) and e.errno is not None:
        return f"{errno.errorcode.get(e.errno, e.errno)}: {e.strerror}"
    return f"{type(e).__name__}: {e}"


def _save_failed(out, step: int, tmp: Path, rank: int, error: Optional[str]) -> CheckpointError:
    """Rank 0 removes the partial folder; every rank gets an error naming the path and the cause."""
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    last = latest_checkpoint(out)
    mine = f"rank {rank}: {error}" if error else "another rank failed to write its part (see its error)"
    return CheckpointError(
        f"checkpoint at step {step} NOT saved: {mine}; the partial folder {tmp} was removed; "
        f"last good checkpoint: {last if last is not None else 'none'} (intact)"
    )


# ----------------------------------------------------------------------------- {name: state}


def _owns_files(state) -> bool:
    return hasattr(state, "save_files")


def _write_rank_files(states: dict, tmp: Path, rank: int, step: int, config) -> None:
    """This rank's part of the checkpoint (+ files_rank<r>.json: size and CRC-32 of what it wrote)."""
    from fr_dist.train.config_load import save_config

    written = []
    for state in states.values():
        if _owns_files(state):
            for name, obj in state.save_files(tmp, rank).items():
                atomic_save(obj, tmp / name)
                written.append(name)
    if rank == 0:
        record = dict(step=step)
        for name, state in states.items():
            if _owns_files(state):
                continue
            if name == "trainer":  # the v1 layout: step, epoch, ... at the top level
                record.update(state.state_dict())
            else:
                record[name] = state.state_dict()
        atomic_save(record, tmp / "trainer.pt")
        written.append("trainer.pt")
        if config is not None:
            save_config(config, tmp / "config.yaml")
            written.append("config.yaml")
    mine = [tmp / n for n in written if (tmp / n).is_file()]  # DeepSpeed's own files: described by finalize
    desc = tmp / f"files_rank{rank}.json"
    desc.write_text(json.dumps(io.describe_files(tmp, sorted(mine))))


def save_checkpoint(out, step: int, states: dict, rank: int, meta: dict, keep: int = 0, config=None) -> Path:
    """Write checkpoint ``out/checkpoints/<step>`` of ``states`` (all ranks call this); ``meta``
    (world_size, num_classes, ...) goes into meta.json, ``config`` into config.yaml, and only the
    newest ``keep`` checkpoints stay (0 = all).

    Every failure path is agreed on by all ranks (flag all-reduces), so no rank waits forever.
    """
    tmp = tmp_dir(out, step)
    error = None
    if rank == 0:
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        except OSError as e:
            error = f"cannot create {tmp}: {_cause(e)}"
    if not _all_ok(error is None, "checkpoint_mkdir"):
        raise _save_failed(out, step, tmp, rank, error)
    try:
        _write_rank_files(states, tmp, rank, step, config)
    except (OSError, RuntimeError) as e:  # torch.save reports ENOSPC as RuntimeError ("unexpected pos")
        cause = _cause(e)
        if not isinstance(e, OSError) and shutil.disk_usage(tmp.parent).free < (1 << 20):
            cause = f"disk full ({type(e).__name__}: {e})"
        error = f"writing into {tmp} failed: {cause}"
    if not _all_ok(error is None, "checkpoint_written"):
        raise _save_failed(out, step, tmp, rank, error)
    final = step_dir(out, step)
    if rank == 0:
        try:
            final = finalize(out, step, meta)
            prune(out, keep)
        except OSError as e:
            error = f"finalizing {tmp} failed: {_cause(e)}"
    if not _all_ok(error is None, "checkpoint_final"):
        raise _save_failed(out, step, tmp, rank, error)
    rank0_print(rank, f"checkpoint saved: {final}")
    return final


def _check_compatible(path: Path, meta: dict, expect: dict) -> None:
    """Refuse by name a checkpoint of another head / class count / embedding size / engine."""
    for field in ("num_classes", "embedding_size"):
        if meta.get(field) != expect[field]:
            raise CheckpointError(
                f"checkpoint {path} was trained with {field}={meta.get(field)}, the config gives "
                f"{expect[field]}: refusing to resume (no silent re-initialisation); set the config's "
                f"{field} to match"
            )
    saved_head, head = meta.get("head"), expect["head"]
    if saved_head is None and (path / "config.yaml").is_file():  # checkpoints before meta had it
        import yaml

        saved_head = (yaml.safe_load((path / "config.yaml").read_text()) or {}).get("head", {}).get("name")
    if saved_head is not None and saved_head != head:
        raise CheckpointError(
            f"checkpoint {path} was trained with head.name={saved_head}, the config has "
            f"head.name={head}: refusing to resume (the classifier states differ); set "
            f"head.name={saved_head} or start a new run (checkpoint.resume=none, another output_dir)"
        )
    if meta.get("engine", "ddp") != expect["engine"]:
        raise CheckpointError(
            f"checkpoint {path} was written by engine={meta.get('engine')}, config has engine={expect['engine']}"
        )


def load_checkpoint(path, states: dict, expect: dict) -> dict:
    """Restore ``states`` (as given to :func:`save_checkpoint`, any world size) from ``path``, after
    checking that ``expect`` (num_classes, embedding_size, head, engine) matches its meta.json.
    States load in the mapping's order. Returns the meta."""
    path = Path(path)
    meta = read_meta(path)
    _check_compatible(path, meta, expect)
    record = None
    for name, state in states.items():
        if _owns_files(state):
            state.load_files(path, meta)
            continue
        record = safe_load(path / "trainer.pt") if record is None else record
        state.load_state_dict(record if name == "trainer" else record[name])
    return meta
