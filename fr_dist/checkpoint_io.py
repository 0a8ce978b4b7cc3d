"""Old home of the on-disk checkpoint helpers; they live in :mod:`fr_dist.checkpoint` (layout, atomic)."""

import os  # noqa: F401  (``fr_dist.checkpoint_io.os`` stayed reachable: tests patch os.replace through it)

from fr_dist.checkpoint.atomic import atomic_save, finalize, prune
from fr_dist.checkpoint.layout import (
    CheckpointError,
    checkpoint_root,
    describe_files,
    latest_checkpoint,
    list_checkpoints,
    read_meta,
    safe_load,
    step_dir,
    tmp_dir,
    verify_checkpoint,
)

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
