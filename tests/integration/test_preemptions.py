"""Many preemptions in a row: SIGTERM to the launcher at random (seeded) steps, resume, again and again.

One small demo-like run (2 ranks on CPU under ``python -m fr_dist.launch``, DataLoader workers on:
``data.num_workers=1``, ``checkpoint.save_on_signal`` as by default, ``checkpoint.resume=auto``) is
started, stopped by a SIGTERM sent to the launcher only (as a scheduler does) once it has logged a step
drawn at random, and started again with the same command, N times; then it runs to the end. A
preemptible queue does exactly this to a week-long job dozens of times.

Each stop must be graceful (the ranks agree at the next log step, checkpoint there and exit; the
launcher exits 0 and names the step), each restart must resume from that checkpoint, and in the end:

* every logged loss (and lr, grad norm, epoch) is bitwise equal to the uninterrupted run's, and the
  final checkpoint's tensors too;
* ``metrics.jsonl`` holds each step exactly once (no step repeated by a resume, none missing);
* the disk stays bounded: after every stop at most ``checkpoint.keep`` checkpoints, no partial
  ``.tmp-*`` folder left, and the checkpoints' bytes at most ``keep`` x one checkpoint's.

``CYCLES_CI`` (5) cycles always run; the 20-cycle version runs when ``FR_DIST_TEST_PREEMPTIONS=N`` is set
(N cycles; 20 took 610 s here), not in CI. Every wait is bounded (pytest-timeout, subprocess
timeouts, dist.timeout_s), so a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_faults import TORCHRUN, _cli_args  # noqa: E402
from test_launcher import _launch, _stop  # noqa: E402
from test_restarts import _final_state  # noqa: E402

STEPS = 100
KEEP = 2
CYCLES_CI = 5
CYCLES_SLOW = int(os.environ.get("FR_DIST_TEST_PREEMPTIONS", "20"))
MAX_GAP = 6  # steps between a resume and the next stop: 1 .. MAX_GAP - 1, drawn with a seeded generator

TINY_DATA = dict(
    num_identities=12, images_per_identity=4, heldout_identities=4, heldout_pairs=8, seed=13
)  # the conftest's tiny_data fixture (6 steps an epoch at 2 ranks x 4 images: stops land mid-epoch)


def _args(data: Path, out: Path) -> list[str]:
    return _cli_args(
        data,
        out,
        **{
            "data.num_workers": 1,
            "train.max_steps": STEPS,
            "train.log_every": 1,  # the ranks agree on a stop at every step: it lands where it was sent
            "train.momentum": 0.9,
            "checkpoint.every": 10,  # periodic saves too: the rotation of checkpoint.keep is exercised
            "checkpoint.keep": KEEP,
            "checkpoint.resume": "auto",
            "checkpoint.save_at_end": "true",
            "dist.timeout_s": 60,
            "dist.rendezvous_timeout_s": 60,
        },
    )


def _logged(out: Path) -> list[dict]:
    """Training records of metrics.jsonl (those with a loss), in file order; a torn last line skipped."""
    recs = []
    m = out / "metrics.jsonl"
    if m.is_file():
        for line in m.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if "loss" in rec:
                recs.append(rec)
    return recs


def _checkpoints(out: Path) -> tuple[list[int], list[str], int]:
    """(complete checkpoint steps, names of anything else under checkpoints/, bytes of all of it)."""
    root = out / "checkpoints"
    steps, other, size = [], [], 0
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.isdigit() and (p / "meta.json").is_file():
                steps.append(int(p.name))
            else:
                other.append(p.name)
            size += sum(f.stat().st_size for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
    return sorted(steps), sorted(other), size


def _wait_logged(out: Path, step: int, p, timeout: float) -> int:
    """Wait until the run has logged ``step`` (returns the newest step logged, or -1 if it exited)."""
    end = time.time() + timeout
    while time.time() < end:
        recs = _logged(out)
        if recs and recs[-1]["step"] >= step:
            return recs[-1]["step"]
        if p.poll() is not None:
            return -1
        time.sleep(0.02)
    raise AssertionError(f"step {step} not logged within {timeout} s")


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """The uninterrupted run (same command, no signal)."""
    if not Path(TORCHRUN).exists():
        pytest.skip("torchrun not found beside the interpreter")
    tmp = tmp_path_factory.mktemp("preempt_ref")
    p = _launch(_args(tiny_data, tmp / "ref"), tmp / "ref.txt")
    try:
        assert p.wait(timeout=400) == 0, (tmp / "ref.txt").read_text()[-3000:]
    finally:
        _stop(p)
    return dict(_final_state(tmp / "ref"), logged=_logged(tmp / "ref"))


def _preempt_repeatedly(data: Path, tmp_path: Path, cycles: int, seed: int) -> tuple[Path, list[dict]]:
    """``cycles`` launches each stopped by SIGTERM to the launcher after a random step, then one to the end."""
    rng = np.random.default_rng(seed)
    out = tmp_path / "run"
    stops: list[dict] = []
    one_ckpt = 0  # bytes of one checkpoint (the largest seen)
    prev = 0  # the step the next launch resumes from
    for i in range(cycles + 1):
        log = tmp_path / f"launch{i}.txt"
        p = _launch(_args(data, out), log)
        try:
            if i < cycles:
                target = prev + int(rng.integers(1, MAX_GAP))
                assert target < STEPS - 1, f"cycle {i}: no steps left to stop at (stops so far: {stops})"
                seen = _wait_logged(out, target, p, timeout=300)
                assert seen >= 0, f"cycle {i} exited before step {target}:\n" + log.read_text()[-3000:]
                p.send_signal(signal.SIGTERM)  # the launcher only: torchrun forwards it to the ranks
            rc = p.wait(timeout=300)
        finally:
            _stop(p)
        text = log.read_text()
        assert rc == 0, f"launch {i}: exit code {rc}\n" + text[-3000:]
        assert "is killed by signal" not in text and "Traceback" not in text, text[-3000:]
        if i > 0:
            assert f"resumed from {out / 'checkpoints' / str(prev)} at step {prev}" in text, text[-3000:]
        if i < cycles:
            assert "fr_dist.launch: stopped gracefully by SIGTERM at step " in text, text[-3000:]
            step = int(text.split("fr_dist.launch: stopped gracefully by SIGTERM at step ")[1].split(",")[0])
            assert target <= step < STEPS, (target, step)
            stops.append(dict(cycle=i, signalled_after=seen, stopped_at=step))
            prev = step
        steps, other, size = _checkpoints(out)
        assert other == [], f"launch {i} left {other} in checkpoints/"
        assert len(steps) <= KEEP and steps[-1] == (prev if i < cycles else STEPS), steps
        one_ckpt = max(one_ckpt, size // len(steps))
        assert size <= KEEP * one_ckpt * 1.05, (size, one_ckpt)  # bounded by checkpoint.keep
    return out, stops


def _check_equals_reference(reference: dict, out: Path, stops: list[dict]) -> None:
    logged = _logged(out)
    got_steps = [r["step"] for r in logged]
    assert got_steps == list(range(1, STEPS + 1)), f"steps repeated or missing: {got_steps} (stops {stops})"
    for want, got in zip(reference["logged"], logged):
        for k in ("loss", "lr", "grad_norm", "epoch"):
            assert got[k] == want[k], (want["step"], k, want[k], got[k], stops)  # bitwise (JSON floats)
    final = _final_state(out)
    assert final["step"] == reference["step"] == STEPS
    assert final["results"]["loss"] == reference["results"]["loss"]
    assert final["state"].keys() == reference["state"].keys()
    for k, v in reference["state"].items():
        torch.testing.assert_close(final["state"][k], v, rtol=0, atol=0, msg=k)  # bitwise


@pytest.mark.dist
@pytest.mark.timeout(900)
def test_5_preemptions_equal_uninterrupted(tiny_data, reference, tmp_path):
    out, stops = _preempt_repeatedly(tiny_data, tmp_path, CYCLES_CI, seed=5)
    print(f"stops: {stops}")
    _check_equals_reference(reference, out, stops)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(
    "FR_DIST_TEST_PREEMPTIONS" not in os.environ,
    reason="the 20-cycle run (~10 min on 2 cores) runs with FR_DIST_TEST_PREEMPTIONS=20; CI runs the 5-cycle one",
)
def test_20_preemptions_equal_uninterrupted(tiny_data, reference, tmp_path):
    out, stops = _preempt_repeatedly(tiny_data, tmp_path, CYCLES_SLOW, seed=20)
    print(f"stops: {stops}")
    assert len(stops) == CYCLES_SLOW
    _check_equals_reference(reference, out, stops)
