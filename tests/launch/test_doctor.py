"""fr-dist doctor and the launch scripts' address checks (no root, no namespaces needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from launch_util import REPO

from fr_dist import doctor


def test_endpoint_and_size_parsing():
    assert doctor.split_endpoint("node1:29400") == ("node1", 29400)
    assert doctor.split_endpoint("node1") == ("node1", 29400)
    assert doctor.split_endpoint("[fd00::1]:1234") == ("fd00::1", 1234)
    assert [doctor.parse_size(s) for s in ("4", "1K", "64M", "1g")] == [4, 1024, 64 << 20, 1 << 30]
    assert (
        doctor.is_loopback("127.0.1.1") and doctor.is_loopback("::1") and not doctor.is_loopback("10.0.0.1")
    )
    assert doctor.bus_factor("all_reduce", 4) == 1.5 and doctor.bus_factor("all_gather", 4) == 0.75
    assert doctor.bus_factor("all_reduce", 1) == 0.0


def test_launch_env_refuses_loopback_for_multinode_only():
    code, out, rep = doctor.launch_env("localhost:29400", nnodes=2, environ={})
    assert code == 3 and out == {} and rep["rendezvous_loopback"]
    assert any("loopback" in p and "--local-addr" in p for p in rep["problems"])
    code, out, rep = doctor.launch_env("localhost:29400", nnodes=1, environ={})
    assert code == 0 and out["RDZV_ADDR"] == "127.0.0.1" and "LOCAL_ADDR" not in out
    code, _, rep = doctor.launch_env("no-such-host.invalid:1", nnodes=2, environ={})
    assert code == 3 and any("does not resolve" in p for p in rep["problems"])


def test_report_flags_unknown_interface():
    rep = doctor.network_report("127.0.0.1", 29500, 1, environ={"GLOO_SOCKET_IFNAME": "nosuchif0"})
    assert rep["gloo_interface"] == "nosuchif0"
    assert any("GLOO_SOCKET_IFNAME=nosuchif0 names no interface" in p for p in rep["problems"])


def test_single_process_doctor_reports_network(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID")}
    r = subprocess.run(
        [sys.executable, "-m", "fr_dist.cli", "doctor", "--json", str(tmp_path / "d.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "rendezvous" in r.stdout and "not measured" in r.stdout
    d = json.loads((tmp_path / "d.json").read_text())
    assert d["world_size"] == 1 and d["network"]["interfaces"]


def test_multinode_script_refuses_loopback_rendezvous_fast():
    env = dict(os.environ, PYTHON=sys.executable, NNODES="2", NODE_RANK="0", RDZV_ENDPOINT="localhost:29400")
    r = subprocess.run(
        [str(REPO / "launch" / "torchrun_multinode.sh"), "1", "--config", "configs/demo_cpu.yaml"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 3, r.stdout + r.stderr
    assert "resolves to 127.0.0.1 (loopback)" in r.stderr and "RDZV_ENDPOINT=<ip of node 0>" in r.stderr


@pytest.mark.parametrize(
    "script",
    [
        "torchrun_multinode.sh",
        "torchrun_single.sh",
        "slurm/train.sbatch",
        "slurm/bench.sbatch",
        "slurm/submit.sh",
    ],
)
def test_scripts_parse(script):
    r = subprocess.run(["bash", "-n", str(REPO / "launch" / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.dist
def test_doctor_two_ranks_under_torchrun(tmp_path):
    out = tmp_path / "doctor.json"
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "fr_dist.cli",
            "doctor",
            "--json",
            str(out),
            "--sizes",
            "4,64K",
            "--iters",
            "3",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["world_size"] == 2 and d["launcher"] == "torchrun"
    rows = {(x["kind"], x["bytes"]): x for x in d["collectives"]}
    assert set(rows) == {("all_reduce", 4), ("all_gather", 8), ("all_reduce", 65536), ("all_gather", 65536)}
    assert all(x["latency_us"] > 0 and x["world"] == 2 for x in rows.values())
    assert rows[("all_reduce", 65536)]["busbw_gbps"] == pytest.approx(
        rows[("all_reduce", 65536)]["algbw_gbps"]
    )
    assert "bus GB/s" in r.stdout and "gloo interface" in r.stdout
