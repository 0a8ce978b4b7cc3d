"""Rank-0 logging: JSONL metrics, TensorBoard scalars, a progress line, a throughput / ETA meter.

    log = MetricsLogger("runs/demo", rank=env.rank, tensorboard=True)
    meter = Throughput()
    meter.update(images=global_batch, seconds=step_time)
    log.print(format_progress(step, total, epoch, loss, lr, meter.rate, meter.eta(total - step)))
    log.log(step, loss=loss, lr=lr, images_per_s=meter.rate)   # RUN/metrics.jsonl + RUN/tb
    log.close()

On ranks other than 0 every method is a no-op: no files are created and nothing is printed.
``metrics.jsonl`` holds one strict-JSON object per line (non-finite numbers are written as
``null``), flushed after every line so a crash loses nothing and ``tail -f`` works.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

__all__ = ["MetricsLogger", "Throughput", "format_progress", "format_duration", "rank0_print"]


def _scalar(v: Any) -> Any:
    """Python / numpy / 0-d torch numbers -> float or int; others unchanged (strings, lists)."""
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 0) == 0:
        v = v.item()
    if isinstance(v, bool):
        return v
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    return v


class MetricsLogger:
    """``RUN/metrics.jsonl`` (one object per :meth:`log` call) and ``RUN/tb`` TensorBoard scalars.

    Args:
        output_dir: the run directory (created on rank 0).
        rank: global rank; only rank 0 writes or prints.
        tensorboard: also write TensorBoard scalars (imported lazily; a missing tensorboard
            package degrades to JSONL only, with a warning).
        filename: the JSONL file name inside ``output_dir``. It is appended to, so a resumed
            run continues the same file (after :meth:`truncate_after` drops the re-run steps).
    """

    def __init__(self, output_dir, rank: int, tensorboard: bool = True, filename: str = "metrics.jsonl"):
        self.enabled = int(rank) == 0
        self.tb = None
        self.file = None
        self.path = Path(output_dir) / filename
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # tensorboard is a dependency, but degrade rather than die
                warnings.warn(f"TensorBoard unavailable ({e}); metrics go to {self.path} only", stacklevel=2)
            else:
                self.tb = SummaryWriter(str(Path(output_dir) / "tb"))

    def log(self, step: int, **scalars) -> None:
        """Append ``{"step": step, "time": unix_time, **scalars}``; TensorBoard gets the numbers.

        Names without a ``/`` go under ``train/`` in TensorBoard (``loss`` -> ``train/loss``).
        """
        if not self.enabled or self.file is None:
            return
        values = {k: _scalar(v) for k, v in scalars.items()}
        rec = {"step": int(step), "time": round(time.time(), 3), **values}
        self.file.write(json.dumps(rec, allow_nan=False, default=str) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k if "/" in k else f"train/{k}", float(v), int(step))
            self.tb.flush()

    def truncate_after(self, step: int) -> int:
        """Drop the records of steps > ``step`` (a resume re-runs them); returns how many were dropped.

        ``metrics.jsonl`` is rewritten atomically; TensorBoard reopens with ``purge_step=step + 1``
        (its readers then hide the stale events of those steps).
        """
        if not self.enabled or self.file is None:
            return 0
        self.file.close()
        kept, dropped = [], 0
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec_step = int(json.loads(line).get("step", -1))
            except (ValueError, AttributeError, TypeError):  # a torn last line of a crash: drop it
                dropped += 1
                continue
            if rec_step > step:
                dropped += 1
            else:
                kept.append(line)
        if dropped:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(x + "\n" for x in kept), encoding="utf-8")
            tmp.replace(self.path)
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if dropped and self.tb is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb.close()
            self.tb = SummaryWriter(str(self.path.parent / "tb"), purge_step=int(step) + 1)
        return dropped

    def print(self, *args, **kwargs) -> None:
        """``print`` on rank 0 only (flushed)."""
        if self.enabled:
            kwargs.setdefault("flush", True)
            print(*args, **kwargs)

    def close(self) -> None:
        """Close the files (idempotent)."""
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def rank0_print(rank: int, *args, file=None, **kwargs) -> None:
    """``print`` on rank 0 only, flushed (progress lines under torchrun interleave otherwise)."""
    if int(rank) == 0:
        print(*args, file=file or sys.stdout, flush=True, **kwargs)


class Throughput:
    """Images/s and seconds/step as exponential moving averages over optimizer steps.

    The first update (compilation, allocator warm-up, loader start) initialises the averages
    and is replaced by the second, so a slow first step does not distort the ETA.
    """

    def __init__(self, alpha: float = 0.1):
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha={alpha} must be in (0, 1]")
        self.alpha = alpha
        self.rate = 0.0
        """EMA of global images per second."""
        self.sec_per_step = 0.0
        """EMA of seconds per optimizer step."""
        self.n = 0
        """Updates so far."""
        self.images = 0
        """Images seen so far."""

    def update(self, images: int, seconds: float) -> None:
        """One optimizer step of ``images`` (global) that took ``seconds``."""
        self.n += 1
        self.images += int(images)
        if seconds <= 0:
            return
        rate = images / seconds
        a = 1.0 if self.n <= 2 else self.alpha
        self.rate = (1 - a) * self.rate + a * rate
        self.sec_per_step = (1 - a) * self.sec_per_step + a * seconds

    @property
    def images_per_s(self) -> float:
        return self.rate

    def eta(self, steps_left: int) -> float:
        """Seconds to go for ``steps_left`` optimizer steps."""
        return max(0, steps_left) * self.sec_per_step


def format_duration(seconds: float) -> str:
    """``3725`` -> ``1:02:05``; days shown as ``2d 03:00:00``; non-finite -> ``?``."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(max(0.0, seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}d {h:02d}:{m:02d}:{s:02d}" if d else f"{h:d}:{m:02d}:{s:02d}"


def format_progress(
    step: int,
    total: int,
    epoch: int | float,
    loss: float,
    lr: float,
    images_per_s: float,
    eta_s: float,
    extra: str | dict | None = "",
) -> str:
    """One progress line, e.g.

    ``step  120/2000 (6.0%) | epoch 1 | loss  12.3456 | lr 0.09500 | 812.3 img/s | eta 0:03:51``

    ``extra``: a string appended as is, or a dict rendered as ``key value`` pairs.
    """
    width = len(str(total))
    pct = 100.0 * step / total if total else 0.0
    loss_s = f"{loss:9.4f}" if loss is not None else "      n/a"
    ep = f"{epoch:.2f}" if isinstance(epoch, float) and not float(epoch).is_integer() else f"{int(epoch)}"
    line = (
        f"step {step:>{width}}/{total} ({pct:.1f}%) | epoch {ep} | loss {loss_s} | "
        f"lr {lr:.5g} | {images_per_s:8.1f} img/s | eta {format_duration(eta_s)}"
    )
    if isinstance(extra, dict):
        extra = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in extra.items())
    return line + (f" | {extra}" if extra else "")
