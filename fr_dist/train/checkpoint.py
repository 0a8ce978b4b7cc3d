"""The trainer's door to :mod:`fr_dist.checkpoint` (where the layout, atomic save, re-sharding and the
``{name: state}`` manager live): the old ``fr_dist.train.checkpoint`` names, re-exported, and
:func:`save_checkpoint` with the run's config written by the train layer's ``save_config``.
"""

from __future__ import annotations

from functools import partial

from fr_dist.checkpoint import manager
from fr_dist.checkpoint.atomic import atomic_save, finalize, prune
from fr_dist.checkpoint.layout import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    read_meta,
    safe_load,
    step_dir,
    tmp_dir,
    verify_checkpoint,
)
from fr_dist.checkpoint.manager import CheckpointConfig, load_checkpoint, resume_path
from fr_dist.checkpoint.states import (
    HeadShards,
    RngState,
    _head_files,
    load_head_shard,
    rng_state,
    set_rng_state,
)
from fr_dist.train.config_load import save_config

__all__ = [
    "CheckpointConfig",
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
    "_head_files",
]


def save_checkpoint(out, step: int, states: dict, rank: int, meta: dict, keep: int = 0, config=None):
    """:func:`fr_dist.checkpoint.manager.save_checkpoint`, with ``config`` (the resolved run config)
    saved as ``config.yaml``. Files are written by this module's ``atomic_save``, looked up at call
    time (a test or a caller may replace it)."""
    write_config = None if config is None else partial(save_config, config)
    return manager.save_checkpoint(
        out, step, states, rank, meta, keep, write_config=write_config, write_file=atomic_save
    )
