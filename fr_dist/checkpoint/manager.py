"""Save / load a ``{name: state}`` mapping as one checkpoint, knowing none of the states' insides.

    path = resume_path(run, resume, rank)                        # rank 0 decides, every rank gets it
    save_checkpoint(run, step, states, rank, meta, keep, write_config)   # all ranks; agreed failures
    meta = load_checkpoint(path, states, expect)                 # any world size

What is saved is handed over by the caller (torchtitan's ``CheckpointManager(states=...)``):

* a state with ``save_files(folder, rank) -> {file: object}`` / ``load_files(folder, meta)`` owns
  its files (the backbone engine; :class:`~fr_dist.checkpoint.states.HeadShards` ->
  ``head_rank<r>.pt``; :class:`~fr_dist.checkpoint.states.RngState`);
* any other state is ``Stateful`` (``state_dict()`` / ``load_state_dict()``) and saved by rank 0
  into ``trainer.pt`` under its name, except ``"trainer"`` (step, epoch, ...), whose keys sit at
  the top level of ``trainer.pt`` (the layout checkpoints have had since v1).

Failures: any rank's OSError while saving (ENOSPC, EACCES, ...) is agreed on by an all-reduce of a
flag before ``finalize``; rank 0 removes the ``.tmp-<step>`` folder and every rank raises a
:class:`CheckpointError` naming the path and the cause ("disk full"). No rank waits at a barrier
for a rank that already failed, and the previous checkpoints are untouched.

The config section of this package (``checkpoint.*`` keys) is :class:`CheckpointConfig`.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
from pydantic import Field
from pydantic.dataclasses import dataclass as pydantic_dataclass

from fr_dist import comm
from fr_dist.checkpoint.atomic import atomic_save, finalize, prune, remove_partial
from fr_dist.checkpoint.layout import (
    describe_files,
    latest_checkpoint,
    newest_usable,
    read_meta,
    safe_load,
    step_dir,
    tmp_dir,
    verify_checkpoint,
)
from fr_dist.config_base import SECTION_CONFIG
from fr_dist.errors import CheckpointError

__all__ = ["CheckpointConfig", "save_checkpoint", "load_checkpoint", "resume_path"]


@pydantic_dataclass(config=SECTION_CONFIG)
class CheckpointConfig:
    """``checkpoint``: when the trainer saves, how many it keeps, where it resumes from."""

    every: int = Field(0, ge=0)
    """Save every N optimizer steps (0 = only at the end)."""
    keep: int = Field(3, ge=0)
    """Keep the newest N checkpoints (0 = keep all)."""
    resume: str = Field("none", min_length=1)
    """none | auto (newest complete checkpoint under output_dir) | a checkpoint folder."""
    save_at_end: bool = True
    """Save a checkpoint when training ends."""
    save_on_signal: bool = True
    """On SIGTERM/SIGUSR1 (Slurm preemption, torchrun shutdown) save a checkpoint at the next
    log step (ranks agree through a 1-element all-reduce every train.log_every steps) and stop."""


# ----------------------------------------------------------------------------- resume


def resume_path(output_dir, resume: str, rank: int = 0) -> Optional[Path]:
    """``checkpoint.resume``: none -> None, auto -> newest complete checkpoint that verifies (or None),
    else that folder (verified; a damaged explicit choice is an error).

    With a process group, rank 0 verifies and broadcasts its choice: every rank gets the same path.
    """
    if resume == "none":
        return None
    if resume != "auto":
        reason = verify_checkpoint(resume) if rank == 0 else None
        if reason is not None:
            raise CheckpointError(f"checkpoint.resume={resume}: not usable: {reason}")
        return Path(resume)
    chosen = -1
    if rank == 0:
        for p in remove_partial(output_dir):
            print(f"checkpoint: removing the partial {p} (an interrupted save)", flush=True)

        def skip(p: Path, reason: str) -> None:
            print(f"resume=auto: skipping checkpoint {p}: {reason}; trying the previous one", flush=True)

        found = newest_usable(output_dir, on_skip=skip)
        chosen = -1 if found is None else int(found.name)
    step = torch.tensor([chosen], dtype=torch.int64, device=comm.device_of())  # [1]
    chosen = int(comm.broadcast(step, 0, name="resume_step").item())
    return None if chosen < 0 else step_dir(output_dir, chosen)


# ----------------------------------------------------------------------------- the save agreement


def _all_ok(ok: bool, name: str) -> bool:
    """True when every rank reports ``ok`` (an all-reduce of a flag; no process group: ``ok``)."""
    flag = torch.tensor([0.0 if ok else 1.0], device=comm.device_of())  # [1]
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


def _write_rank_files(
    states: dict,
    tmp: Path,
    rank: int,
    step: int,
    write_config: Optional[Callable[[Path], None]],
    write_file: Callable[[object, Path], None],
) -> None:
    """This rank's part of the checkpoint (+ files_rank<r>.json: size and CRC-32 of what it wrote)."""
    written = []
    for state in states.values():
        if _owns_files(state):
            for name, obj in state.save_files(tmp, rank).items():
                write_file(obj, tmp / name)
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
        write_file(record, tmp / "trainer.pt")
        written.append("trainer.pt")
        if write_config is not None:
            write_config(tmp / "config.yaml")
            written.append("config.yaml")
    mine = [tmp / n for n in written if (tmp / n).is_file()]  # DeepSpeed's own files: described by finalize
    desc = tmp / f"files_rank{rank}.json"
    desc.write_text(json.dumps(describe_files(tmp, sorted(mine))))


def save_checkpoint(
    out,
    step: int,
    states: dict,
    rank: int,
    meta: dict,
    keep: int = 0,
    write_config: Optional[Callable[[Path], None]] = None,
    write_file: Callable[[object, Path], None] = atomic_save,
) -> Path:
    """Write checkpoint ``out/checkpoints/<step>`` of ``states`` (all ranks call this); ``meta``
    (world_size, num_classes, ...) goes into meta.json, ``write_config(path)`` (rank 0) writes the
    run's config as ``config.yaml``, and only the newest ``keep`` checkpoints stay (0 = all).
    ``write_file(obj, path)`` writes each state file (default :func:`atomic_save`).

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
        _write_rank_files(states, tmp, rank, step, write_config, write_file)
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
    if rank == 0:
        print(f"checkpoint saved: {final}", flush=True)
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
