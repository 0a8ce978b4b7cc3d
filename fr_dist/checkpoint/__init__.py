"""Step-level, atomic, world-size independent checkpoints: ``RUN/checkpoints/<step>/``.

    layout.py     folder names, meta.json, size + CRC-32 verify, newest usable, safe (weights_only) load
    atomic.py     temp folder + fsync + rename, meta.json last, keep-N rotation
    manager.py    save / load of a ``{name: state}`` mapping, resume_path (rank 0 decides and
                  broadcasts), the ranks' agreement on a failed save; CheckpointConfig
    states.py     adapters: HeadShards (re-sharded rows), RngState, SamplerState, ScheduleState
    deepspeed.py  the DeepSpeed engine's files and its world-size independent fp32 copy

The package imports ``fr_dist.errors``, ``fr_dist.comm`` and nothing of heads/ or train/.

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

Atomicity: everything is written into ``checkpoints/.tmp-<step>/``; after the ranks agree that they
all wrote their part, rank 0 writes ``meta.json`` and renames the folder to ``<step>/``. A crash at
any point leaves the previous checkpoints untouched and at worst a ``.tmp-*`` folder, which resume
ignores and the next save removes. ``resume=auto`` picks the newest folder that has ``meta.json``
*and verifies* (sizes and CRC-32 of meta.json's file list; zip CRCs for checkpoints written before
the list existed); a damaged one is skipped with a message and the previous complete one is used.
Rank 0 decides and broadcasts, so every rank resumes from the same step.

Loading never unpickles code: every ``torch.load`` is ``weights_only=True`` (:func:`safe_load`),
with only numpy's array reconstruction allow-listed for the RNG states of older checkpoints.

Re-sharding: on load each rank reads the row ranges of every saved shard that overlap its own
``[class_start, class_start + num_local)`` and copies those rows (weights and row-wise optimizer
state), so a checkpoint saved on W ranks resumes on any W' (including ranks with zero classes)
without materialising the full [K, D] matrix on one rank (the head's ``load_resharded``, row
arithmetic in ``fr_dist/sharding.py``; :class:`HeadShards` hands it the memory-mapped shards).
"""

from fr_dist.checkpoint.atomic import atomic_save, finalize, prune
from fr_dist.checkpoint.layout import (
    CheckpointError,
    checkpoint_root,
    latest_checkpoint,
    list_checkpoints,
    read_meta,
    safe_load,
    step_dir,
    tmp_dir,
    verify_checkpoint,
)
from fr_dist.checkpoint.manager import CheckpointConfig, load_checkpoint, resume_path, save_checkpoint
from fr_dist.checkpoint.states import HeadShards, RngState, SamplerState, ScheduleState

__all__ = [
    "CheckpointConfig",
    "CheckpointError",
    "HeadShards",
    "RngState",
    "SamplerState",
    "ScheduleState",
    "atomic_save",
    "checkpoint_root",
    "finalize",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "prune",
    "read_meta",
    "resume_path",
    "safe_load",
    "save_checkpoint",
    "step_dir",
    "tmp_dir",
    "verify_checkpoint",
]
