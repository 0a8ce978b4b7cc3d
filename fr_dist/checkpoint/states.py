"""Adapters that make an object a checkpoint state for :mod:`fr_dist.checkpoint.manager`.

    HeadShards(head, optimizer)     a sharded classifier: ``head_rank<r>.pt`` per rank, re-sharded on load
    RngState(rank, world_size)      torch / numpy / python (/ cuda) RNG streams: ``rng_rank<r>.pt``
    SamplerState(sampler, progress) a data sampler's position (+ the epoch and samples consumed in it)
    ScheduleState(scheduler)        an LR scheduler (its optimizer's LR is put back on load)

The first two own their files (``save_files`` / ``load_files``); the last two are ``Stateful``
(``state_dict`` / ``load_state_dict``) and land in ``trainer.pt``. None imports what it wraps: the
head only needs ``shard_state(optimizer)`` and ``load_resharded(shards, optimizer, source)``.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from fr_dist.checkpoint.layout import safe_load
from fr_dist.errors import CheckpointError

__all__ = [
    "HeadShards",
    "RngState",
    "SamplerState",
    "ScheduleState",
    "load_head_shard",
    "rng_state",
    "set_rng_state",
]


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


# ----------------------------------------------------------------------------- Stateful wrappers


class SamplerState:
    """The data sampler's position, with the epoch and the samples consumed in it.

    ``progress`` is anything with ``epoch`` and ``consumed`` attributes (the trainer's Progress)."""

    def __init__(self, sampler, progress):
        self.sampler, self.progress = sampler, progress

    def state_dict(self) -> dict:
        st = dict(self.sampler.state_dict())
        st.update(epoch=self.progress.epoch, consumed_global=self.progress.consumed)
        return st

    def load_state_dict(self, st: dict) -> None:
        self.sampler.load_state_dict(st)
        self.progress.consumed = st["consumed_global"]


class ScheduleState:
    """An LR scheduler; on load its optimizer's current LR is put back (not in the scheduler's state)."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, st: dict) -> None:
        self.scheduler.load_state_dict(st)
        for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
