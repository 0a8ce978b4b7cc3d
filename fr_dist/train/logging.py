"""Rank-0 logging: progress line, JSONL metrics, TensorBoard scalars, throughput/ETA meter."""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path

__all__ = ["MetricsLogger", "Throughput", "format_progress"]


class MetricsLogger:
    """``RUN/metrics.jsonl`` (one object per logged step) and ``RUN/tb`` scalars; silent on other ranks."""

    def __init__(self, output_dir, rank: int, tensorboard: bool = True):
        self.enabled = rank == 0
        self.tb = None
        self.file = None
        if not self.enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.file = open(out / "metrics.jsonl", "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"))
            except ImportError as e:  # tensorboard is a dependency, but degrade rather than die
                warnings.warn(
                    f"TensorBoard unavailable ({e}); metrics go to metrics.jsonl only", stacklevel=2
                )

    def log(self, step: int, **scalars) -> None:
        if not self.enabled:
            return
        rec = {"step": int(step), "time": time.time()}
        rec.update(
            {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in scalars.items()}
        )
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in scalars.items():
                if isinstance(v, (int, float)) and math.isfinite(float(v)):
                    self.tb.add_scalar(k if "/" in k else f"train/{k}", float(v), step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


class Throughput:
    """Images/s as an exponential moving average over optimizer steps (first step excluded)."""

    def __init__(self, alpha: float = 0.1):
        self.alpha, self.rate, self.sec_per_step, self.n = alpha, 0.0, 0.0, 0

    def update(self, images: int, seconds: float) -> None:
        self.n += 1
        if self.n == 1 or seconds <= 0:  # warm-up step: compile, allocator, workers
            self.sec_per_step = seconds
            self.rate = images / seconds if seconds > 0 else 0.0
            return
        a = self.alpha if self.n > 2 else 1.0
        self.rate = (1 - a) * self.rate + a * images / seconds
        self.sec_per_step = (1 - a) * self.sec_per_step + a * seconds

    def eta(self, steps_left: int) -> float:
        return steps_left * self.sec_per_step


def _hms(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_progress(step, total, epoch, loss, lr, images_per_s, eta_s, extra: str = "") -> str:
    width = len(str(total))
    return (
        f"step {step:>{width}}/{total} | epoch {epoch} | loss {loss:8.4f} | lr {lr:.5f} | "
        f"{images_per_s:8.1f} img/s | eta {_hms(eta_s)}" + (f" | {extra}" if extra else "")
    )
