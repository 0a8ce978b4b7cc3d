"""Training loaders with one batch interface: ``for images, labels in loader`` ->
images float32 [B, 3, H, W] in [-1, 1] on the device, labels int64 [B] on the device.

* ``torch``: :class:`RecordDataset` + ``torch.utils.data.DataLoader`` workers (each worker opens
  its own file descriptor: the reader reopens after a fork; see :func:`worker_start_method`). By default workers ship uint8 CHW
  batches (4x fewer bytes through the worker queues / PCIe than float32) and the normalisation
  runs on the device (``normalize="device"``); ``normalize="worker"`` does it in the workers
  (``benchmarks/data_loader.py`` measures both). On CUDA: pinned memory and a side-stream copy
  one batch ahead.
* ``dali``: :mod:`fr_dist.data.dali` (``fn.readers.mxnet`` + ``fn.decoders.image``).

The torch path draws batches from :class:`~fr_dist.data.sampler.ShardedSampler` (resumable,
any world size); mirror bits come from :func:`~fr_dist.data.sampler.flip_bits` (a pure function
of seed, epoch and sample), so the data stream is a pure function of seed, epoch and position.
"""

from __future__ import annotations

import atexit
import functools
import logging
import multiprocessing
import os
import signal
import threading
from typing import Optional

import numpy as np
import torch

from fr_dist.config_base import SECTION_CONFIG
from fr_dist.data.dali import DaliTrainLoader
from fr_dist.data.image import resize_to
from fr_dist.data.recordio import RecordIOError, open_recordio
from fr_dist.data.sampler import ShardedSampler, flip_bits
from fr_dist.signals import SIGNALS, ignore_stop_signals

__all__ = [
    "worker_start_method",
    "RecordDataset",
    "FlipBatchSampler",
    "TrainLoader",
    "build_train_loader",
    "normalize_on_device",
]

log = logging.getLogger(__name__)

NORMALIZE = ("device", "worker")


def normalize_on_device(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 in [-1, 1] (a new tensor; the input is not modified)."""
    return images_u8.float().sub_(127.5).div_(127.5)


class RecordDataset(torch.utils.data.Dataset):
    """Item ``(i, flip)`` (or ``i``) -> (image [3, H, W], int label) of the i-th image record.

    The image is uint8, or float32 in [-1, 1] with ``normalize="worker"``. Every image must have the
    dataset's size (``property``; without one, ``image_size``): another size is a RecordIOError naming
    file, key and sizes. With ``image_size`` (h, w) different from the dataset's size, the whole
    dataset is resized bilinearly to it (``model.input_size``; the trainer announces it). With ``skip_bad`` a record that cannot be
    read, labelled or decoded is replaced by the next good one in key order and counted
    (``self.bad``, per worker process) with a warning in the log; otherwise the
    :class:`RecordIOError` (file, key, byte offset) propagates.
    """

    def __init__(
        self,
        rec_path,
        skip_bad: bool = False,
        image_size: Optional[tuple[int, int]] = None,
        normalize: str = "device",
    ):
        if normalize not in NORMALIZE:
            raise ValueError(f"unknown normalize={normalize!r}; known: {', '.join(NORMALIZE)}")
        self.rec = open_recordio(rec_path)
        self.keys = self.rec.image_keys_array
        self.num_classes = self.rec.num_classes
        self.image_size = tuple(image_size) if image_size else None
        self.skip_bad, self.normalize = skip_bad, normalize
        self.bad = 0

    def __len__(self) -> int:
        return len(self.keys)

    def load(self, i: int, flip: bool) -> tuple[np.ndarray, int]:
        key = int(self.keys[i])
        img, label = self.rec.sample(key)
        native = self.rec.image_size or self.image_size  # the dataset's size (property), else the model's
        if native is not None and tuple(img.shape[:2]) != tuple(native):
            src = "the dataset's property file says" if self.rec.image_size else "model.input_size is"
            raise RecordIOError(
                self.rec.path,
                f"image is {img.shape[0]}x{img.shape[1]} but {src} {native[0]}x{native[1]}; fr_dist never "
                "resizes single odd images silently: re-pack the dataset at one size",
                key,
                self.rec.index[key],
            )
        img = resize_to(img, self.image_size)  # the whole dataset to model.input_size (announced by run.py)
        if flip:
            img = img[:, ::-1]
        chw = img.transpose(2, 0, 1)  # [H, W, 3] -> [3, H, W]
        if self.normalize == "worker":
            out = chw.astype(np.float32)
            out -= 127.5
            out /= 127.5
            return out, label
        return np.ascontiguousarray(chw), label

    def __getitem__(self, item):
        i, flip = item if isinstance(item, tuple) else (item, False)
        n = len(self.keys)
        for attempt in range(n):
            j = (i + attempt) % n
            try:
                return self.load(j, flip)
            except RecordIOError as e:
                if not self.skip_bad:
                    raise
                self.bad += 1
                log.warning("skipping bad record (%d skipped in this process): %s", self.bad, e)
        raise RecordIOError(self.rec.path, "no readable image record")


class FlipBatchSampler:
    """Wraps a :class:`ShardedSampler`: each index ``i`` becomes ``(i, flip_i)`` for the dataset."""

    def __init__(self, sampler: ShardedSampler, flip: bool):
        self.sampler, self.flip = sampler, flip

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        s = self.sampler
        bits = flip_bits(s.num_samples, s.seed, s.epoch) if self.flip else None
        for batch in s:
            yield [(i, bool(bits[i]) if bits is not None else False) for i in batch]


def _collate(batch):
    imgs = torch.from_numpy(np.stack([b[0] for b in batch]))  # B x [3, H, W] -> [B, 3, H, W]
    labels = torch.tensor([b[1] for b in batch], dtype=torch.int64)  # [B]
    return imgs, labels


def worker_start_method() -> str:
    """How DataLoader workers start: ``fork`` (fast; the index is shared copy-on-write) unless
    OpenCV is already loaded in this process. OpenCV's thread pool does not survive a fork: a
    forked child that calls into cv2 after the parent used its pool deadlocks (even
    ``cv2.setNumThreads``); onnxruntime likewise. Then workers start from a ``forkserver``
    (``spawn`` without one). ``FR_DIST_WORKER_START=fork|forkserver|spawn`` forces a method."""
    import multiprocessing as mp
    import os
    import sys

    methods = mp.get_all_start_methods()
    forced = os.environ.get("FR_DIST_WORKER_START")
    if forced:
        if forced not in methods:
            raise ValueError(f"FR_DIST_WORKER_START={forced!r}: not one of {methods}")
        return forced
    fork_unsafe = ("cv2", "onnxruntime")  # libraries whose thread pools deadlock forked children
    if "fork" in methods and not any(m in sys.modules for m in fork_unsafe):
        return "fork"
    return "forkserver" if "forkserver" in methods else "spawn"


def _worker_init(_worker_id: int, parent_pid: Optional[int] = None) -> None:
    # Stop signals are for the trainer (it checkpoints, then exits and takes the workers with it).
    # A forked/spawned worker dies with the trainer (PDEATHSIG); a forkserver child's parent is the
    # fork server, which exits with the trainer, and torch's worker watchdog then ends the worker.
    ignore_stop_signals(die_with_parent=parent_pid is not None and os.getppid() == parent_pid)
    torch.set_num_threads(1)
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:  # pragma: no cover
        pass


def _kill_daemon_children() -> None:
    """At interpreter exit: SIGKILL the daemonic children (DataLoader workers).

    multiprocessing's own exit hook SIGTERMs daemonic children and then joins them without a
    timeout; our workers ignore SIGTERM (stop signals are for the trainer), so that join would
    hang forever. This hook is registered after multiprocessing's, so it runs first (LIFO).
    """
    for p in multiprocessing.active_children():
        if p.daemon:
            p.kill()


@functools.cache
def _register_exit_kill() -> None:
    atexit.register(_kill_daemon_children)


def _forkserver_ignoring_stop_signals() -> None:
    """(Re)start multiprocessing's fork server with SIGTERM/SIGUSR1 ignored (inherited across exec).

    torchrun and Slurm signal the whole process group; a fork server killed by SIGTERM takes the
    DataLoader workers forked from it down, and the rank crashes before it checkpoints.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    from multiprocessing import forkserver

    srv = forkserver._forkserver
    if getattr(srv, "_fr_dist_ignores_stop", False) and srv._forkserver_pid is not None:
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in SIGNALS}
    try:
        srv._stop()  # one started before (e.g. by the synthetic generator) has the default handlers
        srv.ensure_running()
        srv._fr_dist_ignores_stop = True
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


class TrainLoader:
    """Iterable over the rest of the sampler's epoch: (images float [B,3,H,W], labels int64 [B])."""

    def __init__(
        self,
        dataset: RecordDataset,
        sampler: ShardedSampler,
        device,
        num_workers: int = 2,
        flip: bool = True,
    ):
        self.dataset, self.sampler, self.device = dataset, sampler, torch.device(device)
        self.num_classes, self.num_images = dataset.num_classes, len(dataset)
        cuda = self.device.type == "cuda"
        method = worker_start_method() if num_workers > 0 else None
        if num_workers > 0:
            _register_exit_kill()
        if method == "forkserver":
            _forkserver_ignoring_stop_signals()
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=FlipBatchSampler(sampler, flip),
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=cuda,
            worker_init_fn=functools.partial(_worker_init, parent_pid=os.getpid()) if num_workers else None,
            multiprocessing_context=method,
            persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None,
        )

    def __len__(self) -> int:
        return len(self.sampler)

    def _to_device(self, batch):
        imgs, labels = batch
        imgs = imgs.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if imgs.dtype == torch.uint8:
            imgs = normalize_on_device(imgs)
        return imgs, labels

    def __iter__(self):
        if self.device.type != "cuda":
            for batch in self.loader:
                yield self._to_device(batch)
            return
        side = torch.cuda.Stream(self.device)
        staged = None
        for batch in self.loader:  # copy + normalise batch k+1 on a side stream while k trains
            with torch.cuda.stream(side):
                nxt = self._to_device(batch)
            if staged is not None:
                yield staged
            main = torch.cuda.current_stream(self.device)
            main.wait_stream(side)
            for t in nxt:
                t.record_stream(main)  # the caching allocator must not reuse them early
            staged = nxt
        if staged is not None:
            yield staged


def build_train_loader(
    rec_path,
    rank: int,
    world_size: int,
    batch_size: int,
    seed: int = 0,
    num_workers: int = 2,
    device="cpu",
    drop_last: bool = True,
    backend: str = "torch",
    flip: bool = True,
    skip_bad: bool = False,
    normalize: str = "device",
    shuffle: bool = True,
    dali_reader: str = "mxnet",
    image_size: tuple[int, int] = (112, 112),
):
    """The training loader of this rank (``backend``: torch | dali).

    Returns an object iterable once per epoch (call ``loader.sampler.set_epoch(e)`` first) with
    ``.sampler`` (set_epoch / state_dict / load_state_dict), ``len()`` = steps left in the epoch,
    ``.num_classes`` and ``.num_images``. ``dali_reader`` (DALI only): ``mxnet`` shards with
    ``fn.readers.mxnet`` by rank; ``sampler`` feeds the same ShardedSampler order as the torch
    path (exact resume on any world size); see :mod:`fr_dist.data.dali`.
    """
    if backend == "dali":
        return DaliTrainLoader(
            rec_path,
            rank,
            world_size,
            batch_size,
            seed=seed,
            device=device,
            drop_last=drop_last,
            flip=flip,
            num_threads=max(1, num_workers),
            reader=dali_reader,
            shuffle=shuffle,
            image_size=image_size,
        )
    if backend != "torch":
        raise ValueError(f"unknown loader backend {backend!r}; known: dali, torch")
    ds = RecordDataset(rec_path, skip_bad=skip_bad, image_size=image_size, normalize=normalize)
    sampler = ShardedSampler(
        len(ds), rank, world_size, batch_size, seed=seed, drop_last=drop_last, shuffle=shuffle
    )
    return TrainLoader(ds, sampler, device, num_workers=num_workers, flip=flip)


# ----------------------------------------------------------------------------- config section
from typing import Literal  # noqa: E402

from pydantic import Field  # noqa: E402
from pydantic.dataclasses import dataclass as pydantic_dataclass  # noqa: E402

_CONFIG = SECTION_CONFIG


@pydantic_dataclass(config=_CONFIG)
class SyntheticConfig:
    """``data.synthetic``: arguments of :func:`fr_dist.data.make_synthetic_dataset`."""

    generate: bool = False
    """Generate the synthetic face-identity RecordIO set into out_dir when data.rec is missing."""
    out_dir: str = "data/synthetic"
    """Where the synthetic set is written (train.rec/.idx/property, heldout.bin)."""
    num_identities: int = Field(1000, gt=0)
    """Training identities (classes)."""
    images_per_identity: int = Field(16, gt=0)
    """Images per training identity."""
    heldout_identities: int = Field(200, ge=0)
    """Identities kept out of training for the verification pairs."""
    heldout_pairs: int = Field(1000, ge=0)
    """Verification pairs in heldout.bin (half genuine)."""
    seed: int = 1234
    """Generator seed (the dataset is a pure function of it)."""


@pydantic_dataclass(config=_CONFIG)
class DataConfig:
    """``data``: what :func:`build_train_loader` reads and how."""

    rec: str = "data/synthetic/train.rec"
    """MXNet RecordIO file (train.idx and property beside it)."""
    num_classes: int = Field(0, ge=0)
    """Classes K; 0 = read from the dataset; else must be >= the dataset's classes."""
    batch_size: int = Field(128, ge=1)
    """Images per rank per micro-step (global batch = batch_size x world size x grad_accum)."""
    num_workers: int = Field(2, ge=0)
    """DataLoader worker processes per rank (torch loader; 0 = load in the main process)."""
    loader: Literal["torch", "dali"] = "torch"
    """Loader backend: torch | dali (GPU JPEG decode; needs the dali extra)."""
    flip: bool = True
    """Random horizontal flip augmentation."""
    drop_last: bool = True
    """Drop the incomplete last global batch of an epoch."""
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    """Synthetic dataset generation (CPU demo, tests)."""
