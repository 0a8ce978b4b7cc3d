"""Resumable distributed batch sampler.

Per epoch the GLOBAL order of the samples depends only on ``seed`` and the epoch (a permutation,
or ``arange`` with ``shuffle=False``). Training step ``s`` of an epoch consumes the global block
``order[c + s*G : c + (s+1)*G]`` with ``G = batch_size * world_size`` and ``c`` the samples
already consumed when the epoch was (re)started; rank ``r`` takes rows ``[r*B, (r+1)*B)`` of that
block, i.e. global positions ``c + s*G + r*B + i``.

Iterating yields this rank's batches as lists of ``batch_size`` ints: sample indices
``0..n-1`` when built from a count, the keys themselves when built from a sequence of keys.

Resume: ``state_dict()`` stores ``epoch`` and ``consumed_global`` (samples of the epoch consumed
by all ranks together); ``load_state_dict`` restarts at that global position.

* Same global batch (any ``world_size``/``batch_size`` with the same product, e.g. 2x6 -> 3x4):
  the resumed run reproduces the uninterrupted run's global batches exactly (resume at a step
  boundary); only which rank holds which rows changes.
* Different global batch: the run continues at the exact next sample of the same epoch order
  (no sample repeated or skipped), cutting the remaining samples into the new global batches;
  the steps per epoch and the dropped tail (``drop_last``) change accordingly.

``drop_last=False`` pads the last global batch by wrapping to the start of the epoch's order, so
every rank always gets ``batch_size`` samples (DDP needs equal step counts); the few wrapped
samples are seen twice in that epoch.

Flips are not decided here: :func:`flip_bits` gives the per-sample mirror bits of an epoch.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import numpy as np

__all__ = ["ShardedSampler", "flip_bits", "epoch_permutation"]


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Global sample order of ``epoch`` (int64 [n]); a pure function of (n, seed, epoch)."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([int(seed), int(epoch), 0x5A]).permutation(n)


def flip_bits(n: int, seed: int, epoch: int) -> np.ndarray:
    """Per-sample horizontal-flip decisions of ``epoch`` (bool [n]); pure function of the seed."""
    return np.random.default_rng([int(seed), int(epoch), 0xF1]).random(n) < 0.5


class ShardedSampler:
    """``ShardedSampler(num_samples_or_keys, rank, world_size, batch_size, seed, drop_last, shuffle)``.

    ``len()`` is the number of this rank's batches left in the epoch from the resume point.
    """

    def __init__(
        self,
        num_samples_or_keys: Union[int, Sequence[int], np.ndarray],
        rank: int,
        world_size: int,
        batch_size: int,
        seed: int = 0,
        drop_last: bool = True,
        shuffle: bool = True,
    ):
        if isinstance(num_samples_or_keys, (int, np.integer)):
            self.keys = None
            n = int(num_samples_or_keys)
        else:
            self.keys = np.asarray(num_samples_or_keys, dtype=np.int64).reshape(-1)
            n = int(self.keys.size)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a world of size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if n < 1:
            raise ValueError("the sampler needs at least one sample")
        if drop_last and n < batch_size * world_size:
            raise ValueError(
                f"{n} samples cannot fill one global batch of {batch_size} x {world_size} ranks "
                "(use drop_last=False to pad)"
            )
        self.num_samples, self.rank, self.world_size = n, int(rank), int(world_size)
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.drop_last, self.shuffle = bool(drop_last), bool(shuffle)
        self.epoch = 0
        self.start = 0  # samples of this epoch consumed before the next __iter__ (resume offset)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def steps_per_epoch(self) -> int:
        """Steps of a full epoch (from position 0)."""
        return self._steps(self.num_samples)

    def _steps(self, remaining: int) -> int:
        g = self.global_batch
        return remaining // g if self.drop_last else math.ceil(remaining / g)

    def __len__(self) -> int:
        """This rank's batches left in the epoch from the current offset."""
        return self._steps(max(0, self.num_samples - self.start))

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its first sample."""
        self.epoch, self.start = int(epoch), 0

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Global order (sample indices) of ``epoch``."""
        return epoch_permutation(self.num_samples, self.seed, epoch, self.shuffle)

    def global_positions(self, step: int) -> np.ndarray:
        """Positions in the epoch order of this rank's batch ``step`` (counted from the resume point)."""
        lo = self.start + step * self.global_batch + self.rank * self.batch_size
        return (lo + np.arange(self.batch_size)) % self.num_samples  # wraps only when padding

    def __iter__(self):
        order = self.epoch_order(self.epoch)
        for s in range(len(self)):
            idx = order[self.global_positions(s)]
            yield (self.keys[idx] if self.keys is not None else idx).tolist()

    def state_dict(self, consumed_batches: int | None = None) -> dict:
        """Resume point. ``consumed_batches``: this epoch's per-rank batches already trained on
        since the last (re)start (a DataLoader prefetches, so the sampler cannot know; the trainer
        can also overwrite ``consumed_global`` itself)."""
        consumed = self.start + (consumed_batches or 0) * self.global_batch
        return dict(
            epoch=self.epoch,
            consumed_global=min(consumed, self.num_samples),
            seed=self.seed,
            num_samples=self.num_samples,
            shuffle=self.shuffle,
            world_size=self.world_size,
            batch_size=self.batch_size,
            drop_last=self.drop_last,
        )

    def load_state_dict(self, sd: dict) -> None:
        """Continue at ``sd``'s epoch and global position (any world size / batch size)."""
        for k in ("epoch", "consumed_global"):
            if k not in sd:
                raise ValueError(f"sampler state lacks {k!r} (has {sorted(sd)})")
        if int(sd.get("num_samples", self.num_samples)) != self.num_samples:
            raise ValueError(
                f"sampler state is for {sd['num_samples']} samples, this dataset has {self.num_samples}"
            )
        if int(sd.get("seed", self.seed)) != self.seed:
            raise ValueError(f"sampler state has seed {sd['seed']}, this run uses seed {self.seed}")
        if bool(sd.get("shuffle", self.shuffle)) != self.shuffle:
            raise ValueError(f"sampler state has shuffle={sd['shuffle']}, this run uses {self.shuffle}")
        consumed = int(sd["consumed_global"])
        if consumed < 0:
            raise ValueError(f"consumed_global={consumed} is negative")
        # a padded last batch (drop_last=False) may count past the end: the epoch is finished
        self.epoch, self.start = int(sd["epoch"]), min(consumed, self.num_samples)
