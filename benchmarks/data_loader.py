"""Data-loading throughput: decode + augment (flip) + normalise, images/s, on one RecordIO file.

Measured (all on CPU, same file, same batch size):

* ``decoders``: JPEG decode only, one thread: simplejpeg vs OpenCV vs Pillow.
* ``torch``: the PyTorch path (``RecordDataset`` + ``DataLoader``) with ``num_workers=0`` (one
  core: the per-core figure) and with worker processes; ``normalize=device`` (workers ship uint8,
  the consumer normalises) vs ``normalize=worker`` (workers ship float32).
* ``dali_cpu``: the DALI path on CPU (``device_id=None``, ``fn.decoders.image`` on ``cpu``) with
  ``num_threads=1`` (per core) and more threads, both readers (``mxnet`` and ``sampler``).

    python -m benchmarks.data_loader --out benchmarks/results/cpu2_202611/data_loader.json
    python -m benchmarks.data_loader --rec /data/ms1mv3/train.rec --images 20000

Without ``--rec`` a synthetic set (fr_dist.data.synthetic) is generated in a temp folder.
Figures depend on the machine and on its load: the JSON records the load average around the run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import host_facts, load_average, synthetic_recordio, write_json_atomic
from fr_dist.data import build_train_loader, open_recordio
from fr_dist.data.image import DECODERS


def bench_decoders(rec, n: int, repeats: int) -> list[dict]:
    payloads = [rec.read(k)[1] for k in rec.image_keys[:n]]
    out = []
    ref = [DECODERS["cv2"](p) for p in payloads[:50]]
    for name, fn in DECODERS.items():
        try:
            fn(payloads[0])
        except ImportError:
            continue
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            for p in payloads:
                fn(p)
            best = min(best, time.perf_counter() - t)
        maxdiff = max(
            int(np.abs(fn(p).astype(int) - r.astype(int)).max()) for p, r in zip(payloads[:50], ref)
        )
        out.append(
            dict(
                decoder=name,
                images=len(payloads),
                images_per_s=len(payloads) / best,
                max_abs_diff_vs_cv2=maxdiff,
            )
        )
    return out


def _time_loader(loader, max_images: int, warmup_batches: int = 2) -> dict:
    loader.sampler.set_epoch(0)
    it = iter(loader)
    for _ in range(warmup_batches):  # worker start-up, pipeline build
        next(it)
    n, t = 0, time.perf_counter()
    for batch in it:
        n += batch[0].shape[0]
        if n >= max_images:
            break
    dt = time.perf_counter() - t
    assert batch[0].dtype == torch.float32 and batch[1].dtype == torch.int64
    return dict(images=n, seconds=dt, images_per_s=n / dt)


def _bench_loader(rec_path, batch: int, images: int, cores: int, record: dict, **loader_kw) -> dict:
    """Images/s of one ``build_train_loader`` configuration (random flip on), as ``record`` + the timing."""
    ld = build_train_loader(rec_path, 0, 1, batch, seed=0, device="cpu", flip=True, **loader_kw)
    r = _time_loader(ld, images)
    del ld
    return dict(record, cores=cores, images_per_s_per_core=r["images_per_s"] / cores, **r)


def bench_torch(rec_path, batch: int, images: int, workers_list: list[int]) -> list[dict]:
    return [
        _bench_loader(
            rec_path,
            batch,
            images,
            max(1, workers),
            dict(path="torch", num_workers=workers, normalize=normalize),
            num_workers=workers,
            normalize=normalize,
        )
        for workers in workers_list
        for normalize in ("device", "worker")
    ]


def bench_dali(rec_path, batch: int, images: int, threads_list: list[int]) -> list[dict]:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return [dict(path="dali_cpu", skipped="nvidia-dali not installed")]
    return [
        _bench_loader(
            rec_path,
            batch,
            images,
            threads,
            dict(path="dali_cpu", reader=reader, num_threads=threads),
            num_workers=threads,
            backend="dali",
            dali_reader=reader,
        )
        for threads in threads_list
        for reader in ("mxnet", "sampler")
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rec", default=None, help="RecordIO file (default: generate a synthetic set)")
    ap.add_argument("--images", type=int, default=12288, help="images timed per configuration")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, nargs="*", default=[0, 2], help="torch DataLoader workers")
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2], help="DALI CPU threads")
    ap.add_argument("--decode-images", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="write JSON here (also printed)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    tmp = None
    rec_path = args.rec
    if rec_path is None:
        tmp = tempfile.TemporaryDirectory(prefix="fr_dist_bench_")
        need = max(args.images + 4 * args.batch, args.decode_images)
        t = time.perf_counter()
        rec_path = str(synthetic_recordio(Path(tmp.name), -(-need // 16), 16))
        gen_s = time.perf_counter() - t
    rec = open_recordio(rec_path)
    payload = np.mean([len(rec.read(k)[1]) for k in rec.image_keys[:200]])
    load_before = load_average()
    res = dict(
        benchmark="data_loader",
        host=host_facts(),
        dataset=dict(
            rec=str(rec_path) if args.rec else "synthetic (fr_dist.data.synthetic, seed 0)",
            images=rec.num_images,
            image_size=rec.image_size,
            mean_jpeg_bytes=float(payload),
        ),
        batch=args.batch,
        decoders=bench_decoders(rec, args.decode_images, args.repeats),
        torch=bench_torch(rec_path, args.batch, args.images, args.workers),
        dali_cpu=bench_dali(rec_path, args.batch, args.images, args.threads),
        notes=[
            "images_per_s: decode + random flip + normalise to float32 [-1, 1] + batch, one epoch slice",
            "per core = images_per_s / cores given to the loader (torch workers or DALI threads); "
            "num_workers=0 runs everything in the consumer process (the cleanest one-core figure); "
            "the consumer process and DALI's own reader thread are not counted as cores",
            "normalize=device: workers ship uint8 and the consumer normalises; worker: workers ship float32",
        ],
        load_average_before=load_before,
        load_average_after=load_average(),
    )
    if tmp is not None:
        res["dataset"]["generation_s"] = gen_s
    try:
        import nvidia.dali as dali

        res["host"]["dali"] = dali.__version__
    except ImportError:
        pass
    print(json.dumps(res, indent=1))
    if args.out:
        write_json_atomic(Path(args.out), res)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
