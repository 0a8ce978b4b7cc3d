"""Runtime: torchrun / Slurm / no-launcher environments, and a real 2-process Slurm-style start."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from fr_dist.runtime import detect_env, first_slurm_host
from fr_dist.testing import free_port


@pytest.mark.parametrize(
    "nodelist,host",
    [
        ("gpu[003-005,010],cpu1", "gpu003"),
        ("node7", "node7"),
        ("a-[12-13]", "a-12"),
        ("n[1,3],m[2-4]", "n1"),
        ("host1,host2", "host1"),
    ],
)
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


def test_detect_env_variants():
    assert detect_env({}).world_size == 1 and detect_env({}).launcher == "none"
    tr = detect_env(dict(RANK="3", WORLD_SIZE="8", LOCAL_RANK="1", MASTER_ADDR="h", MASTER_PORT="1234"))
    assert (tr.rank, tr.world_size, tr.local_rank, tr.master_addr, tr.master_port, tr.launcher) == (
        3,
        8,
        1,
        "h",
        1234,
        "torchrun",
    )
    sl = detect_env(
        dict(
            SLURM_PROCID="5",
            SLURM_NTASKS="16",
            SLURM_LOCALID="1",
            SLURM_JOB_NODELIST="gpu[010-011]",
            SLURM_JOB_ID="4242",
        )
    )
    assert (sl.rank, sl.world_size, sl.local_rank, sl.master_addr, sl.launcher) == (
        5,
        16,
        1,
        "gpu010",
        "slurm",
    )
    assert 20000 <= sl.master_port < 40000
    # torchrun started by srun (one torchrun per node): torchrun's variables win
    both = detect_env(dict(RANK="0", WORLD_SIZE="2", SLURM_PROCID="7", SLURM_NTASKS="9"))
    assert both.launcher == "torchrun" and both.world_size == 2


@pytest.mark.dist
def test_slurm_variables_start_a_real_group():
    """Two processes with only SLURM_* variables (as `srun` sets them) form a gloo group."""
    port = free_port()
    code = textwrap.dedent(
        """
        import torch, torch.distributed as dist
        from fr_dist.runtime import init_distributed, shutdown
        env, dev = init_distributed("cpu")
        x = torch.tensor([float(env.rank + 1)])
        dist.all_reduce(x)
        print(f"rank {env.rank}/{env.world_size} {env.launcher} sum={x.item()}", flush=True)
        shutdown(0)
        """
    )
    procs = []
    for rank in range(2):
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        }
        env.update(
            SLURM_PROCID=str(rank),
            SLURM_NTASKS="2",
            SLURM_LOCALID=str(rank),
            SLURM_JOB_NODELIST="localhost",
            MASTER_PORT=str(port),
            MASTER_ADDR="127.0.0.1",
        )
        procs.append(
            subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        )
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert "rank 0/2 slurm sum=3.0" in outs[0] and "rank 1/2 slurm sum=3.0" in outs[1]
