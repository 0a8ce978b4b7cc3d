"""Rank-0 logging: valid JSONL, TensorBoard events, nothing at all on other ranks, meters, progress line."""

from __future__ import annotations

import builtins
import json
import math
import sys

import pytest
import torch

from fr_dist.train.logging import (
    MetricsLogger,
    Throughput,
    format_duration,
    format_progress,
    rank0_print,
)


def _strict_json(line: str) -> dict:
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=refuse)


def test_jsonl_one_valid_object_per_line(tmp_path):
    log = MetricsLogger(tmp_path, rank=0, tensorboard=False)
    log.log(1, loss=3.5, lr=0.1, images_per_s=100.0)
    log.log(2, loss=torch.tensor(3.25), lr=0.09, images_per_s=110, note="x")
    log.log(3, loss=float("nan"), lr=0.08, grad_norm=float("inf"))
    # flushed after every line: readable before close
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    recs = [_strict_json(s) for s in lines]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert recs[0]["loss"] == 3.5 and recs[0]["lr"] == 0.1 and recs[0]["images_per_s"] == 100.0
    assert recs[1]["loss"] == 3.25 and recs[1]["note"] == "x"
    assert recs[2]["loss"] is None and recs[2]["grad_norm"] is None  # non-finite -> null
    assert all(isinstance(r["time"], float) for r in recs)
    log.close()
    log.close()  # idempotent


def test_jsonl_appends_on_resume(tmp_path):
    with MetricsLogger(tmp_path, rank=0, tensorboard=False) as log:
        log.log(1, loss=1.0)
    with MetricsLogger(tmp_path, rank=0, tensorboard=False) as log:
        log.log(2, loss=0.5)
    steps = [json.loads(s)["step"] for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_nonzero_rank_writes_and_prints_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    log = MetricsLogger(out, rank=1, tensorboard=True)
    log.log(1, loss=1.0, lr=0.1)
    log.print("should not appear")
    rank0_print(1, "nor this")
    log.close()
    assert not out.exists()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_rank0_prints(tmp_path, capsys):
    log = MetricsLogger(tmp_path, rank=0, tensorboard=False)
    log.print("hello")
    rank0_print(0, "world")
    assert capsys.readouterr().out == "hello\nworld\n"


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    with MetricsLogger(tmp_path, rank=0, tensorboard=True) as log:
        assert log.tb is not None
        log.log(1, loss=2.0, lr=0.1)
        log.log(2, **{"loss": 1.5, "eval/lfw/accuracy": 0.9})
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "eval/lfw/accuracy"} <= tags
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([2.0, 1.5])


def test_missing_tensorboard_degrades_with_warning(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "torch.utils.tensorboard":
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.warns(UserWarning, match="TensorBoard unavailable"):
        log = MetricsLogger(tmp_path, rank=0, tensorboard=True)
    assert log.tb is None
    log.log(1, loss=1.0)
    log.close()
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1


def test_throughput_ema_and_eta():
    m = Throughput(alpha=0.5)
    m.update(1000, 10.0)  # slow first step (warm-up) ...
    m.update(1000, 1.0)  # ... is replaced by the second
    assert m.rate == pytest.approx(1000.0) and m.sec_per_step == pytest.approx(1.0)
    m.update(1000, 0.5)  # EMA: 0.5 * 1000 + 0.5 * 2000
    assert m.images_per_s == pytest.approx(1500.0)
    assert m.sec_per_step == pytest.approx(0.75)
    assert m.eta(100) == pytest.approx(75.0) and m.eta(-3) == 0.0
    assert m.images == 3000
    m.update(10, 0.0)  # a zero-duration step does not divide by zero
    assert math.isfinite(m.rate)


def test_format_duration():
    assert format_duration(0) == "0:00:00"
    assert format_duration(3725) == "1:02:05"
    assert format_duration(2 * 86400 + 3 * 3600) == "2d 03:00:00"
    assert format_duration(float("nan")) == "?"


def test_format_progress():
    line = format_progress(120, 2000, 1, 12.3456, 0.095, 812.34, 231.0, extra={"b": -5.4321})
    assert line.startswith("step  120/2000 (6.0%)")
    for part in ("epoch 1", "loss   12.3456", "lr 0.095", "812.3 img/s", "eta 0:03:51", "b -5.432"):
        assert part in line, line
    assert format_progress(1, 10, 0, float("nan"), 0.1, 1.0, 5.0, "x").endswith("| x")
    assert "n/a" in format_progress(1, 10, 0.5, None, 0.1, 1.0, 5.0)
