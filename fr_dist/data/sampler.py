"""Resumable distributed batch sampler with deterministic flips.

Per epoch the GLOBAL order of samples (and a flip bit per position) depends only on
``seed`` and the epoch. Step ``s`` consumes the global block ``order[c + s*G : c + (s+1)*G]``
(``G = batch_size * world_size``, ``c`` = samples already consumed when the epoch was resumed);
rank ``r`` takes rows ``[r*B, (r+1)*B)`` of that block. Hence a resumed run continues at the
exact next sample, also on another world size or another per-rank batch size: nothing is seen
twice or skipped within an epoch.

The sampler yields per-rank batches of ``(index, flip)`` pairs (use it as a DataLoader
``batch_sampler``). ``drop_last=False`` pads the last global batch by wrapping to the start of
the epoch's order (every rank always gets ``batch_size`` samples, as DDP needs).
"""

from __future__ import annotations

import math

import torch

__all__ = ["ShardedSampler"]


class ShardedSampler:
    def __init__(self, num_samples: int, rank: int, world_size: int, batch_size: int, seed: int = 0,
                 drop_last: bool = True, shuffle: bool = True, flip: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_samples < batch_size * world_size and drop_last:
            raise ValueError(
                f"{num_samples} samples cannot fill one global batch of {batch_size} x {world_size} ranks"
            )
        self.num_samples, self.rank, self.world_size = int(num_samples), rank, world_size
        self.batch_size, self.seed, self.drop_last = batch_size, int(seed), drop_last
        self.shuffle, self.flip = shuffle, flip
        self.epoch = 0
        self.start = 0  # samples of this epoch consumed before the next __iter__ (resume offset)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def _remaining(self) -> int:
        return self.num_samples - self.start

    def __len__(self) -> int:
        """Per-rank batches left in this epoch from the current offset."""
        rem = self._remaining()
        return rem // self.global_batch if self.drop_last else math.ceil(rem / self.global_batch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start = int(epoch), 0

    def epoch_order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(global order [n], flip bits [n]) of ``epoch``."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_samples, generator=g) if self.shuffle else torch.arange(self.num_samples)
        flips = torch.randint(0, 2, (self.num_samples,), generator=g, dtype=torch.bool)
        if not self.flip:
            flips.zero_()
        return order, flips

    def __iter__(self):
        order, flips = self.epoch_order(self.epoch)
        G, B = self.global_batch, self.batch_size
        start = self.start
        for s in range(len(self)):
            lo = start + s * G + self.rank * B
            pos = [(lo + i) % self.num_samples for i in range(B)]  # wraps only when padding
            yield [(int(order[p]), bool(flips[p])) for p in pos]

    def state_dict(self, consumed_batches: int | None = None) -> dict:
        """Resume point. ``consumed_batches``: per-rank batches of this epoch already trained on
        (the trainer passes it; a DataLoader prefetches ahead, so the sampler cannot know)."""
        consumed = self.start + (consumed_batches or 0) * self.global_batch
        return dict(epoch=self.epoch, consumed_global=min(consumed, self.num_samples), seed=self.seed,
                    num_samples=self.num_samples, shuffle=self.shuffle, flip=self.flip)

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("num_samples", self.num_samples) != self.num_samples:
            raise ValueError(
                f"sampler state is for {sd['num_samples']} samples, this dataset has {self.num_samples}"
            )
        if sd.get("seed", self.seed) != self.seed:
            raise ValueError(f"sampler state has seed {sd['seed']}, this run uses seed {self.seed}")
        self.epoch = int(sd["epoch"])
        self.start = int(sd["consumed_global"])
