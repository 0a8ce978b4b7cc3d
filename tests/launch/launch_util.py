"""Helpers of the launch tests (a module of its own: `conftest` is not importable by name when
several conftest.py files are loaded)."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def demo_overrides(data: Path, out: Path, steps: int = 12, **extra) -> list[str]:
    """configs/demo_cpu.yaml shrunk: a few steps, no DataLoader workers, no eval, no TensorBoard."""
    ov = {
        "output_dir": str(out),
        "data.rec": str(data / "train.rec"),
        "data.synthetic.generate": "false",
        "data.num_workers": 0,
        "data.batch_size": 8,
        "train.max_steps": steps,
        "train.warmup_steps": 2,
        "train.log_every": 2,
        "train.tensorboard": "false",
        "eval.bins": "[]",
    }
    ov.update(extra)
    return ["--config", str(REPO / "configs" / "demo_cpu.yaml")] + [f"{k}={v}" for k, v in ov.items()]


def losses(out: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl (the last record of a step wins, e.g. after a resume)."""
    res: dict[int, float] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "loss" in m:
            res[int(m["step"])] = m["loss"]
    return res
