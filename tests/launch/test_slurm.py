"""A real Slurm cluster (slurmctld + two slurmd in network namespaces, Debian's slurm-wlm):
the shipped launch/slurm/train.sbatch, submitted through launch/slurm/submit.sh, trains on 2
nodes; a preemption warning (USR1 to the batch shell) makes the ranks checkpoint, the job
requeues itself, resumes, and ends with the losses of an uninterrupted run; the same warning after
the run had finished ends the job COMPLETED without a requeue. submit.sh refuses requests the
partition cannot satisfy. Root + slurm-wlm + munge only; skipped elsewhere."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch_util import REPO, demo_overrides, losses
from slurm_cluster import SlurmCluster, slurm_unavailable

pytestmark = [pytest.mark.slow, pytest.mark.dist]

_WHY = slurm_unavailable()
needs_slurm = pytest.mark.skipif(_WHY is not None, reason=f"Slurm test cluster: {_WHY}")
SUBMIT = str(REPO / "launch" / "slurm" / "submit.sh")
STEPS = 60


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield c
    finally:
        c.close()


def _clean_env(c: SlurmCluster, **kw) -> dict:
    env = c.env(PYTHON=sys.executable, OMP_NUM_THREADS=1, FR_DIST_ROOT=REPO, **kw)
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        env.pop(k, None)
    return env


def _wait(cond, timeout_s: float, what: str, dump=lambda: ""):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}\n{dump()}")


def _wait_nodes_idle(c: SlurmCluster, what: str, dump=lambda: "", settle_s: float = 3.0) -> None:
    """Until every node is idle (the previous allocation released), then ``settle_s`` more: slurmd
    revokes a finished job's credential with seconds resolution (see the requeue test)."""

    def idle():
        states = c.cmd(["sinfo", "-h", "-o", "%t"], check=False).stdout.split()
        return bool(states) and all(s.startswith("idle") for s in states)

    _wait(idle, 60, what, dump)
    time.sleep(settle_s)


def _lingering_python(path: Path, release: Path, term: str) -> Path:
    """A PYTHON for the job whose node tasks outlive the run: ``-m fr_dist.launch`` runs as usual
    (and writes its status file), then the task stays alive, so srun has not returned, until
    ``release`` exists (at most 120 s). A SIGTERM in that window (the trap's step signal) is, with
    ``term="ignored"``, logged and ignored (the launcher it was meant for is gone), with
    ``term="fatal"`` fatal (a launcher that reported finished but is still exiting dies of it:
    exit 143). Anything else (the doctor) is exec'ed."""
    trap = {
        "ignored": """trap 'echo "python hook: SIGTERM on $(hostname) after the launcher exited" >&2' TERM""",
        "fatal": "trap - TERM",
    }[term]
    path.write_text(
        f"""#!/bin/bash
if [[ "${{1:-}} ${{2:-}}" != "-m fr_dist.launch" ]]; then exec {shlex.quote(sys.executable)} "$@"; fi
{shlex.quote(sys.executable)} "$@"
code=$?
{trap}
echo "python hook: launcher on $(hostname) exited $code; holding the node task" >&2
end=$((SECONDS + 120))
while [[ ! -e {shlex.quote(str(release))} && $SECONDS -lt $end ]]; do sleep 0.2; done
exit "$code"
"""
    )
    path.chmod(0o755)
    return path


@needs_slurm
def test_submit_refuses_impossible_requests(cluster, launch_data, tmp_path):
    args = [SUBMIT, "train", *demo_overrides(launch_data, tmp_path / "x")]
    r = cluster.cmd(args, check=False, env=_clean_env(cluster, CPUS_PER_TASK=64, DRY_RUN=1))
    assert r.returncode == 2 and "Reason=PartitionConfig" in r.stderr and "CPUS_PER_TASK<=2" in r.stderr, (
        r.stderr
    )
    r = cluster.cmd(args, check=False, env=_clean_env(cluster, GPUS_PER_NODE=8, DRY_RUN=1))
    assert r.returncode == 2 and "has no GPUs" in r.stderr, r.stderr
    r = cluster.cmd(args, check=False, env=_clean_env(cluster, NODES=3, DRY_RUN=1))
    assert r.returncode == 2 and "has 2 node(s)" in r.stderr, r.stderr
    r = cluster.cmd(args, check=False, env=_clean_env(cluster, NODES=2, DRY_RUN=1))
    assert r.returncode == 0 and "--cpus-per-task=2" in r.stdout and "--gpus" not in r.stdout, (
        r.stdout + r.stderr
    )
    assert "2 node(s) x 1 CPU rank(s)" in r.stderr


@needs_slurm
def test_sbatch_preempt_requeue_resume_equals_uninterrupted(cluster, launch_data, tmp_path):
    ref = tmp_path / "ref"
    r = subprocess.run(
        [str(REPO / "launch" / "torchrun_single.sh"), "2", *demo_overrides(launch_data, ref, steps=STEPS)],
        env=_clean_env(cluster),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    out = tmp_path / "run"
    log = tmp_path / "slurm-job.out"
    env = _clean_env(
        cluster, PARTITION="cpu", NODES=2, CPUS_PER_TASK=1, RDZV_TIMEOUT=60, SBATCH_ARGS=f"--output={log}"
    )
    r = cluster.cmd([SUBMIT, "train", *demo_overrides(launch_data, out, steps=STEPS)], env=env, cwd=REPO)
    job = re.search(r"Submitted batch job (\d+)", r.stdout).group(1)

    def dump():
        return (
            (log.read_text(errors="replace")[-4000:] if log.exists() else "(no job log)")
            + "\n"
            + cluster.logs()
        )

    def step_reached():
        state = cluster.job(job).get("JobState")
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), f"job {job} is {state}\n{dump()}"
        try:
            return max(losses(out)) >= 6
        except (FileNotFoundError, ValueError):
            return False

    _wait(step_reached, 240, "the job to train 6 steps", dump)
    cluster.cmd(["scancel", "--signal=USR1", "--batch", job])
    _wait(lambda: "requeueing job" in log.read_text(errors="replace"), 120, "the trap to requeue", dump)

    # Slurm holds a requeued job for 120 s (Reason=BeginTime): start it now to keep CI short
    def requeued():
        info = cluster.job(job)
        return int(info.get("Restarts", 0)) >= 1 and info.get("JobState") in (
            "PENDING",
            "RUNNING",
            "COMPLETED",
        )

    _wait(requeued, 60, "the job to be requeued", dump)
    if cluster.job(job).get("JobState") == "PENDING":
        # Starting it in the same second as the requeue races slurmd's credential revocation
        # (seconds resolution): "Killing non-startable batch JobId=1: Job credential revoked".
        # Wait for the old allocation to be released on both nodes, then a little longer.
        _wait_nodes_idle(cluster, "the nodes to be idle after the requeue", dump)
        cluster.cmd(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=False)
    _wait(lambda: cluster.job(job).get("JobState") == "COMPLETED", 400, "the requeued job to complete", dump)

    text = log.read_text(errors="replace")
    info = cluster.job(job)
    assert int(info.get("Restarts", 0)) >= 1 and "(restart 1)" in text, text[-4000:]
    m = re.search(r"resumed from (\S+) at step (\d+)", text)
    assert m, text[-4000:]
    resumed_at = int(m.group(2))
    assert 6 <= resumed_at < STEPS and (out / "checkpoints" / str(resumed_at)).is_dir()
    assert "2 node(s) x 1 CPU rank(s)" in text
    res = json.loads((out / "results.json").read_text())
    ref_res = json.loads((ref / "results.json").read_text())
    assert res["step"] == STEPS and not res.get("preempted"), res
    assert res["loss"] == ref_res["loss"], (res["loss"], ref_res["loss"])
    assert losses(out) == losses(ref)
    os.environ.get("FR_DIST_KEEP_SLURM_LOG") and print(text)


@needs_slurm
@pytest.mark.parametrize("term", ["ignored", "fatal"])
def test_sbatch_stop_after_finished_run_does_not_requeue(cluster, launch_data, tmp_path, term):
    """USR1 (time limit / preemption warning) that reaches the batch shell after every launcher
    reported ``finished`` but before srun returned: the trap still signals the step, yet the job
    must end COMPLETED with exit 0 and not be requeued (a requeue would rerun a finished run).
    ``term``: the node tasks ignore the trap's SIGTERM (srun exits 0), or die of it (srun exits
    143: a launcher caught while exiting after it wrote ``finished``)."""
    steps = 4
    out = tmp_path / "run"
    log = tmp_path / "slurm-job.out"
    status_dir = tmp_path / "launch_status"
    release = tmp_path / "release"
    env = _clean_env(
        cluster,
        PARTITION="cpu",
        NODES=2,
        CPUS_PER_TASK=1,
        RDZV_TIMEOUT=60,
        SBATCH_ARGS=f"--output={log}",
        FR_DIST_LAUNCH_STATUS_DIR=status_dir,
    )
    env["PYTHON"] = str(_lingering_python(tmp_path / "python", release, term))

    def dump():
        return (
            (log.read_text(errors="replace")[-4000:] if log.exists() else "(no job log)")
            + f"\nstatus files: {_statuses(status_dir)}\n"
            + cluster.logs()
        )

    _wait_nodes_idle(cluster, "the nodes to be idle before the job", dump)
    r = cluster.cmd([SUBMIT, "train", *demo_overrides(launch_data, out, steps=steps)], env=env, cwd=REPO)
    job = re.search(r"Submitted batch job (\d+)", r.stdout).group(1)

    def finished_on_both_nodes():
        state = cluster.job(job).get("JobState")
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), f"job {job} is {state}\n{dump()}"
        st = _statuses(status_dir)
        assert set(st.values()) <= {"finished"}, f"launcher status {st}\n{dump()}"
        return len(st) == 2

    try:
        _wait(finished_on_both_nodes, 240, "both launchers to report finished", dump)
        # both launchers have exited and the hook holds each node's task: srun is still running
        _wait(
            lambda: log.read_text(errors="replace").count("holding the node task") == 2,
            60,
            "both node tasks to be held after their launcher exited",
            dump,
        )
        text = log.read_text(errors="replace")
        assert "srun finished" not in text and cluster.job(job).get("JobState") == "RUNNING", dump()
        cluster.cmd(["scancel", "--signal=USR1", "--batch", job])
        if term == "ignored":  # the trap ran and signalled the step, whose tasks were still alive
            _wait(
                lambda: log.read_text(errors="replace").count("python hook: SIGTERM") == 2,
                60,
                "the trap's SIGTERM to reach both node tasks",
                dump,
            )
    finally:
        release.touch()

    def ended():
        info = cluster.job(job)
        return (
            info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED") or int(info.get("Restarts", 0)) > 0
        )

    _wait(ended, 120, "the job to end", dump)
    info = cluster.job(job)
    text = log.read_text(errors="replace")
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", (info, dump())
    assert int(info.get("Restarts", -1)) == 0, (info, dump())
    assert "SIGUSR1: time limit / preemption ahead" in text, dump()
    assert f"the run finished before the stop took effect: not requeueing job {job}" in text, dump()
    srun_code = {"ignored": 0, "fatal": 143}[term]
    assert f"srun finished with exit code {srun_code}" in text, dump()
    assert f"requeueing job {job} (" not in text, dump()
    assert text.count(f"job {job} (restart 0)") == 1 and "(restart 1)" not in text, dump()
    res = json.loads((out / "results.json").read_text())
    assert res["step"] == steps and not res.get("preempted"), res
    assert max(losses(out)) == steps
    assert not status_dir.exists()  # the batch script cleans its status directory up


def _statuses(d: Path) -> dict[str, str]:
    """Launcher status files (fr_dist.launch, FR_DIST_LAUNCH_STATUS_DIR): name -> word."""
    res = {}
    for p in sorted(d.glob("*")) if d.is_dir() else []:
        try:
            word = p.read_text().strip()
        except OSError:
            continue
        if word:  # empty: being written
            res[p.name] = word
    return res


@needs_slurm
def test_bench_sbatch_runs_w1_once_in_two_node_allocation(cluster, tmp_path):
    log = tmp_path / "bench.out"
    env = _clean_env(
        cluster,
        PARTITION="cpu",
        NODES=2,
        CPUS_PER_TASK=1,
        SBATCH_ARGS=f"--output={log}",
        RESULTS_ROOT=tmp_path / "results",
        WORLD_SIZES="1 2",
        HEADS="sphereface2",
        NUM_CLASSES="1000",
        BATCH=8,
        DIM=32,
        STEPS=2,
        WARMUP=1,
    )
    r = cluster.cmd([SUBMIT, "bench"], env=env, cwd=REPO)
    job = re.search(r"Submitted batch job (\d+)", r.stdout).group(1)
    dump = lambda: log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"  # noqa: E731
    _wait(
        lambda: cluster.job(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 300, "bench", dump
    )
    text = log.read_text(errors="replace")
    assert cluster.job(job)["JobState"] == "COMPLETED", text[-4000:]
    dirs = list((tmp_path / "results").iterdir())
    assert len(dirs) == 1 and dirs[0].name.startswith("cpu") and "x1_" in dirs[0].name, dirs
    assert {p.name for p in dirs[0].glob("*.json")} == {
        "classifier_W1_sphereface2.json",
        "classifier_W2_sphereface2.json",
    }
    assert "2 node(s) x 1 CPU rank(s)" in text and "W=1 (1 node(s) x 1)" in text, text[-3000:]
    w1 = json.loads((dirs[0] / "classifier_W1_sphereface2.json").read_text())
    print(json.dumps(w1)[:600])
