"""``python -m fr_dist.launch``: torchrun that exits 0 after a graceful stop, non-zero otherwise.

SIGTERM goes to the launcher process only (as a scheduler or ``kill <pid>`` does); torchrun's agent
forwards it to the 2 ranks, which run DataLoader workers (``data.num_workers=1``); the ranks
checkpoint at the next log step and leave their stop markers; the launcher exits 0 and says so.
Plain torchrun exits 1 in the same situation (torch's agent re-raises the signal).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_faults import PY, REPO, _cli_args, _env, _free_port, _wait_for_steps  # noqa: E402


def _launch(args: list[str], log: Path, **env) -> subprocess.Popen:
    cmd = [PY, "-m", "fr_dist.launch", "--standalone", "--nproc-per-node=2", "--monitor-interval=0.2"]
    cmd += ["-m", "fr_dist.cli"] + args
    fh = open(log, "w")  # noqa: SIM115
    return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_env(**env), cwd=REPO)


def _stop(p: subprocess.Popen) -> None:
    """Kill a launcher that is still running, and its ranks (by pid), so a failing test leaves nothing."""
    if p.poll() is not None:
        return
    try:
        import psutil

        for c in psutil.Process(p.pid).children(recursive=True):
            c.kill()
    except Exception:  # noqa: BLE001 - best effort; the launcher itself is killed below
        pass
    p.kill()
    p.wait()


def test_markers_decide_graceful(tmp_path):
    from fr_dist.launch import _graceful, read_stop_markers, write_stop_marker
    from fr_dist.runtime import DistEnv

    os.environ["FR_DIST_STOP_MARKER_DIR"] = str(tmp_path)
    try:
        write_stop_marker(DistEnv(rank=2, world_size=4, local_rank=0), dict(step=6, signal="SIGTERM"))
        assert not _graceful(read_stop_markers(tmp_path), 2)  # local rank 1 missing
        write_stop_marker(DistEnv(rank=3, world_size=4, local_rank=1), dict(step=6, signal="SIGTERM"))
        markers = read_stop_markers(tmp_path)
        assert _graceful(markers, 2) and {m["rank"] for m in markers} == {2, 3}
    finally:
        del os.environ["FR_DIST_STOP_MARKER_DIR"]
    # markers of an older attempt do not count for the last one
    (tmp_path / "rank2.json").write_text(json.dumps(dict(rank=2, local_rank=0, attempt=1, step=8)))
    assert not _graceful(read_stop_markers(tmp_path), 2)


@pytest.mark.dist
@pytest.mark.parametrize("agent_store", [False, True], ids=["env", "agent-store"])
def test_failed_startup_is_a_rendezvous_error_naming_address_and_key(tiny_data, tmp_path, agent_store):
    """Nobody listens at MASTER_ADDR:PORT: one line naming the address and dist.rendezvous_timeout_s,
    not a CollectiveTimeout of a collective that never ran."""
    port = _free_port()
    env = dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if agent_store:
        env.update(TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT="2")
    args = _cli_args(tiny_data, tmp_path / "o", **{"dist.rendezvous_timeout_s": 3, "data.num_workers": 0})
    r = subprocess.run(
        [PY, "-m", "fr_dist.cli"] + args,
        env=_env(**env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1, r.stderr[-3000:]
    want = f"fr_dist: RendezvousError: rank 1/2: could not join the process group at 127.0.0.1:{port} "
    assert want + "within dist.rendezvous_timeout_s=3 s" in r.stderr, r.stderr[-3000:]
    assert "CollectiveTimeout" not in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]


def test_attempt_prefix():
    from fr_dist.runtime import attempt_prefix

    assert attempt_prefix({"TORCHELASTIC_RESTART_COUNT": "3"}) is None  # no agent store
    env = {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "3", "WORLD_SIZE": "4"}
    assert attempt_prefix(env) == "fr_dist/attempt3/w4"
    assert attempt_prefix(dict(env, TORCHELASTIC_RESTART_COUNT="4")) != attempt_prefix(env)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_sigterm_to_launcher_with_workers_checkpoints_and_exits_0(tiny_data, tmp_path, sig):
    out = tmp_path / "run"
    status = tmp_path / "status"
    p = _launch(_cli_args(tiny_data, out), tmp_path / "log.txt", FR_DIST_LAUNCH_STATUS_DIR=str(status))
    try:
        _wait_for_steps(out, 2, [p])
        p.send_signal(sig)  # the launcher only, not the ranks
        rc = p.wait(timeout=120)
    finally:
        _stop(p)
    text = (tmp_path / "log.txt").read_text()
    print(f"launcher exit code after {sig.name}: {rc}")
    assert f"stopped by signal {sig.name}, checkpoint at step" in text, text[-3000:]
    step = int(text.split("checkpoint at step ")[1].split()[0])
    assert (out / "checkpoints" / str(step) / "meta.json").is_file()
    assert f"fr_dist.launch: stopped gracefully by {sig.name} at step {step}, checkpoint" in text, text[
        -3000:
    ]
    assert "is killed by signal" not in text, text[-3000:]
    assert rc == 0, text[-3000:]
    assert [f.read_text().strip() for f in status.iterdir()] == ["stopped"]


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_launcher_finished_run_and_failed_run(tiny_data, tmp_path):
    psutil = pytest.importorskip("psutil", reason="psutil finds the launcher's rank processes")
    # a run that finishes: exit 0, status "finished"
    status = tmp_path / "status"
    p = _launch(
        _cli_args(tiny_data, tmp_path / "ok", **{"train.max_steps": 4}),
        tmp_path / "ok.txt",
        FR_DIST_LAUNCH_STATUS_DIR=str(status),
    )
    assert p.wait(timeout=300) == 0, (tmp_path / "ok.txt").read_text()[-3000:]
    assert [f.read_text().strip() for f in status.iterdir()] == ["finished"]
    # SIGKILL of a rank (no marker): the launcher exits non-zero like torchrun
    status2 = tmp_path / "status2"
    out = tmp_path / "killed"
    p = _launch(_cli_args(tiny_data, out), tmp_path / "killed.txt", FR_DIST_LAUNCH_STATUS_DIR=str(status2))
    try:
        _wait_for_steps(out, 2, [p])
        ranks = [c for c in psutil.Process(p.pid).children() if "fr_dist.cli" in " ".join(c.cmdline())]
        assert ranks
        ranks[0].kill()
        rc = p.wait(timeout=200)
    finally:
        _stop(p)
    assert rc != 0, (tmp_path / "killed.txt").read_text()[-3000:]
    assert [f.read_text().strip() for f in status2.iterdir()] == ["failed"]
