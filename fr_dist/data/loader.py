"""Training loaders with one batch interface: ``for images, labels in loader`` ->
images float32 [B, 3, H, W] in [-1, 1] on the device, labels int64 [B] on the device.

* ``torch``: RecordIO dataset + DataLoader workers (each opens its own file descriptor); workers
  ship uint8 CHW batches (4x fewer bytes than float) and the normalisation runs on the device;
  pinned memory and a side-stream copy one batch ahead on CUDA.
* ``dali``: :mod:`fr_dist.data.dali` (``fn.readers.mxnet`` + ``fn.decoders.image``).

Both draw batches from :class:`~fr_dist.data.sampler.ShardedSampler` (resumable; flips decided
by the sampler, so the data stream is a pure function of seed, epoch and position).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from fr_dist.data.recordio import RecordIOError, open_recordio
from fr_dist.data.sampler import ShardedSampler

__all__ = ["RecordDataset", "TrainLoader", "build_train_loader", "normalize_on_device"]

log = logging.getLogger(__name__)


def normalize_on_device(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 in [-1, 1]."""
    return images_u8.float().sub_(127.5).div_(127.5)


class RecordDataset(torch.utils.data.Dataset):
    """Item ``(i, flip)`` -> (uint8 [3, H, W] RGB, int label) of the i-th image record."""

    def __init__(self, rec_path, skip_bad: bool = False):
        self.rec = open_recordio(rec_path)
        self.keys = self.rec.image_keys_array
        self.num_classes = self.rec.num_classes
        self.skip_bad = skip_bad
        self.bad = 0

    def __len__(self) -> int:
        return len(self.keys)

    def load(self, i: int, flip: bool) -> tuple[np.ndarray, int]:
        key = int(self.keys[i])
        label = self.rec.label(key)
        img = self.rec.decode(key)
        if flip:
            img = img[:, ::-1]
        return np.ascontiguousarray(img.transpose(2, 0, 1)), label  # [H, W, 3] -> [3, H, W]

    def __getitem__(self, item):
        i, flip = item if isinstance(item, tuple) else (item, False)
        for attempt in range(len(self.keys)):
            try:
                return self.load((i + attempt) % len(self.keys), flip)
            except RecordIOError as e:
                if not self.skip_bad:
                    raise
                self.bad += 1
                log.warning("skipping bad record (%d so far): %s", self.bad, e)
        raise RecordIOError(self.rec.path, "no readable image record")


def _collate(batch):
    imgs = torch.from_numpy(np.stack([b[0] for b in batch]))  # [B, 3, H, W] uint8
    labels = torch.tensor([b[1] for b in batch], dtype=torch.int64)  # [B]
    return imgs, labels


class TrainLoader:
    """Iterable over one epoch of the sampler's batches, on ``device``, normalised."""

    def __init__(self, dataset: RecordDataset, sampler: ShardedSampler, device, num_workers: int = 2):
        self.dataset, self.sampler, self.device = dataset, sampler, torch.device(device)
        self.num_classes, self.num_images = dataset.num_classes, len(dataset)
        cuda = self.device.type == "cuda"
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=cuda,
            persistent_workers=False,
            prefetch_factor=4 if num_workers > 0 else None,
        )

    def __len__(self) -> int:
        return len(self.sampler)

    def _to_device(self, batch):
        imgs, labels = batch
        imgs = imgs.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        return normalize_on_device(imgs), labels

    def __iter__(self):
        if self.device.type != "cuda":
            for batch in self.loader:
                yield self._to_device(batch)
            return
        stream = torch.cuda.Stream(self.device)
        nxt = None
        for batch in self.loader:  # copy batch k+1 on a side stream while k trains
            with torch.cuda.stream(stream):
                staged = self._to_device(batch)
            if nxt is not None:
                yield nxt
            torch.cuda.current_stream(self.device).wait_stream(stream)
            nxt = staged
        if nxt is not None:
            yield nxt


def build_train_loader(rec_path, rank: int, world_size: int, batch_size: int, seed: int = 0,
                       num_workers: int = 2, device="cpu", drop_last: bool = True, backend: str = "torch",
                       flip: bool = True, skip_bad: bool = False):
    """The training loader of this rank (``backend``: torch | dali)."""
    if backend == "dali":
        from fr_dist.data.dali import DaliTrainLoader

        return DaliTrainLoader(rec_path, rank, world_size, batch_size, seed=seed, device=device,
                               drop_last=drop_last, flip=flip, num_threads=max(1, num_workers))
    if backend != "torch":
        raise ValueError(f"unknown loader backend {backend!r}; known: torch, dali")
    ds = RecordDataset(rec_path, skip_bad=skip_bad)
    sampler = ShardedSampler(len(ds), rank, world_size, batch_size, seed=seed, drop_last=drop_last, flip=flip)
    return TrainLoader(ds, sampler, device, num_workers=num_workers)
