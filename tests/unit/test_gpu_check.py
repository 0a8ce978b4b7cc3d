"""benchmarks/gpu_check.sh and what it runs: step caps within the budget, JSON kept by a cut step, the
planner beside every measurement, and a dry run in a fresh venv with only torch and numpy."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is a package at the repository root, not installed
    sys.path.insert(0, str(ROOT))
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
GiB = 1 << 30

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash not found")


def _bench(name: str):
    """The module benchmarks.<name>."""
    return importlib.import_module(f"benchmarks.{name}")


class Cut(Exception):
    """Stands for the step's timeout arriving in the middle of a benchmark."""


# ----------------------------------------------------------------------------- the budget
def _plan(*args) -> tuple[dict, dict]:
    p = subprocess.run(
        ["bash", str(SCRIPT), "--print-plan", *args], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0, p.stdout + p.stderr
    caps, meta = {}, {}
    for line in p.stdout.splitlines():
        f = line.split("\t")
        if f[0] == "cap":
            caps[f[1]] = int(f[2])
        elif f[0] in ("sum", "budget", "reserve"):
            meta[f[0]] = int(f[1])
    return caps, meta


@needs_bash
@pytest.mark.parametrize(
    "args", [(), ("--install",), ("--dry-run",), ("--dry-run", "--install"), ("--budget-s", "200")]
)
def test_step_caps_add_up_to_less_than_the_budget(args):
    caps, meta = _plan(*args)
    assert sum(caps.values()) == meta["sum"] <= meta["budget"] - meta["reserve"], (caps, meta)
    assert all(c > 0 for c in caps.values()), caps


@needs_bash
def test_default_gpu_budget_and_install_on_top():
    caps, meta = _plan()
    assert meta["budget"] == 465 and "install" not in caps
    assert {"env", "calibrate", "data_synth", "heads_fp32", "e2e", "capacity", "annotate"} <= set(caps)
    caps_i, meta_i = _plan("--install")
    assert meta_i["budget"] == 465 + caps_i["install"]
    assert {k: v for k, v in caps_i.items() if k != "install"} == caps  # the others keep their caps
    small, meta_s = _plan("--budget-s", "200")
    assert meta_s["sum"] <= 185 and all(small[k] <= caps[k] for k in caps)


@needs_bash
def test_every_step_the_script_runs_has_a_cap():
    text = SCRIPT.read_text()
    names = set(re.findall(r"^\s*(?:\[.*\] && )?(?:step|heads_run)\s+([a-z][a-z0-9_]*)\s", text, re.M))
    assert {"env", "heads_fp32", "e2e", "annotate"} <= names
    # steps run only when planned (a classifier.py flag that may come later): `[ -n "${CAP[x]:-}" ] && ...`
    guarded = set(re.findall(r"\$\{CAP\[([a-z0-9_]+)\]:-\}", text))
    planned = set()
    for args in (("--install",), ("--dry-run", "--install")):
        planned |= set(_plan(*args)[0])
    assert names - guarded <= planned, names - guarded - planned


# ----------------------------------------------------------------------------- JSON kept by a cut step
def test_capacity_json_is_written_after_every_trial(tmp_path, monkeypatch):
    tt = _bench("train_throughput")
    out = tmp_path / "capacity.json"
    a = tt.parse(
        ["--mode", "capacity", "--smoke", "--device", "cpu", "--heads", "sphereface2", "--out", str(out)]
    )
    tried = []

    def trial(name, K, a_, device):
        if len(tried) == 2:
            raise Cut
        tried.append(K)
        return dict(head=name, K=K, fits=True, peak_bytes=8 * K, peak_kind="cpu_state_bytes")

    monkeypatch.setattr(tt, "_try_capacity", trial)
    with pytest.raises(Cut):
        tt.run_capacity(a)
    (run,) = json.loads(out.read_text())["runs"]
    (rec,) = run["results"]
    assert [t["K"] for t in rec["trials"]] == tried == [256, 512]
    assert rec["max_k_measured"] == 512 and run["complete"] is False
    assert not list(tmp_path.glob(".*tmp*"))  # the temp file was renamed into place


def test_train_throughput_json_is_written_after_every_configuration(tmp_path, monkeypatch):
    tt = _bench("train_throughput")
    out = tmp_path / "tt.json"
    a = tt.parse(["--smoke", "--device", "cpu", "--sources", "synthetic", "torch", "--out", str(out)])
    done = []

    def config(rank, world, head, source, a_, device, timer):
        if len(done) == 3:
            raise Cut
        done.append((head, source))
        return dict(head=head, source=source, skipped="stand-in")

    monkeypatch.setattr(tt, "run_config", config)
    with pytest.raises(Cut):
        tt.run_all(0, 1, a)
    (run,) = json.loads(out.read_text())["runs"]
    assert [(r["head"], r["source"]) for r in run["results"]] == done and len(done) == 3
    assert run["complete"] is False


def _classifier_result(cfg: dict, comm_kinds) -> dict:
    wire = {k: dict(calls=1, bytes=4, wire_bytes=4) for k in comm_kinds}
    return dict(
        head=cfg["head_name"], num_classes=cfg["K"], world_size=1, batch_per_rank=cfg["batch"],
        dim=cfg["dim"], chunk=None, head_options={}, step_time_s=0.01, gemm3_time_s=0.005,
        ratio_to_gemm3=2.0, peak_step_bytes=1024, comm_per_step=wire, images_per_s=100.0,
    )  # fmt: skip


def test_classifier_json_is_written_after_every_point(tmp_path, monkeypatch):
    from fr_dist import comm

    cl = _bench("classifier")
    out = tmp_path / "classifier.json"
    done = []

    def spawn(fn, world, threads=1, **cfg):
        if len(done) == 1:
            raise Cut
        done.append(cfg["K"])
        return [_classifier_result(cfg, comm.KINDS)]

    monkeypatch.setattr(cl, "spawn", spawn)
    argv = [
        "--world-sizes",
        "1",
        "--heads",
        "sphereface2",
        "--num-classes",
        "1000",
        "2000",
        "--out",
        str(out),
    ]
    with pytest.raises(Cut):
        cl.main(argv)
    rep = json.loads(out.read_text())
    assert [r["num_classes"] for r in rep["results"]] == done == [1000]
    assert rep["complete"] is False and not out.with_suffix(".png").exists()  # plotted only at the end


# ----------------------------------------------------------------------------- calibration and the planner
def _fake_calibration() -> dict:
    return dict(
        device="NVIDIA H100 80GB HBM3",
        torch="2.x",
        base_profile="h100-80gb",
        measured=dict(
            gemm_head_tflops=dict(fp32=50.0, bf16=600.0),
            copy_gbps=dict(gbps=2900.0),
            launch_overhead_s=4e-6,
            memory_after=dict(outside_allocator_bytes=600 << 20, total_bytes=80 * GiB),
        ),
    )


def test_calibrated_profile_overrides_and_yaml():
    from fr_dist import plan as P

    gc = _bench("gpu_calibrate")
    assert (
        gc.base_profile("NVIDIA H200") == "h200-141gb" and gc.base_profile("NVIDIA H100 PCIe") == "h100-80gb"
    )
    rec = _fake_calibration()
    over = gc.profile_overrides(rec)
    base = P.load_hardware("h100-80gb")
    hw = dataclasses.replace(base, **over)
    assert hw.tflops["bf16"] == 600.0 and hw.gemm_efficiency == 1.0 and hw.op_overhead_s == 4e-6
    assert hw.elementwise_efficiency == pytest.approx(2900.0 / base.hbm_gbps)
    assert hw.overhead_bytes == 600 << 20 and hw.memory_bytes == 80 * GiB
    # the backbone's bf16 term is unchanged (the backbone is not measured by calibrate)
    assert hw.tflops["bf16"] * hw.conv_efficiency == pytest.approx(base.tflops["bf16"] * base.conv_efficiency)
    pytest.importorskip("yaml")
    rec["profile_overrides"] = over
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"hw_cal_{os.getpid()}.yaml"
    path.write_text(gc._profile_yaml(rec))
    try:
        loaded = P.load_hardware(str(path))
    finally:
        path.unlink()
    assert loaded.tflops == pytest.approx(hw.tflops) and loaded.overhead_bytes == hw.overhead_bytes
    assert loaded.op_overhead_s == pytest.approx(hw.op_overhead_s)


def test_annotate_puts_the_planner_beside_every_measurement(tmp_path):
    gc = _bench("gpu_calibrate")
    cal = _fake_calibration()
    cal["profile_overrides"] = gc.profile_overrides(cal)
    (tmp_path / "calibrate.json").write_text(json.dumps(cal))
    mem = dict(max_allocated_bytes=6 * GiB, max_reserved_bytes=7 * GiB, free_bytes=70 * GiB)
    res = [
        dict(head="sphereface2", num_classes=1_000_000, dim=512, world_size=1, batch_per_rank=128,
             head_options={}, chunk=None, step_time_s=0.004, gemm3_time_s=0.002, cuda_memory=mem),
        dict(head="partial_fc", num_classes=1_000_000, dim=512, world_size=1, batch_per_rank=128,
             sample_rate=1.0, chunk=None, head_options={}, step_time_s=0.005, cuda_memory=mem),
    ]  # fmt: skip
    (tmp_path / "classifier_fp32.json").write_text(json.dumps(dict(results=res)))
    e2e = dict(
        head="sphereface2", source="synthetic", num_classes=1_000_000, batch_per_rank=128, world_size=1,
        head_kwargs=dict(fused_update=False, proxy_dtype="fp32", kernel="auto"), free=dict(step_s=0.1),
        timed=dict(phase_s=dict(data=0.0, backbone=0.08, head=0.01, comm=0.0, sync=0.0)), cuda_memory=mem,
    )  # fmt: skip
    args = dict(backbone="iresnet50", embedding_size=512, amp="bf16", head_dtype="fp32", backbone_kwargs={})
    (tmp_path / "train_throughput.json").write_text(json.dumps(dict(runs=[dict(args=args, results=[e2e])])))
    K = 16_000_000
    cap = dict(
        head="sphereface2", head_kwargs=dict(proxy_dtype="bf16", fused_update=True), max_k_measured=K,
        trials=[dict(K=K, fits=True, peak_bytes=40 * GiB, peak_kind="cuda_max_allocated"),
                dict(K=2 * K, fits=False)],
    )  # fmt: skip
    cap_args = dict(embedding_size=512, batch=128, head_dtype="fp32")
    (tmp_path / "capacity.json").write_text(json.dumps(dict(runs=[dict(args=cap_args, results=[cap])])))

    report = gc.annotate(tmp_path)
    assert report["profiles"] == ["h100-80gb", "calibrated"]
    kinds = [r["kind"] for r in report["rows"]]
    assert kinds == ["classifier", "classifier", "e2e", "capacity"]
    for row in report["rows"]:
        for label in report["profiles"]:
            pred = row["planner"][label]
            assert "error" not in pred, pred
            if row["measured"].get("step_s"):
                assert pred["step_ratio"] == pytest.approx(pred["step_s"] / row["measured"]["step_s"])
            assert pred["memory_ratio"] == pytest.approx(
                pred["memory_without_overhead_bytes"] / row["measured"]["peak_allocated_bytes"]
            )
    sf2 = report["rows"][0]["planner"]
    assert sf2["calibrated"]["step_s"] != sf2["h100-80gb"]["step_s"]  # the measured rates are used
    e2e_pred = report["rows"][2]["planner"]["calibrated"]
    assert e2e_pred["backbone_s"] > 0 and e2e_pred["implied_conv_efficiency"] > 0
    cap_pred = report["rows"][3]["planner"]["h100-80gb"]
    assert cap_pred["memory"]["proxies"] == K * 512 * 2  # bf16 proxies: the head options were read
    assert cap_pred["memory"]["proxy_grad"] == 0 and cap_pred["max_identities"] > 0  # fused update
    assert report["medians"]["calibrated classifier"]["points"] == 2
    assert (tmp_path / "plan_vs_measured_gpu.md").read_text().count("| classifier |") == 2


# ----------------------------------------------------------------------------- dry run with only torch + numpy
# (step, the module it runs, the JSON it writes)
STEP_ENTRY = [
    ("calibrate", "benchmarks.gpu_calibrate", "calibrate.json"),
    ("heads_fp32", "benchmarks.classifier", "classifier_fp32.json"),
    ("heads_sf2_fused_eager", "benchmarks.classifier", "classifier_sf2_fused_eager.json"),
    ("e2e", "benchmarks.train_throughput", "train_throughput.json"),
    ("capacity", "benchmarks.train_throughput", "capacity.json"),
    ("capacity_sf2_best", "benchmarks.train_throughput", "capacity.json"),
    ("annotate", "fr_dist.plan", "plan_vs_measured_gpu.json"),
]


@pytest.fixture(scope="session")
def torch_only_python(tmp_path_factory) -> str:
    """A fresh venv with torch (the CPU wheel) and numpy only: no yaml, cv2, simplejpeg, DALI, triton."""
    import torch

    version = torch.__version__.split("+")[0]
    venv = tmp_path_factory.mktemp("torch_only_venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = str(venv / "bin" / "python")
    p = subprocess.run(
        [py, "-m", "pip", "install", "-q", f"torch=={version}", "numpy"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if p.returncode != 0:
        pytest.skip(f"could not install torch=={version} into a fresh venv: {p.stderr[-500:]}")
    return py


@needs_bash
@pytest.mark.dist
@pytest.mark.slow
def test_dry_run_with_only_torch_and_numpy(torch_only_python, tmp_path):
    if shutil.which("timeout") is None:
        pytest.skip("coreutils timeout not found")
    out = tmp_path / "gpu_check"
    env = dict(os.environ, PYTHON=torch_only_python, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    p = subprocess.run(
        [
            "bash",
            str(SCRIPT),
            "--dry-run",
            "--install",
            "--out",
            str(out),
            "--data-dir",
            str(tmp_path / "data"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert not [s for s, st in status.items() if st in ("failed", "timeout")], status
    assert status["install"] == status["env"] == "ok", status
    # the steps whose modules are missing are skipped with the reason, not failed
    assert status["data_synth"].startswith("skipped: cv2 not importable"), status
    assert "yaml not importable" in status["train_bf16"] and "no synthetic data" in status["train_bf16"]
    assert "nvidia.dali not importable" in status["dali"]
    env_json = json.loads((out / "env.json").read_text())
    assert env_json["have"]["cv2"] is False and env_json["have"]["yaml"] is False
    # each benchmark runs where its script imports with torch + numpy alone, and is skipped naming what
    # its import lacks where it does not (e.g. a dependency fr_dist itself added: then the device needs it)
    entry = env_json["entry_modules"]
    ran = []
    for name, module, result in STEP_ENTRY:
        if entry[module]:
            assert status[name] == "ok", (name, status)
            assert json.loads((out / result).read_text()), result
            ran.append(name)
        else:
            error = env_json["import_errors"][module]
            assert status[name] == f"skipped: {module} not importable ({error})", (name, status)
    # the measurements need torch alone; the planner (fr_dist's dependencies: pydantic, ...) may be absent
    assert "calibrate" in ran, (ran, env_json["import_errors"])
    # --install pins the torch that is there and asks pip to fail fast
    cons = (out / "pip_constraints.txt").read_text()
    assert re.search(r"^torch==\d", cons, re.M), cons
    install_log = (out / "logs" / "install.log").read_text()
    assert "--retries 0" in install_log and "-c " in install_log and "pyyaml" in install_log
    if "e2e" in ran:
        (run,) = json.loads((out / "train_throughput.json").read_text())["runs"]
        assert {r["source"] for r in run["results"]} == {"synthetic"}  # no RecordIO set without cv2
    budget = summary["budget"]
    assert budget["caps_sum_s"] <= budget["budget_s"] - budget["reserve_s"]
    assert "--device cuda" in p.stdout and "train.amp=fp16" in p.stdout  # the GPU commands are shown
