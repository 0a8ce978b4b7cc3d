"""Elastic training and network faults on two hosts (network namespaces + veth, tests/launch/netns.py)
through launch/torchrun_multinode.sh, and the batch policy of a resume on another world size
(train.on_resize) on spawned gloo ranks.

* a node lost (its agent and worker SIGKILLed after a checkpoint): the other re-forms the group
  alone (NNODES=1:2), resumes with the classifier re-sharded 2 -> 1 and trains on; the node started
  again joins at the next restart (1 -> 2). The final model equals a run that made the same changes
  by stop-and-resume by hand; the time from the kill to the next trained step is printed;
* a node's agent that dies after the run finished does not hold the other for torch's 300 s exit
  barrier (EXIT_BARRIER_TIMEOUT);
* the veth link down for 30 s mid-run with dist.timeout_s=20: CollectiveTimeout naming the collective
  and the peer, torchrun restarts, the job resumes once the link is back with the uninterrupted run's
  losses; down for longer than the rendezvous timeout: non-zero exit naming the address, checkpoints
  intact.

The namespace tests need root and `ip netns` (skipped elsewhere); the policy tests run anywhere.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from launch_util import REPO, demo_overrides, losses
from netns import TwoNodes, netns_unavailable, wait_all

from fr_dist.testing import spawn_gloo
from fr_dist.train.resume import UNFUSED

pytestmark = [pytest.mark.dist]

_WHY = netns_unavailable()
needs_netns = pytest.mark.skipif(_WHY is not None, reason=f"network namespaces: {_WHY}")
PORT = 29400
SCRIPT = str(REPO / "launch" / "torchrun_multinode.sh")


# ----------------------------------------------------------------------------- in-process runs
def _train(rank, world, overrides, stop_at=None, load=None):
    """Build the trainer of ``overrides`` on this rank and fit (to ``stop_at``); or, with ``load``,
    only load that checkpoint. Returns the rank-0 prints, the model and the trainer's batch / LR."""
    from fr_dist.runtime import DistEnv
    from fr_dist.train.config_load import load_config
    from fr_dist.train.run import build_trainer

    path, overrides = (overrides[1], overrides[2:]) if overrides[0] == "--config" else (None, overrides)
    cfg = load_config(path, overrides)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        tr = build_trainer(cfg, DistEnv(rank=rank, world_size=world), torch.device("cpu"))
        if load is not None:
            tr.load_checkpoint(Path(load))
        else:
            tr.fit(stop_at=stop_at)
    return dict(
        printed=printed.getvalue(),
        backbone={k: v.detach().clone() for k, v in tr.bb.bare.state_dict().items()},
        head=tr.head.weight.detach().clone(),
        start=tr.head.class_start,
        step=tr.step,
        grad_accum=tr.cfg.train.grad_accum,
        lr=[g["lr"] for g in tr.bb.optimizer.param_groups],
        base_lrs=list(tr.sched_bb.base_lrs),
        head_base_lrs=list(tr.sched_head.base_lrs),
    )


def _run(world, overrides, stop_at=None, load=None):
    if world == 1:
        return [_train(0, 1, overrides, stop_at, load)]
    return spawn_gloo(_train, world, args=(overrides, stop_at, load), timeout_s=300)


def _resize_line(printed: str) -> str:
    lines = [x for x in printed.splitlines() if x.startswith("world size changed")]
    assert len(lines) == 1, printed
    return lines[0]


def _final_model(ckpt: Path, data: Path, tmp: Path) -> dict:
    """Backbone and full [K, D] classifier of checkpoint ``ckpt``, loaded on one rank."""
    r = _run(1, demo_overrides(data, tmp / "load"), load=ckpt)[0]
    return dict(backbone=r["backbone"], head=r["head"])


def _assert_same_model(a: dict, b: dict) -> None:
    """The re-shard tests' tolerance (tests/integration/test_trainer.py)."""
    for k, v in a["backbone"].items():
        torch.testing.assert_close(b["backbone"][k], v, rtol=1e-6, atol=1e-7, msg=k)
    torch.testing.assert_close(b["head"], a["head"], rtol=1e-6, atol=1e-7)


def test_on_resize_policies(launch_data, tmp_path):
    """W = 2 -> 1 -> 2 by hand: keep_per_rank_batch_scale_lr halves the peak LRs at W = 1 and puts them
    back at W = 2; keep_global_batch doubles grad_accum instead (an unfused head), and is refused
    with the fused head update, which cannot accumulate. One line on rank 0 says what changed."""
    out = tmp_path / "run"
    extra = {"checkpoint.every": 2, "checkpoint.keep": 0, "checkpoint.resume": "auto"}
    ov = demo_overrides(launch_data, out, steps=8, **extra)
    _run(2, ov, stop_at=2)
    one = _run(1, ov, stop_at=4)[0]
    line = _resize_line(one["printed"])
    # the launch data: 32 identities
    assert line.startswith("world size changed 2 -> 1: classifier re-sharded (rows 16/16 -> 32)"), line
    assert "global batch 16 -> 8" in line and "lr 0.1 -> 0.05" in line, line
    assert "train.on_resize=keep_per_rank_batch_scale_lr" in line, line
    assert one["base_lrs"][0] == pytest.approx(0.05) and one["head_base_lrs"][0] == pytest.approx(0.05)
    assert one["grad_accum"] == 1
    two = _run(2, ov)
    line = _resize_line(two[0]["printed"])
    assert line.startswith("world size changed 1 -> 2: classifier re-sharded (rows 32 -> 16/16)"), line
    assert "global batch 8 -> 16" in line and "lr 0.05 -> 0.1" in line, line
    assert two[0]["base_lrs"][0] == pytest.approx(0.1) and two[0]["step"] == 8
    # a resume at the same world size: nothing announced, the LR as saved (exact resume)
    ckpt6 = out / "checkpoints" / "6"
    same = _run(1, ov + [f"output_dir={tmp_path / 'same'}", f"checkpoint.resume={out / 'checkpoints' / '4'}"])
    assert "world size changed" not in same[0]["printed"]

    # keep_global_batch: grad_accum 1 -> 2 at W = 1 (unfused head), the LR kept
    unfused = [f"head.sphereface2.{k}={v}" for k, v in UNFUSED.items()]  # a head that can accumulate
    keep = ov + ["train.on_resize=keep_global_batch", *unfused]
    kout = tmp_path / "keep"
    _run(2, keep + [f"output_dir={kout}"], stop_at=2)
    k1 = _run(1, keep + [f"output_dir={kout}"], stop_at=4)[0]
    line = _resize_line(k1["printed"])
    assert "global batch 16 -> 16 (grad_accum 1 -> 2), lr 0.1 -> 0.1" in line, line
    assert k1["grad_accum"] == 2 and k1["base_lrs"][0] == pytest.approx(0.1)
    # ... and refused where the global batch is no whole number of per-rank batches
    from fr_dist.errors import ConfigError

    with pytest.raises(ConfigError, match=r"global batch 16 of the checkpoint .* is not data.batch_size=6"):
        _run(1, keep + [f"output_dir={kout}", "data.batch_size=6"], stop_at=6)
    # ... and with the fused head update (the checkpoint was written by it)
    with pytest.raises(ConfigError, match="fused_update.*cannot accumulate"):
        _run(
            1,
            ov
            + [
                f"output_dir={tmp_path / 'f'}",
                f"checkpoint.resume={ckpt6}",
                "train.on_resize=keep_global_batch",
            ],
        )


# ----------------------------------------------------------------------------- the two-host rig
class Agents:
    """torchrun_multinode.sh agents on a :class:`TwoNodes` pair; every process they start is killed
    by its PID at the end (the workers run in sessions of their own, outside the agent's group)."""

    def __init__(self, nodes: TwoNodes, tmp: Path, args: list[str], **env):
        self.nodes, self.tmp, self.args, self.env = nodes, tmp, args, env
        self.procs: dict[int, subprocess.Popen] = {}
        self.logs: list[Path] = []
        self.pids: set[int] = set()

    def start(self, i: int) -> subprocess.Popen:
        log = self.tmp / f"node{i}.{len(self.logs)}.log"
        env = _env(NODE_RANK=i, RDZV_ENDPOINT=f"{self.nodes.ips[0]}:{PORT}", **self.env)
        self.procs[i] = self.nodes.popen(i, [SCRIPT, "1", *self.args], log, env=env)
        self.logs.append(log)
        return self.procs[i]

    def log(self, i: int) -> str:
        """Node i's log (its latest agent)."""
        mine = [p for p in self.logs if p.name.startswith(f"node{i}.")]
        return mine[-1].read_text(errors="replace") if mine else ""

    def all_logs(self) -> str:
        return "\n".join(f"---- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in self.logs)

    def _tree(self, p: subprocess.Popen) -> list[int]:
        try:
            kids = psutil.Process(p.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        pids = [p.pid] + [k.pid for k in kids]
        self.pids.update(pids)
        return pids

    def kill(self, i: int) -> float:
        """SIGKILL node i's agent and its workers (by PID); returns the time of the kill."""
        pids = self._tree(self.procs[i])
        t = time.time()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.procs[i].wait(timeout=30)
        return t

    def watch(self) -> None:
        """Remember the PIDs of the processes started so far (workers included), for close()."""
        for p in self.procs.values():
            self._tree(p)

    def close(self) -> None:
        self.watch()
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _env(**kw) -> dict:
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in kw.items()})
    return env


def _wait_for(cond, what: str, timeout_s: float, agents: Agents) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        agents.watch()
        if cond():
            return
        time.sleep(0.25)
    raise AssertionError(f"no {what} within {timeout_s:g} s\n{agents.all_logs()}")


def _records(out: Path) -> list[dict]:
    f = out / "metrics.jsonl"
    if not f.is_file():
        return []
    recs = []
    for line in f.read_text().splitlines():
        with contextlib.suppress(ValueError):
            recs.append(json.loads(line))
    return recs


def _last_step(out: Path) -> int:
    return max((r["step"] for r in _records(out) if "loss" in r), default=0)


def _attempts(log: str) -> list[tuple[int, int]]:
    """(world size, step resumed from) of every attempt whose rank 0 printed to ``log``."""
    found = []
    for line in log.splitlines():
        m = re.search(r"fr_dist: (\d+) rank\(s\) on", line)
        if m:
            found.append([int(m.group(1)), 0])
        m = re.search(r"resumed from \S+ at step (\d+)", line)
        if m and found:
            found[-1][1] = int(m.group(1))
    return [tuple(a) for a in found]


def _replay(attempts: list[tuple[int, int]], ov: list[str]) -> None:
    """The same world-size changes by stop-and-resume by hand: each attempt from its resume step to
    the next one's, in-process gloo ranks."""
    for k, (world, start) in enumerate(attempts):
        stop = attempts[k + 1][1] if k + 1 < len(attempts) else None
        if stop is not None and stop <= start:
            continue  # an attempt that failed before its first step
        _run(world, ov, stop_at=stop)


ELASTIC_STEPS = 120


@needs_netns
@pytest.mark.slow
def test_node_lost_and_back(launch_data, tmp_path):
    """NNODES=1:2, 2 hosts x 1 rank: host 1's agent and worker SIGKILLed after the step-4 checkpoint;
    host 0 re-forms alone, re-shards 2 -> 1 and trains on; host 1 started again joins at the next
    restart (1 -> 2). The final model equals the same changes made by hand."""
    out = tmp_path / "elastic"
    extra = {"checkpoint.every": 4, "checkpoint.resume": "auto", "train.log_every": 1, "dist.timeout_s": 30}
    ov = demo_overrides(launch_data, out, steps=ELASTIC_STEPS, **extra)
    env = dict(
        NNODES="1:2", MAX_RESTARTS=3, RDZV_TIMEOUT=60, RDZV_LAST_CALL_TIMEOUT=5, EXIT_BARRIER_TIMEOUT=10
    )
    with TwoNodes(tmp_path) as nodes:
        agents = Agents(nodes, tmp_path, ov, **env)
        try:
            agents.start(0)
            agents.start(1)
            _wait_for(lambda: _last_step(out) >= 6, "step 6 at W = 2", 240, agents)
            assert "fr_dist: 2 rank(s)" in agents.log(0), agents.all_logs()
            t_kill = agents.kill(1)
            _wait_for(
                lambda: "world size changed 2 -> 1" in agents.log(0), "re-forming at W = 1", 180, agents
            )
            trained = lambda: [r for r in _records(out) if r.get("time", 0) > t_kill and "loss" in r]  # noqa: E731
            _wait_for(lambda: trained(), "a step at W = 1", 120, agents)
            t_train = trained()[0]["time"]
            resumed_at = trained()[0]["step"] - 1
            assert _last_step(out) < ELASTIC_STEPS, "finished before host 1 came back: raise ELASTIC_STEPS"
            t_back = time.time()
            agents.start(1)
            _wait_for(
                lambda: "world size changed 1 -> 2" in agents.log(0), "growing back to W = 2", 180, agents
            )
            t_grown = time.time()
            codes = wait_all(list(agents.procs.values()), 240)
        finally:
            agents.close()
    logs = agents.all_logs()
    assert codes == [0, 0], logs
    line0 = next(x for x in agents.log(0).splitlines() if "world size changed 2 -> 1" in x)
    assert "classifier re-sharded (rows 16/16 -> 32), global batch 16 -> 8, lr 0.1 -> 0.05" in line0, line0
    attempts = _attempts(agents.log(0))
    assert attempts[0] == (2, 0) and attempts[-1][0] == 2, (attempts, logs)
    assert any(w == 1 and s >= 4 for w, s in attempts), (attempts, logs)
    grown = [s for w, s in attempts if w == 2][-1]
    print(
        f"\nelastic: peer SIGKILLed at step > 6 -> training at W = 1 (step {resumed_at + 1}) after "
        f"{t_train - t_kill:.1f} s; host 1 restarted -> W = 2 announced after {t_grown - t_back:.1f} s "
        f"(resumed at step {grown}); attempts (world, resume step): {attempts}"
    )

    ref = tmp_path / "by_hand"
    ref_ov = demo_overrides(launch_data, ref, steps=ELASTIC_STEPS, **extra)
    _replay(attempts, ref_ov)
    final = f"checkpoints/{ELASTIC_STEPS}"
    _assert_same_model(
        _final_model(ref / final, launch_data, tmp_path), _final_model(out / final, launch_data, tmp_path)
    )
    got, want = losses(out), losses(ref)
    assert sorted(got) == list(range(1, ELASTIC_STEPS + 1)) and got.keys() == want.keys()
    for s in want:
        assert got[s] == pytest.approx(want[s], rel=1e-5), s


_FINISH_THEN_LINGER = """
import os, sys, time
import torch.distributed as dist
dist.init_process_group("gloo")
dist.barrier()  # the run is over on both nodes
if os.environ["GROUP_RANK"] == "1":  # host 1 lingers: its agent is killed before it reports the end
    open(sys.argv[1], "w").write(str(os.getpid()))
    time.sleep(300)
os._exit(0)
"""


@needs_netns
def test_exit_barrier_after_peer_agent_died(tmp_path):
    """The run finished on host 0; host 1's agent is SIGKILLed before it reached the exit barrier:
    host 0's agent leaves after EXIT_BARRIER_TIMEOUT (10 s) with exit 0, not after torch's 300 s."""
    script, marker = tmp_path / "finish.py", tmp_path / "host1_finished"
    script.write_text(_FINISH_THEN_LINGER)
    with TwoNodes(tmp_path) as nodes:
        agents = Agents(
            nodes, tmp_path, [str(marker)], NNODES=2, FR_DIST_SCRIPT=script, EXIT_BARRIER_TIMEOUT=10
        )
        try:
            agents.start(0)
            agents.start(1)
            _wait_for(marker.is_file, "the end of the run", 180, agents)
            t_kill = agents.kill(1)
            codes = wait_all([agents.procs[0]], 120)
            t_exit = time.time()
        finally:
            agents.close()
    assert codes == [0], agents.all_logs()
    print(
        f"\nexit barrier: host 0's agent exited {t_exit - t_kill:.1f} s after its peer agent died (EXIT_BARRIER_TIMEOUT=10)"
    )


def _link(nodes: TwoNodes, state: str) -> None:
    subprocess.run(["ip", "-n", nodes.ns[0], "link", "set", nodes.veth[0], state], check=True)


@needs_netns
@pytest.mark.slow
def test_partition_30s_resumes(launch_data, tmp_path):
    """The veth link down for 30 s mid-run, dist.timeout_s=20: both ranks fail with CollectiveTimeout
    naming the collective and the peer, torchrun restarts them once the link is back, they resume from
    the last checkpoint, and every logged loss equals the uninterrupted run's."""
    steps, extra = 16, {"checkpoint.every": 4, "checkpoint.resume": "auto", "train.log_every": 1}
    out = tmp_path / "part"
    ov = demo_overrides(launch_data, out, steps=steps, **extra, **{"dist.timeout_s": 20})
    with TwoNodes(tmp_path) as nodes:
        agents = Agents(
            nodes, tmp_path, ov, NNODES=2, MAX_RESTARTS=2, RDZV_TIMEOUT=120, EXIT_BARRIER_TIMEOUT=10
        )
        try:
            agents.start(0)
            agents.start(1)
            _wait_for(lambda: _last_step(out) >= 6, "step 6", 240, agents)
            _link(nodes, "down")
            t_down = time.time()
            try:
                _wait_for(lambda: "CollectiveTimeout" in agents.log(0), "a CollectiveTimeout", 60, agents)
                time.sleep(max(0.0, 30 - (time.time() - t_down)))
            finally:
                _link(nodes, "up")
            t_up = time.time()
            codes = wait_all(list(agents.procs.values()), 300)
        finally:
            agents.close()
    logs = agents.all_logs()
    assert codes == [0, 0], logs
    err = next(x for x in agents.log(0).splitlines() if "CollectiveTimeout" in x)
    assert re.search(r"collective \w+ '[^']+' .* timed out after 20 s: rank 1 did not answer", err), err
    assert "dist.timeout_s" in err
    after = [r for r in _records(out) if r.get("time", 0) > t_up and "loss" in r]
    attempts = _attempts(agents.log(0))
    assert len(attempts) == 2 and attempts[1][1] >= 4, (attempts, logs)
    print(
        f"\npartition 30 s: {err.split('fr_dist: ')[-1][:160]}...; training again "
        f"{after[0]['time'] - t_up:.1f} s after the link came back (resumed at step {attempts[1][1]})"
    )
    ref = tmp_path / "uninterrupted"
    _run(2, demo_overrides(launch_data, ref, steps=steps, **extra))
    got, want = losses(out), losses(ref)
    assert got.keys() == want.keys() and all(got[s] == pytest.approx(want[s], rel=1e-6) for s in want), (
        got,
        want,
    )
    assert json.loads((out / "results.json").read_text())["loss"] == pytest.approx(got[steps], rel=1e-6)


@needs_netns
@pytest.mark.slow
def test_partition_longer_than_rendezvous_timeout(launch_data, tmp_path):
    """The link stays down past RDZV_TIMEOUT: node 0 (the rendezvous host) exits non-zero, and node 1
    once the link is back (torch's store client does not give up while it is down); the messages name
    the rendezvous address; every checkpoint written before still verifies."""
    from fr_dist.checkpoint.layout import list_checkpoints, verify_checkpoint

    out = tmp_path / "long"
    extra = {"checkpoint.every": 4, "checkpoint.resume": "auto", "train.log_every": 1, "dist.timeout_s": 10}
    ov = demo_overrides(launch_data, out, steps=200, **extra)
    with TwoNodes(tmp_path) as nodes:
        agents = Agents(
            nodes,
            tmp_path,
            ov,
            NNODES=2,
            MAX_RESTARTS=1,
            RDZV_TIMEOUT=20,
            RDZV_READ_TIMEOUT=10,
            EXIT_BARRIER_TIMEOUT=10,
        )
        try:
            agents.start(0)
            agents.start(1)
            _wait_for(lambda: _last_step(out) >= 6, "step 6", 240, agents)
            _link(nodes, "down")
            t_down = time.time()
            # node 0 hosts the rendezvous: its join times out after RDZV_TIMEOUT and it exits
            codes = wait_all([agents.procs[0]], 180)
            t_end = time.time()
            # node 1's agent stays blocked in torch's store client while the link is down (it does not
            # time out by itself); once the link is back it finds node 0's store gone and exits too
            late = wait_all([agents.procs[1]], 5)
            _link(nodes, "up")
            codes += wait_all([agents.procs[1]], 120)
            t_end1 = time.time()
        finally:
            _link(nodes, "up")
            agents.close()
    logs = agents.all_logs()
    assert None not in codes and all(c != 0 for c in codes), (codes, logs)
    assert "RendezvousTimeoutError" in agents.log(0), logs
    endpoint = f"fr_dist.launch: the rendezvous at {nodes.ips[0]}:{PORT} (id fr_dist) did not complete"
    assert endpoint in agents.log(0) and endpoint in agents.log(1), logs
    ckpts = list_checkpoints(out)
    assert ckpts and all(verify_checkpoint(p) is None for p in ckpts), ckpts
    print(
        f"\nlong partition: node 0 exited {codes[0]} {t_end - t_down:.1f} s after the link went down; node 1 "
        f"{'had exited' if late[0] is not None else 'was still waiting'} then, exited {codes[1]} "
        f"{t_end1 - t_end:.1f} s after the link came back"
    )
