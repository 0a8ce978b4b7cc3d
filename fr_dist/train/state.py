"""The trainer's own checkpointed state, as a ``Stateful`` object (``state_dict`` / ``load_state_dict``).

progress = Progress(world_size, global_batch)     # step, epoch, consumed, best_acc, nonfinite
states = {"trainer": progress, "sampler": SamplerState(loader.sampler, progress),
          "sched_bb": ScheduleState(sched), ...}  # handed to fr_dist.checkpoint's manager

The adapters of other objects (SamplerState, ScheduleState, HeadShards, RngState) live in
:mod:`fr_dist.checkpoint.states`; the first two are re-exported here under their old names.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from fr_dist.checkpoint.states import SamplerState, ScheduleState

__all__ = ["Progress", "SamplerState", "ScheduleState"]


@dataclass
class Progress:
    """Where training stands; the one owner of the best verification accuracy so far."""

    world_size: int
    global_batch: int
    step: int = 0
    epoch: int = 0
    consumed: int = 0
    """Samples of the current epoch already consumed (global), so the sampler resumes exactly."""
    best_acc: float = -1.0
    """Best mean verification accuracy; RUN/best is replaced only by a better model."""
    nonfinite: int = 0
    """Non-finite steps in a row (skipped) that the loss scaler cannot recover from."""
    scaler_skips: int = 0
    """Steps the fp16 GradScaler skipped on overflow while it lowered the scale (not counted above)."""

    def state_dict(self) -> dict:
        return dict(
            step=self.step,
            epoch=self.epoch,
            world_size=self.world_size,
            global_batch=self.global_batch,
            best_acc=self.best_acc,
            nonfinite=self.nonfinite,
            scaler_skips=self.scaler_skips,
        )

    def load_state_dict(self, st: dict) -> None:
        self.step, self.epoch, self.best_acc, self.nonfinite = (
            st["step"],
            st["epoch"],
            st["best_acc"],
            st["nonfinite"],
        )
        self.scaler_skips = st.get("scaler_skips", 0)  # absent from checkpoints written before it
        # at another world size the trainer announces the change and its batch policy (train.on_resize)
        if st["global_batch"] != self.global_batch and st.get("world_size") == self.world_size:
            warnings.warn(
                f"global batch changed from {st['global_batch']} to {self.global_batch}: data order resumes "
                "at the same sample, step counts in the schedule are kept as saved",
                stacklevel=1,
            )
