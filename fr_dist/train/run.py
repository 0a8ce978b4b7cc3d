"""Entry point of a training process: validate data, start the runtime, train, evaluate, exit cleanly."""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Optional

from fr_dist.train.config import Config, ConfigError, validate_against_dataset

__all__ = ["run_training", "build_trainer", "dataset_num_classes"]


def dataset_num_classes(rec_path: str) -> tuple[int, int]:
    """(number of classes, number of images) of a RecordIO dataset, from its index/property."""
    from fr_dist.data import open_recordio

    if not Path(rec_path).exists():
        raise ConfigError(
            f"data.rec: {rec_path} does not exist (set data.synthetic.generate=true for the demo data)"
        )
    rec = open_recordio(rec_path)
    return rec.num_classes, rec.num_images


def build_trainer(cfg: Config, env, device, dataset_classes: Optional[int] = None):
    """Loader + Trainer (+ verification callback) of this rank; the runtime is already initialised."""
    from fr_dist.data import build_train_loader
    from fr_dist.train.trainer import Trainer

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
    )
    trainer = Trainer(cfg, env, device, loader, cfg.data.num_classes or dataset_classes)
    if cfg.eval.bins:
        from fr_dist.eval.callback import VerificationCallback

        trainer.evaluator = VerificationCallback(cfg.eval, device, cfg.output_dir)
    return trainer


def run_training(cfg: Config, exit_process: bool = True) -> int:
    """Train per ``cfg``; under torchrun/srun every rank runs this. Exits via runtime.shutdown."""
    k_data, n_images = dataset_num_classes(cfg.data.rec)
    validate_against_dataset(cfg, k_data, k_data - 1)  # before any process group starts
    num_classes = cfg.data.num_classes or k_data

    from fr_dist.runtime import init_distributed, shutdown

    code = 0
    try:
        env, device = init_distributed(cfg.device)
        if env.is_main:
            print(
                f"fr_dist: {env.world_size} rank(s) on {device}, {n_images} images, {num_classes} classes, "
                f"head={cfg.head.name}, backbone={cfg.model.name}, engine={cfg.engine}, amp={cfg.train.amp}",
                flush=True,
            )
        trainer = build_trainer(cfg, env, device, k_data)
        results = trainer.fit()
        if env.is_main:
            if results.get("eval"):
                from fr_dist.eval.cli import format_table

                print("verification on held-out pairs (10-fold, flip protocol):")
                print(format_table(results["eval"]), flush=True)
            out = Path(cfg.output_dir) / "results.json"
            out.write_text(json.dumps(results, indent=1, default=float))
            print(f"fr_dist: done, results in {out}", flush=True)
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
        code = 1
    if exit_process:
        shutdown(code)
    return code
