"""Entry point of a training process: validate data, start the runtime, train, evaluate, exit cleanly."""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Optional

from fr_dist import comm
from fr_dist.data import build_train_loader, open_recordio
from fr_dist.eval.callback import VerificationCallback
from fr_dist.eval.verification import format_table
from fr_dist.launch import write_stop_marker
from fr_dist.runtime import RendezvousError, init_distributed, shutdown
from fr_dist.train.config import Config, ConfigError, validate_against_dataset
from fr_dist.train.logging import rank0_print
from fr_dist.train.trainer import Trainer

__all__ = ["run_training", "build_trainer", "dataset_num_classes"]


def dataset_num_classes(rec_path: str) -> tuple[int, int]:
    """(number of classes, number of images) of a RecordIO dataset, from its index/property."""
    if not Path(rec_path).exists():
        raise ConfigError(
            f"data.rec: {rec_path} does not exist (set data.synthetic.generate=true for the demo data)"
        )
    rec = open_recordio(rec_path)
    return rec.num_classes, rec.num_images


def build_trainer(cfg: Config, env, device, dataset_classes: Optional[int] = None):
    """Loader + Trainer (+ verification callback) of this rank; the runtime is already initialised."""
    if dataset_classes is None:  # not given by run_training: read and validate the dataset here
        dataset_classes, _ = dataset_num_classes(cfg.data.rec)
        validate_against_dataset(cfg, dataset_classes, dataset_classes - 1)
    loader = build_train_loader(
        cfg.data.rec,
        rank=env.rank,
        world_size=env.world_size,
        batch_size=cfg.data.batch_size,
        seed=cfg.seed,
        num_workers=cfg.data.num_workers,
        device=device,
        drop_last=cfg.data.drop_last,
        backend=cfg.data.loader,
        flip=cfg.data.flip,
        image_size=(cfg.model.input_size, cfg.model.input_size),
    )
    native = getattr(getattr(getattr(loader, "dataset", None), "rec", None), "image_size", None)
    if native and tuple(native) != (cfg.model.input_size,) * 2:
        rank0_print(
            env.rank,
            f"fr_dist: data: resizing the dataset's {native[0]}x{native[1]} images to "
            f"{cfg.model.input_size}x{cfg.model.input_size} (model.input_size)",
        )
    trainer = Trainer(cfg, env, device, loader, cfg.data.num_classes or dataset_classes)
    if cfg.eval.bins:
        trainer.evaluator = VerificationCallback(cfg.eval, device, cfg.output_dir)
    return trainer


def _is_dist_failure(e: BaseException) -> bool:
    import torch.distributed as dist

    text = str(e)
    return isinstance(e, getattr(dist, "DistError", ())) or any(
        w in text for w in ("Timed out waiting", "Application timeout", "Connection closed by peer", "gloo")
    )


def run_training(cfg: Config, exit_process: bool = True) -> int:
    """Train per ``cfg``; under torchrun/srun every rank runs this. Exits via runtime.shutdown."""
    k_data, n_images = dataset_num_classes(cfg.data.rec)
    validate_against_dataset(cfg, k_data, k_data - 1)  # before any process group starts
    num_classes = cfg.data.num_classes or k_data

    code, stopped = 0, None
    try:
        env, device = init_distributed(
            cfg.device, timeout_s=cfg.dist.timeout_s, rendezvous_timeout_s=cfg.dist.rendezvous_timeout_s
        )
        rank0_print(
            env.rank,
            f"fr_dist: {env.world_size} rank(s) on {device}, {n_images} images, {num_classes} classes, "
            f"head={cfg.head.name}, backbone={cfg.model.name}, engine={cfg.engine}, amp={cfg.train.amp}",
        )
        trainer = build_trainer(cfg, env, device, k_data)
        results = trainer.fit()
        if env.is_main:
            if results.get("eval"):
                rank0_print(env.rank, "verification on held-out pairs (10-fold, flip protocol):")
                rank0_print(env.rank, format_table(results["eval"]))
            out = Path(cfg.output_dir) / "results.json"
            out.write_text(json.dumps(results, indent=1, default=float))
        if results.get("preempted"):
            ckpt = Path(cfg.output_dir) / "checkpoints" / str(results["step"])
            stopped = dict(step=results["step"], signal=results.get("signal"), checkpoint=str(ckpt))
            rank0_print(
                env.rank,
                f"fr_dist: stopped by signal {stopped['signal'] or '?'}, checkpoint at step {stopped['step']} "
                f"({ckpt}); relaunch with checkpoint.resume=auto to continue",
            )
        else:
            rank0_print(env.rank, f"fr_dist: done, results in {Path(cfg.output_dir) / 'results.json'}")
    except ConfigError as e:  # e.g. device=cuda without CUDA: one line, no traceback
        print(f"fr_dist: config error: {e}", file=sys.stderr, flush=True)
        code = 2
    except Exception as e:
        # a start-up failure (RendezvousError: no collective ran) names the address and its own key
        if not isinstance(e, (comm.CollectiveError, RendezvousError)) and _is_dist_failure(e):
            # a collective outside fr_dist.comm (DDP's gradient all-reduce, DeepSpeed) failed
            e = comm.translate_failure(e, "all_reduce", "backbone gradients (DDP/DeepSpeed)")
        if isinstance(e, (comm.CollectiveError, RendezvousError)):  # one clear line, not a deep traceback
            print(f"fr_dist: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        else:
            traceback.print_exc()
        sys.stderr.flush()
        code = 1
    if code == 0 and stopped is not None:  # graceful stop: tell fr_dist.launch (exit 0, not torchrun's 1)
        write_stop_marker(env, stopped)
    if exit_process:
        shutdown(code)
    return code
