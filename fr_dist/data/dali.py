"""NVIDIA DALI training loader (optional extra ``dali``) with the torch loader's batch interface.

Pipeline: reader -> ``fn.decoders.image`` (``mixed`` = nvJPEG on a GPU, ``cpu`` = libjpeg-turbo
with ``device_id=None`` when there is none) -> [``fn.resize`` when ``property`` declares another
size] -> ``fn.crop_mirror_normalize`` ((x - 127.5) / 127.5, CHW float, mirror) ; labels int64.

Two readers (``reader=``):

* ``"mxnet"`` (default): ``fn.readers.mxnet`` sharded by rank (``shard_id``/``num_shards``),
  shuffled by DALI (``random_shuffle``, shuffle buffer ``initial_fill``), mirror from
  ``fn.random.coin_flip``. DALI's reader fails on the insightface header/identity records (empty
  payloads), so it is given an index listing only image records (:func:`image_index_path`,
  cached next to the dataset or in a cache dir). The pipeline is rebuilt per epoch: epoch ``e``
  of rank ``r`` reads shard ``(r + e) % W`` with a DALI seed derived from (seed, e, r), so the
  stream is a pure function of (seed, epoch, rank, world size). Resume: at an epoch boundary
  always exact; mid-epoch exact on the same world size and batch size (the consumed batches are
  re-run and dropped); on another world size/batch DALI's shards change, so the resumed run
  starts the next epoch (the rest of the interrupted epoch is skipped, none repeated) and warns.
  Steps per epoch: ``(N // W) // B`` with ``drop_last``, else ``ceil(ceil(N / W) / B)`` with the
  shard's last batch padded by repeating its last sample (DALI ``pad_last_batch``).
* ``"sampler"``: ``fn.external_source`` fed with the encoded images of this rank's
  :class:`~fr_dist.data.sampler.ShardedSampler` batches and the same flip bits as the torch
  path: identical samples, labels and (within 1/127.5) pixels, and exact resume on any world
  size. Costs a Python read of each record in the feeding thread.

DALI offsets in ``source_info`` ("<file> at index <byte offset>") map samples back to keys
(:meth:`DaliTrainLoader.iter_with_keys`), which the tests use to compare with the torch path.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from fr_dist.data.image import PIXEL_MEAN, PIXEL_STD
from fr_dist.data.recordio import open_recordio
from fr_dist.data.sampler import ShardedSampler, flip_bits

__all__ = ["dali_available", "image_index_path", "DaliReaderSampler", "DaliTrainLoader"]

log = logging.getLogger(__name__)

READERS = ("mxnet", "sampler")


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _cache_dir() -> Path:
    base = os.environ.get("FR_DIST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fr_dist"
    )
    return Path(base) / "dali"


def _writable_dir(d: Path) -> bool:
    """Writable for us AND not marked read-only (root ignores mode bits; we honour them)."""
    try:
        return os.access(d, os.W_OK) and bool(d.stat().st_mode & 0o222)
    except OSError:
        return False


def image_index_path(rec_path, cache_dir=None) -> Path:
    """A ``.idx`` listing only the image records of ``rec_path``, for ``fn.readers.mxnet``.

    Flat files with their own ``.idx`` use it as is. Otherwise (insightface layout, or a missing
    index) ``<stem>.images-<size>-<mtime_ns>.idx`` is written next to the dataset when that folder
    is writable (and not marked read-only), else into ``cache_dir`` (default ``$FR_DIST_CACHE`` or ``~/.cache/fr_dist``,
    ``/dali``) under a name hashed from the absolute path; keyed by the .rec size and mtime so a
    changed dataset gets a new index. Written atomically (safe with several ranks).
    """
    rec = open_recordio(rec_path, check_labels=False)
    if rec.layout == "flat" and not rec.index_rebuilt:
        return rec.idx_path
    st = rec.path.stat()
    tag = f"images-{st.st_size}-{st.st_mtime_ns}.idx"
    keys = rec.image_keys_array
    offs = rec.index.offsets_of(keys)
    text = "".join(f"{k}\t{o}\n" for k, o in zip(keys.tolist(), offs.tolist()))
    digest = hashlib.sha1(str(rec.path.resolve()).encode()).hexdigest()[:16]
    beside = rec.path.with_name(f"{rec.path.stem}.{tag}")
    cached = Path(cache_dir or _cache_dir()) / f"{rec.path.stem}-{digest}.{tag}"
    candidates = [beside, cached] if _writable_dir(rec.path.parent) else [cached]
    for target in (beside, cached):
        if target.is_file():
            return target
    for target in candidates:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
            tmp.write_text(text)
            os.replace(tmp, target)
            return target
        except OSError as e:
            log.info("cannot write the DALI image index at %s (%s)", target, e)
    raise OSError(f"cannot write a DALI image index for {rec.path} at any of {[str(c) for c in candidates]}")


class DaliReaderSampler:
    """Epoch/resume bookkeeping of the ``mxnet`` reader (same interface as ShardedSampler)."""

    def __init__(
        self,
        num_samples: int,
        rank: int,
        world_size: int,
        batch_size: int,
        seed: int,
        drop_last: bool,
    ):
        if drop_last and num_samples // world_size < batch_size:
            raise ValueError(
                f"{num_samples} samples cannot fill one batch of {batch_size} on each of {world_size} ranks"
            )
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.batch_size, self.seed, self.drop_last = batch_size, int(seed), drop_last
        self.epoch, self.start = 0, 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def steps_per_epoch(self) -> int:
        per_shard = self.num_samples // self.world_size  # DALI shard sizes are floor or ceil of N/W
        if self.drop_last:
            return per_shard // self.batch_size
        return math.ceil(math.ceil(self.num_samples / self.world_size) / self.batch_size)

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch() - self.start // self.global_batch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start = int(epoch), 0

    def shard(self, epoch: int) -> int:
        return (self.rank + epoch) % self.world_size

    def dali_seed(self, epoch: int) -> int:
        return int(np.random.default_rng([self.seed, int(epoch), self.rank, 0xDA]).integers(0, 2**31 - 1))

    def state_dict(self, consumed_batches: Optional[int] = None) -> dict:
        consumed = self.start + (consumed_batches or 0) * self.global_batch
        return dict(
            epoch=self.epoch,
            consumed_global=consumed,
            seed=self.seed,
            num_samples=self.num_samples,
            world_size=self.world_size,
            batch_size=self.batch_size,
            reader="dali-mxnet",
        )

    def load_state_dict(self, sd: dict) -> None:
        if int(sd.get("num_samples", self.num_samples)) != self.num_samples:
            raise ValueError(
                f"sampler state is for {sd['num_samples']} samples, this dataset has {self.num_samples}"
            )
        self.epoch, consumed = int(sd["epoch"]), int(sd["consumed_global"])
        same = (int(sd.get("world_size", -1)), int(sd.get("batch_size", -1))) == (
            self.world_size,
            self.batch_size,
        )
        if consumed == 0 or (same and consumed % self.global_batch == 0):
            self.start = consumed
            return
        warnings.warn(
            f"DALI mxnet reader: cannot resume epoch {self.epoch} mid-way on world size {self.world_size} x batch "
            f"{self.batch_size} (saved with {sd.get('world_size')} x {sd.get('batch_size')}); its remaining samples "
            "are skipped and training continues with the next epoch (use dali_reader='sampler' for exact resume)",
            stacklevel=2,
        )
        self.start = self.steps_per_epoch() * self.global_batch


class DaliTrainLoader:
    """Iterable over one epoch: (images float32 [B, 3, H, W] in [-1, 1], labels int64 [B]) on ``device``."""

    def __init__(
        self,
        rec_path,
        rank: int,
        world_size: int,
        batch_size: int,
        seed: int = 0,
        device="cpu",
        drop_last: bool = True,
        flip: bool = True,
        num_threads: int = 2,
        reader: str = "mxnet",
        shuffle: bool = True,
        image_size: tuple[int, int] = (112, 112),
        initial_fill: int = 1024,
        prefetch: int = 2,
        cache_dir=None,
    ):
        if reader not in READERS:
            raise ValueError(f"unknown DALI reader {reader!r}; known: {', '.join(READERS)}")
        if not dali_available():
            raise ImportError("the DALI loader needs nvidia-dali (pip install 'fr_dist[dali]')")
        self.rec = open_recordio(rec_path)
        self.rec_path = self.rec.path
        self.device = torch.device(device)
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.flip, self.shuffle, self.reader = flip, shuffle, reader
        self.num_threads, self.initial_fill, self.prefetch = (
            max(1, num_threads),
            initial_fill,
            prefetch,
        )
        self.image_size = tuple(image_size)
        self.num_classes, self.num_images = self.rec.num_classes, self.rec.num_images
        order = np.argsort(self.rec.index.offsets_array)  # source_info offsets -> keys
        self._sorted_offsets = self.rec.index.offsets_array[order]
        self._keys_by_offset = self.rec.index.keys_array[order]
        if reader == "mxnet":
            self.index_path = image_index_path(rec_path, cache_dir)
            self.sampler = DaliReaderSampler(self.num_images, rank, world_size, batch_size, seed, drop_last)
        else:
            self.index_path = None
            self.sampler = ShardedSampler(
                self.num_images,
                rank,
                world_size,
                batch_size,
                seed=seed,
                drop_last=drop_last,
                shuffle=shuffle,
            )

    def __len__(self) -> int:
        return len(self.sampler)

    # ------------------------------------------------------------------ pipeline
    @property
    def _gpu(self) -> bool:
        return self.device.type == "cuda"

    def _feed(self, epoch: int):
        """External-source batches of this rank: (encoded images, labels [B], mirror [B])."""
        s = self.sampler
        bits = flip_bits(s.num_samples, s.seed, epoch) if self.flip else np.zeros(s.num_samples, bool)
        keys = self.rec.image_keys_array
        for batch in s:
            self._fed_keys.append(keys[np.asarray(batch)])
            enc, labels = [], []
            for i in batch:
                h, payload = self.rec.read(int(keys[i]))
                labels.append(self.rec.label_of(int(keys[i]), h))
                enc.append(np.frombuffer(payload, dtype=np.uint8))
            yield enc, np.asarray(labels, np.int64), bits[np.asarray(batch)].astype(np.int32)

    def _build(self, epoch: int, with_info: bool = False):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import Pipeline

        device_id = (
            (self.device.index if self.device.index is not None else torch.cuda.current_device())
            if self._gpu
            else None
        )
        s = self.sampler
        seed = (
            s.dali_seed(epoch) if isinstance(s, DaliReaderSampler) else (s.seed * 7919 + epoch) % (2**31 - 1)
        )
        pipe = Pipeline(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=device_id,
            seed=seed,
            prefetch_queue_depth=self.prefetch,
        )
        with pipe:
            if self.reader == "mxnet":
                jpegs, labels = fn.readers.mxnet(
                    path=[str(self.rec_path)],
                    index_path=[str(self.index_path)],
                    shard_id=s.shard(epoch),
                    num_shards=self.world_size,
                    random_shuffle=self.shuffle,
                    initial_fill=self.initial_fill,
                    pad_last_batch=not s.drop_last,  # pad by repeating the shard's last sample
                    stick_to_shard=True,
                    name="reader",
                )
                labels = fn.cast(labels, dtype=types.INT64)
                mirror = fn.random.coin_flip(probability=0.5) if self.flip else 0
            else:
                jpegs, labels, mirror = fn.external_source(
                    source=self._feed(epoch),
                    num_outputs=3,
                    batch=True,
                    dtype=[types.UINT8, types.INT64, types.INT32],
                )
            images = fn.decoders.image(jpegs, device="mixed" if self._gpu else "cpu", output_type=types.RGB)
            if self.rec.image_size is not None and tuple(self.rec.image_size) != self.image_size:
                images = fn.resize(images, resize_y=self.image_size[0], resize_x=self.image_size[1])
            images = fn.crop_mirror_normalize(
                images,
                dtype=types.FLOAT,
                output_layout="CHW",
                mean=[PIXEL_MEAN] * 3,
                std=[PIXEL_STD] * 3,
                mirror=mirror,
            )
            outs = [images, labels]
            if with_info and self.reader == "mxnet":
                outs.append(fn.get_property(jpegs, key="source_info"))
            pipe.set_outputs(*outs)
        pipe.build()
        return pipe

    def _to_torch(self, out) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.from_numpy(np.asarray(out[1].as_array()).reshape(len(out[1]), -1)[:, 0].copy())  # [B]
        if self._gpu:
            from nvidia.dali.plugin.pytorch import feed_ndarray

            t = out[0].as_tensor()
            images = torch.empty(t.shape(), dtype=torch.float32, device=self.device)  # [B, 3, H, W]
            feed_ndarray(t, images, cuda_stream=torch.cuda.current_stream(self.device))
            return images, labels.to(self.device, non_blocking=True)
        return torch.from_numpy(np.array(out[0].as_array())), labels

    def _run(self, with_info: bool):
        s = self.sampler
        steps = len(s)
        if steps <= 0:
            return
        self._fed_keys: collections.deque = collections.deque()
        pipe = self._build(s.epoch, with_info)
        try:
            if isinstance(s, DaliReaderSampler):
                for _ in range(s.start // s.global_batch):  # mid-epoch resume: replay and drop
                    pipe.run()
            for _ in range(steps):
                yield pipe.run()
        finally:
            del pipe

    def __iter__(self):
        for out in self._run(False):
            yield self._to_torch(out)

    def _key_at(self, offset: int) -> int:
        i = int(np.searchsorted(self._sorted_offsets, offset))
        if i >= self._sorted_offsets.size or int(self._sorted_offsets[i]) != offset:
            raise KeyError(f"{self.rec_path}: no record starts at byte offset {offset}")
        return int(self._keys_by_offset[i])

    def iter_with_keys(self):
        """Like iteration, plus the record keys of the batch (int64 [B], from DALI's source_info)."""
        for out in self._run(True):
            images, labels = self._to_torch(out)
            if self.reader == "sampler":  # fed in order (DALI prefetches ahead: FIFO)
                yield images, labels, torch.from_numpy(self._fed_keys.popleft())
                continue
            keys = []
            for t in out[2]:
                info = np.array(t).tobytes().decode()
                keys.append(self._key_at(int(info.rsplit(" at index ", 1)[1])))
            yield images, labels, torch.tensor(keys, dtype=torch.int64)
