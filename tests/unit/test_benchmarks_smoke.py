"""Seconds-long smokes of the benchmarks (CI runs them; figures are never asserted). The benchmarks are a package
run from the repository root: ``python -m benchmarks.<name>``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is a package at the repository root, not installed
    sys.path.insert(0, str(ROOT))


def test_benchmarks_are_a_package_without_path_hacks():
    """Every benchmark imports its neighbours as ``benchmarks.<name>``: none edits sys.path."""
    import benchmarks._common  # noqa: F401

    assert (ROOT / "benchmarks" / "__init__.py").is_file()
    hacks = [p.name for p in sorted((ROOT / "benchmarks").glob("*.py")) if "sys.path" in p.read_text()]
    assert not hacks, hacks


# ----------------------------------------------------------------------------- helper "e2e":
# benchmarks.train_throughput and benchmarks/gpu_check.sh
def _e2e_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.mark.dist
def test_train_throughput_smoke(tmp_path):
    out = tmp_path / "tt.json"
    cmd = [sys.executable, "-m", "benchmarks.train_throughput", "--smoke"]
    cmd += ["--data-dir", str(tmp_path / "data"), "--out", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=_e2e_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads(out.read_text())
    (run,) = report["runs"]
    assert run["world_size"] == 2
    got = {(r["head"], r["source"]): r for r in run["results"]}
    try:
        import nvidia.dali  # noqa: F401

        sources = ("synthetic", "torch", "dali")
    except ImportError:
        sources = ("synthetic", "torch")
    for head in ("sphereface2", "partial_fc"):
        for source in sources:
            r = got[(head, source)]
            assert r["free"]["images_per_s_global"] > 0
            assert r["free"]["images_per_s_global"] == pytest.approx(2 * r["free"]["images_per_s_per_rank"])
            shares = r["timed"]["share"]
            assert set(shares) == {"data", "backbone", "head", "comm", "sync"}
            assert sum(shares.values()) == pytest.approx(1.0, abs=1e-6)
            assert shares["comm"] > 0  # 2 ranks: the head's collectives and the gradient all-reduce
            # every collective the comm counters saw went through the timer
            assert r["comm_calls_timed"] == r["comm_calls_counted"] > 0
            assert r["step"] == "fr_dist.train.trainer.Trainer.train_step"
            assert all(w > 0 for w in r["timed"]["subphase_wall_s"].values()), r["timed"]
    if _has_matplotlib():
        assert out.with_suffix(".png").stat().st_size > 0


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_train_throughput_times_the_trainers_step(monkeypatch, tmp_path):
    """The benchmark's free and timed steps are Trainer.train_step calls on one Trainer (no copy of the
    step), and the timed ones reach every sub-phase boundary (hooks on the head, the embeddings' gradient,
    the backbone optimizer)."""
    import torch

    from benchmarks import train_throughput as tt
    from fr_dist.train.trainer import Trainer

    calls = []
    real = Trainer.train_step

    def counted(self, batches):
        calls.append(id(self))
        return real(self, batches)

    monkeypatch.setattr(Trainer, "train_step", counted)
    a = tt.parse(["--smoke", "--device", "cpu", "--sources", "synthetic", "--data-dir", str(tmp_path)])
    a.num_classes = 16
    cpu = torch.device("cpu")
    r = tt.run_config(0, 1, "sphereface2", "synthetic", a, cpu, tt.CommTimer(cpu))
    assert len(calls) == a.warmup + 2 * a.steps and len(set(calls)) == 1
    sub = r["timed"]["subphase_wall_s"]
    assert list(sub) == list(tt.SUBPHASE_NAMES) and all(w > 0 for w in sub.values()), sub
    assert r["free"]["images_per_s_global"] > 0 and r["timed"]["phase_s"]["head"] > 0


def test_train_throughput_phase_breakdown():
    """Compute = slowest rank, collectives = the last-arriving rank's time in them, sync = the rest."""
    import torch

    from benchmarks import train_throughput as tt

    n = len(tt.SUBPHASES)
    t = torch.zeros(2, 1, n, 3, dtype=torch.float64)  # [W, steps, sub-phases, (work, wall, comm)]
    head = tt.SUBPHASES.index("head")
    # head phase: rank 0 computes 3 s and is in collectives 1 s; rank 1 computes 1 s and waits 3 s in them
    t[0, 0, head] = torch.tensor([4.0, 4.5, 1.0], dtype=torch.float64)
    t[1, 0, head] = torch.tensor([4.0, 4.5, 3.0], dtype=torch.float64)
    t[:, 0, 0] = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)  # data
    phases, imbalance = tt.phase_breakdown(t)
    assert phases["head"] == pytest.approx(3.0)
    assert phases["comm"] == pytest.approx(1.0)
    assert phases["data"] == pytest.approx(0.5)
    assert phases["sync"] == pytest.approx(0.5)  # 4.5 s wall - 3 s compute - 1 s collective
    assert sum(phases.values()) == pytest.approx(5.0)  # the walls of the two phases
    assert imbalance == pytest.approx(0.0)  # equal work on both ranks


def test_gpu_check_bash_syntax():
    if shutil.which("bash") is None:
        pytest.skip("bash not found")
    p = subprocess.run(
        ["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr


@pytest.mark.dist
@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("bash / coreutils timeout not found")
    out = tmp_path / "gpu_check"
    env = _e2e_env()
    env["PYTHON"] = sys.executable
    cmd = ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out)]
    cmd += ["--data-dir", str(tmp_path / "data")]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert "gpu_check summary" in p.stdout
    summary = json.loads((out / "summary.json").read_text())
    status = {s["step"]: s["status"] for s in summary["steps"]}
    steps = ["env", "calibrate", "data_synth", "heads_fp32", "train_bf16", "e2e", "capacity", "annotate"]
    try:
        import nvidia.dali  # noqa: F401

        steps.append("dali")
    except ImportError:
        assert status["dali"] == "skipped: nvidia.dali not importable", status
    for step in steps:
        assert status[step] == "ok", (step, status)
    # the synthetic RecordIO set was made by the script (data_synth), not taken from data/
    (run,) = json.loads((out / "train_throughput.json").read_text())["runs"]
    assert {"synthetic", "torch"} <= {r["source"] for r in run["results"]}
    assert (tmp_path / "data" / "synthetic_dry" / "train.rec").stat().st_size > 0
    assert not (out / "synthetic_dry").exists()  # the data stays out of the results folder
    # the GPU-only commands are printed, not run
    assert status["train_fp16_gpu"].startswith("shown") and status["e2e_gpu"].startswith("shown")
    assert "--device cuda" in p.stdout and "train.amp=fp16" in p.stdout


# benchmarks.classifier --smoke (every registered loss): tests/unit/test_plan_losses.py


@pytest.mark.dist
def test_largest_run_smoke(tmp_path):
    """benchmarks.largest_run: 2 gloo ranks train a bf16 fused-update SphereFace2 shard; loss falls."""
    out = tmp_path / "largest_run.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.largest_run", "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=_e2e_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    assert len(res["ranks"]) == 2
    assert res["loss_last"] < res["loss_first"]
    assert all(r["peak_rss_bytes"] > 0 for r in res["ranks"])
    assert res["planner"]["memory_per_rank"]["total"] > 0


# ----------------------------------------------------------------------------- helper "roc":
# benchmarks.demo_losses (every loss's CPU demo: the README table + one ROC figure)
def test_demo_losses_smoke(tmp_path, capsys):
    """Two fake finished demo runs (one with the ROC JSON of eval.plot_dir, one with a checkpoint only: the
    ROC recomputed with the eval code) -> the JSON rows, the markdown table and the overlay figure."""
    from benchmarks import demo_losses as dl
    from fr_dist.heads import list_heads

    out = tmp_path / "demo_losses.json"
    assert dl.main(["--smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["loss"]: r for r in report["rows"]}
    assert set(rows) == set(dl.SMOKE_LOSSES)
    first, second = (rows[name] for name in dl.SMOKE_LOSSES)
    assert first["roc_source"] == "eval.plot_dir json" and second["roc_source"] == "checkpoint"
    for r in rows.values():
        assert r["recipe"] == dl.recipe_for(r["loss"]) and (ROOT / r["recipe"]).is_file()
        assert r["set"] == "heldout" and r["images_per_s"] > 0 and 0 <= r["val_at_far_1e3"] <= 1
        roc = r["roc"]
        assert roc["far"][0] == 0.0 and roc["far"][-1] == 1.0 and len(roc["far"]) == len(roc["tar"])
        assert set(roc["tar_at_far"]) == {"1e-1"}  # 10 impostor pairs: only FAR 0.1 is resolved
    # the fake logs: images/s 100, 110, ... 140 (+ i): the median after the first line
    assert first["images_per_s"] == 125.0 and second["images_per_s"] == 126.0
    # every other registered loss is skipped with its reason (no recipe, or no run among --runs)
    skipped = {s["loss"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) | set(rows) == set(list_heads())
    for loss, reason in skipped.items():
        assert (dl.recipe_for(loss) is None) == reason.startswith("no CPU demo recipe"), (loss, reason)
    md = out.with_suffix(".md").read_text()
    assert md.startswith("| loss | recipe | accuracy (10-fold) | VAL@FAR=1e-3 | images/s |")
    assert f"| {dl.SMOKE_LOSSES[0]} | `{first['recipe']}` | {first['accuracy']:.3f} +- " in md
    if _has_matplotlib():
        from PIL import Image

        with Image.open(out.with_suffix(".png")) as im:
            assert im.size == (640, 480)
    assert "skipped" in capsys.readouterr().out
