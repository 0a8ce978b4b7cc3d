"""Two hosts (network namespaces + veth) running launch/torchrun_multinode.sh: the result equals
a single-host 2-rank run, and a rendezvous host that resolves to loopback fails fast with the fix
in the message instead of hanging. Root + `ip netns` only; skipped elsewhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from launch_util import REPO, demo_overrides, losses
from netns import TwoNodes, netns_unavailable, wait_all

pytestmark = [pytest.mark.slow, pytest.mark.dist]

_WHY = netns_unavailable()
needs_netns = pytest.mark.skipif(_WHY is not None, reason=f"network namespaces: {_WHY}")
PORT = 29400


def _env(**kw) -> dict:
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in kw.items()})
    return env


def _multinode(nodes: TwoNodes, endpoint: str, args: list[str], tmp_path, timeout_s: float, **env):
    procs = [
        nodes.popen(
            i,
            [str(REPO / "launch" / "torchrun_multinode.sh"), "1", *args],
            tmp_path / f"node{i}.log",
            env=_env(NNODES=2, NODE_RANK=i, RDZV_ENDPOINT=endpoint, **env),
        )
        for i in range(2)
    ]
    codes = wait_all(procs, timeout_s)
    logs = [(tmp_path / f"node{i}.log").read_text(errors="replace") for i in range(2)]
    return codes, logs


@needs_netns
def test_two_hosts_equal_single_host(launch_data, tmp_path):
    """Debian-style hosts files (own name -> 127.0.1.1): the script's --local-addr and
    GLOO_SOCKET_IFNAME make it work; the losses equal a one-host 2-rank run exactly."""
    single = tmp_path / "single"
    r = subprocess.run(
        [str(REPO / "launch" / "torchrun_single.sh"), "2", *demo_overrides(launch_data, single)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    multi = tmp_path / "multi"
    with TwoNodes(tmp_path, debian_hosts=True) as nodes:
        codes, logs = _multinode(
            nodes,
            f"{nodes.ips[0]}:{PORT}",
            demo_overrides(launch_data, multi),
            tmp_path,
            300,
            RDZV_TIMEOUT=60,
        )
    assert codes == [0, 0], "\n----\n".join(x[-3000:] for x in logs)
    assert f"({nodes.ips[1]})" in logs[1] and f"gloo if {nodes.veth[1]}" in logs[1], logs[1][:2000]
    one, two = losses(single), losses(multi)
    assert len(one) >= 6 and one == two, (one, two)
    res1 = json.loads((single / "results.json").read_text())
    res2 = json.loads((multi / "results.json").read_text())
    assert res1["step"] == res2["step"] == 12 and res1["loss"] == res2["loss"]


@needs_netns
def test_loopback_rendezvous_host_fails_fast(launch_data, tmp_path):
    """RDZV_ENDPOINT=node1:PORT where node1's own hosts file says 127.0.1.1: node 0 refuses at
    once naming the fix; node 1 (whose peer never comes up) gives up after RDZV_TIMEOUT naming
    the address it could not reach. Nothing hangs."""
    with TwoNodes(tmp_path, debian_hosts=True) as nodes:
        codes, logs = _multinode(
            nodes,
            f"node1:{PORT}",
            demo_overrides(launch_data, tmp_path / "x"),
            tmp_path,
            120,
            RDZV_TIMEOUT=10,
        )
    assert codes[0] == 3, logs[0]
    assert "resolves to 127.0.1.1 (loopback)" in logs[0] and "--local-addr" in logs[0], logs[0]
    assert codes[1] == 3, logs[1]
    assert f"cannot reach the rendezvous store node1:{PORT} ({nodes.ips[0]})" in logs[1], logs[1]


@needs_netns
def test_doctor_on_two_hosts(tmp_path):
    """`fr-dist doctor` through the multi-node launcher: measured over the veth pair, and the
    report names the interface gloo uses on each node."""
    with TwoNodes(tmp_path, debian_hosts=True) as nodes:
        args = ["--json", str(tmp_path / "doctor.json"), "--sizes", "4,1M", "--iters", "3"]
        codes, logs = _multinode(
            nodes, f"{nodes.ips[0]}:{PORT}", args, tmp_path, 180, FR_DIST_COMMAND="doctor"
        )
    assert codes == [0, 0], "\n----\n".join(x[-3000:] for x in logs)
    d = json.loads((tmp_path / "doctor.json").read_text())
    assert d["world_size"] == 2 and len(d["collectives"]) == 4
    assert d["network"]["gloo_interface"] == nodes.veth[0] and d["network"]["local_addr"] == nodes.ips[0]
    assert "bus GB/s" in logs[0]
