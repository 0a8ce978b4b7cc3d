"""Automatic restarts under ``torchrun --max-restarts``: SIGKILL a rank 10 times in one job.

One ``torchrun --standalone --nproc_per_node=2 --max-restarts=10`` job trains with frequent
checkpoints and ``checkpoint.resume=auto``; a watcher SIGKILLs one rank (alternately rank 1 and
rank 0) each time the current attempt has written a new checkpoint. torchrun restarts the group,
every new attempt resumes from the newest verified checkpoint, and the final state (loss in
results.json, final checkpoint tensors) must equal an uninterrupted run bit for bit.

Two variants: ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` exported to torchrun (the launch scripts do
the same; rank 0 of each attempt hosts a fresh process-group store), 10 kills; and torchrun's
default, where the workers use the agent's rendezvous store, which outlives a restart: without
fr_dist's per-attempt key prefix (``runtime.attempt_prefix``) a new attempt read the previous
attempt's gloo addresses and failed with "connection refused" or hung in the set-up. 3 kills
(``FR_DIST_TEST_SHARED_STORE_KILLS=N`` for more).
Every wait is bounded (pytest-timeout, subprocess timeouts, dist.timeout_s / rendezvous_timeout_s),
so a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_faults import REPO, TORCHRUN, _cli_args, _env  # noqa: E402

KILLS = 10
STEPS = 60


TINY_DATA = dict(
    num_identities=12, images_per_identity=4, heldout_identities=4, heldout_pairs=8, seed=11
)  # the conftest's tiny_data fixture


def _args(data: Path, out: Path, **extra) -> list[str]:
    base = {
        "data.num_workers": 0,
        "train.max_steps": STEPS,
        "train.log_every": 1,
        "train.momentum": 0.9,
        "checkpoint.every": 2,
        "checkpoint.keep": 3,
        "checkpoint.resume": "auto",
        "checkpoint.save_at_end": "true",
        "dist.timeout_s": 60,
        "dist.rendezvous_timeout_s": 60,
    }
    base.update(extra)
    return _cli_args(data, out, **base)


def _torchrun(args: list[str], log: Path, restarts: int, **env) -> subprocess.Popen:
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", f"--max-restarts={restarts}"]
    cmd += ["--monitor-interval=0.2", "-m", "fr_dist.cli"] + args
    fh = open(log, "w")  # noqa: SIM115
    return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_env(**env), cwd=REPO)


def _ranks(torchrun_pid: int) -> dict[int, int]:
    """{rank: pid} of the live worker processes torchrun started (read from their environment)."""
    import psutil

    out = {}
    try:
        children = psutil.Process(torchrun_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return out
    for c in children:
        try:
            if "fr_dist.cli" not in " ".join(c.cmdline()) or c.status() == psutil.STATUS_ZOMBIE:
                continue
            rank = c.environ().get("RANK")
        except psutil.Error:
            continue
        if rank is not None:
            out[int(rank)] = c.pid
    return out


def _newest_step(out: Path) -> tuple[int, float]:
    """(step, mtime of meta.json) of the newest complete checkpoint, (-1, 0) if none."""
    root = out / "checkpoints"
    best = (-1, 0.0)
    if root.is_dir():
        for p in root.iterdir():
            m = p / "meta.json"
            if p.name.isdigit() and int(p.name) > best[0]:
                try:
                    best = (int(p.name), m.stat().st_mtime)
                except FileNotFoundError:
                    continue
    return best


def _kill_ranks_repeatedly(p: subprocess.Popen, out: Path, kills: int, deadline: float) -> list[dict]:
    """Each time the current attempt has written a new checkpoint, SIGKILL one of its ranks."""
    done: list[dict] = []
    dead: set[int] = set()  # pids of every attempt already killed
    last_step, last_kill = -1, 0.0
    while len(done) < kills and p.poll() is None and time.time() < deadline:
        ranks = _ranks(p.pid)
        step, mtime = _newest_step(out)
        fresh = len(ranks) == 2 and not (set(ranks.values()) & dead)
        if fresh and step > last_step and mtime > last_kill:
            victim = 1 - len(done) % 2  # rank 1, then rank 0, alternately
            try:
                os.kill(ranks[victim], signal.SIGKILL)
            except ProcessLookupError:
                continue
            dead |= set(ranks.values())
            last_step, last_kill = step, time.time()
            done.append(dict(rank=victim, pid=ranks[victim], after_checkpoint=step))
        time.sleep(0.05)
    return done


def _final_state(out: Path) -> dict:
    from fr_dist.train.checkpoint import latest_checkpoint, safe_load

    ck = latest_checkpoint(out)
    state = {f"backbone.{k}": v for k, v in safe_load(ck / "backbone.pt").items()}
    for f in sorted(ck.glob("head_rank*.pt")):
        state.update({f"{f.stem}.{k}": v for k, v in safe_load(f)["params"].items()})
    return dict(step=int(ck.name), state=state, results=json.loads((out / "results.json").read_text()))


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """The uninterrupted run (same command, no kills)."""
    if not Path(TORCHRUN).exists():
        pytest.skip("torchrun not found beside the interpreter")
    tmp = tmp_path_factory.mktemp("restarts_ref")
    ref = _torchrun(_args(tiny_data, tmp / "ref"), tmp / "ref.txt", 0)
    assert ref.wait(timeout=400) == 0, (tmp / "ref.txt").read_text()[-3000:]
    return _final_state(tmp / "ref")


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    "separate_store,kills",
    [(True, KILLS), (False, int(os.environ.get("FR_DIST_TEST_SHARED_STORE_KILLS", "3")))],
    ids=["separate-pg-store", "agent-store"],
)
def test_sigkill_a_rank_under_max_restarts_equals_uninterrupted(
    tiny_data, reference, tmp_path, separate_store, kills
):
    """``separate-pg-store``: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 exported (as the launch scripts do).
    ``agent-store``: torchrun's default, the workers share the agent's store; fr_dist's per-attempt
    key prefix (runtime.attempt_prefix) keeps a restart from reading the dead attempt's addresses.
    """
    pytest.importorskip("psutil", reason="psutil finds torchrun's worker processes")
    env = dict(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1") if separate_store else {}
    out = tmp_path / "killed"
    p = _torchrun(_args(tiny_data, out), tmp_path / "killed.txt", kills, **env)
    try:
        done = _kill_ranks_repeatedly(p, out, kills, time.time() + 500)
        rc = p.wait(timeout=400)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    text = (tmp_path / "killed.txt").read_text()
    resumed = [ln for ln in text.splitlines() if "resumed from" in ln]
    print(f"kills: {done}\nresumes: {len(resumed)}")
    assert len(done) == kills, (done, text[-4000:])
    assert rc == 0, text[-4000:]
    assert len(resumed) == kills, text[-4000:]  # every restart resumed from a checkpoint

    a, b = reference, _final_state(out)
    assert a["step"] == b["step"] == STEPS
    assert a["results"]["loss"] == b["results"]["loss"], (a["results"], b["results"])
    assert a["state"].keys() == b["state"].keys()
    for k, v in a["state"].items():
        torch.testing.assert_close(b["state"][k], v, rtol=0, atol=0, msg=k)  # bitwise
