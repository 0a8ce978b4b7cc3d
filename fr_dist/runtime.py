"""Distributed runtime: initialise from torchrun / Slurm / nothing, pick device + backend, shut down cleanly.

Launch recipes (the same script runs all three ways)::

    python -m fr_dist.cli train ...                              # single process, no process group
    torchrun --nproc_per_node=2 -m fr_dist.cli train ...         # RANK / WORLD_SIZE / LOCAL_RANK / MASTER_*
    srun --ntasks=8 python -m fr_dist.cli train ...              # SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID

Nothing here runs at import time: process groups are created only by :func:`init_distributed`.
"""

from __future__ import annotations

import datetime
import os
import re
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fr_dist import comm
from fr_dist.config_base import SECTION_CONFIG
from fr_dist.errors import ConfigError, RendezvousError

__all__ = [
    "DistEnv",
    "RendezvousError",
    "detect_env",
    "init_distributed",
    "shutdown",
    "first_slurm_host",
    "attempt_prefix",
]


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    """Global rank."""
    world_size: int = 1
    """Number of processes in the job."""
    local_rank: int = 0
    """Rank on this node (selects the GPU)."""
    master_addr: str = "127.0.0.1"
    """Rendezvous host for ``env://`` initialisation."""
    master_port: int = 29500
    """Rendezvous port."""
    launcher: str = "none"
    """``torchrun``, ``slurm`` or ``none``."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm nodelist such as ``gpu[003-005,010],cpu1`` -> ``gpu003``."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("empty SLURM_JOB_NODELIST")
    # first top-level item (commas inside brackets do not split)
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            end = i
            break
    item = nodelist[:end]
    m = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", item)
    if not m:
        return item
    prefix, ranges, suffix = m.groups()
    first = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{first}{suffix}"


def detect_env(environ: dict | None = None) -> DistEnv:
    """Read the launcher's variables. torchrun wins over Slurm (srun may start one torchrun per node)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = env.get("MASTER_ADDR") or first_slurm_host(
            env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1"))
        )
        job_id = int(env.get("SLURM_JOB_ID", "0") or 0)
        port = int(env.get("MASTER_PORT", 20000 + job_id % 20000))
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=addr,
            master_port=port,
            launcher="slurm",
        )
    return DistEnv()


def select_device(local_rank: int, device: str = "auto") -> torch.device:
    """``auto``: CUDA GPU ``local_rank`` when CUDA is available, else CPU.

    ``device=cuda`` on a machine (or a torch build) without CUDA raises a ConfigError naming the key.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else "no visible CUDA GPU"
            raise ConfigError(
                f"device=cuda but this machine has {build} (torch {torch.__version__}); "
                "use device=cpu or device=auto"
            )
        dev = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(dev)
        return dev
    return torch.device(device)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _env_flag(*names: str) -> bool | None:
    """The first of ``names`` set in the environment, as a bool (``None``: none is set)."""
    for name in names:
        if os.environ.get(name, "") != "":
            return os.environ[name].strip() not in ("0", "false", "False")
    return None


def prepare_nccl_timeouts() -> bool:
    """Before an NCCL group starts: make a collective past ``dist.timeout_s`` end the job cleanly.

    NCCL collectives are asynchronous: a hung peer is found by NCCL's watchdog thread, not by the
    calling thread as under gloo. ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1`` (set unless the user chose a
    value) makes the watchdog abort the communicators and then the process after the timeout.
    Returns whether ``TORCH_NCCL_BLOCKING_WAIT`` is on (the user's choice: every collective then
    blocks the host, and a timed-out one raises in Python, as :class:`fr_dist.comm.CollectiveTimeout`).
    """
    if _env_flag("TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_ASYNC_ERROR_HANDLING") is None:
        os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"
    return bool(_env_flag("TORCH_NCCL_BLOCKING_WAIT", "NCCL_BLOCKING_WAIT"))


def nccl_timeout_note(timeout_s: float, blocking_wait: bool) -> str:
    """The line rank 0 prints when an NCCL group starts: what a timed-out collective does, and the key."""
    if blocking_wait:
        return (
            f"fr_dist: NCCL with TORCH_NCCL_BLOCKING_WAIT=1: a collective that does not complete within "
            f"dist.timeout_s={timeout_s:g} s raises CollectiveTimeout naming it; raise dist.timeout_s "
            "for slower collectives"
        )
    return (
        f"fr_dist: NCCL: a collective that does not complete within dist.timeout_s={timeout_s:g} s is "
        "caught by NCCL's watchdog, which aborts the process (its log says 'Watchdog caught collective "
        "operation timeout' and names the collective); raise dist.timeout_s for slower collectives, or "
        "set TORCH_NCCL_BLOCKING_WAIT=1 to get a CollectiveTimeout in Python instead (every collective "
        "then blocks the host)"
    )


def attempt_prefix(environ: dict | None = None) -> str | None:
    """Key prefix of this restart attempt in torchrun's agent store, ``None`` when not under one.

    Under ``torchrun`` without ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` the workers' MASTER_ADDR:PORT
    is the agent's rendezvous store, which lives as long as the job. The attempt number
    (``TORCHELASTIC_RESTART_COUNT``) and the world size (a membership change of an elastic job
    restarts the workers without counting a restart, and changes the world size) keep the keys of a
    new attempt apart from those of the attempt before.
    """
    env = os.environ if environ is None else environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    return f"fr_dist/attempt{env.get('TORCHELASTIC_RESTART_COUNT', '0')}/w{env.get('WORLD_SIZE', '?')}"


def init_distributed(
    device: str = "auto",
    timeout_s: float = 180.0,
    environ: dict | None = None,
    rendezvous_timeout_s: float | None = None,
) -> tuple[DistEnv, torch.device]:
    """Initialise the default process group if the launcher asked for more than one process.

    ``timeout_s`` (config ``dist.timeout_s``) bounds every collective: a hung or stopped peer makes
    the others raise :class:`fr_dist.comm.CollectiveTimeout` naming the collective (gloo, or NCCL
    with ``TORCH_NCCL_BLOCKING_WAIT=1``); under NCCL otherwise its watchdog aborts the process
    (:func:`prepare_nccl_timeouts`; rank 0 says so at start-up). Start-up
    (rendezvous + connection set-up) may take ``rendezvous_timeout_s`` (``dist.rendezvous_timeout_s``;
    default ``timeout_s``). Returns the environment and the device of this rank. With world size 1
    and no launcher no process group is created (every fr_dist collective then short-circuits).
    """
    rdzv = float(rendezvous_timeout_s or timeout_s)
    env = detect_env(environ)
    dev = select_device(env.local_rank, device)
    if env.world_size > 1 and not dist.is_initialized():
        if env.launcher == "slurm":
            # env:// reads these; torchrun already exports them.
            os.environ.setdefault("MASTER_ADDR", env.master_addr)
            os.environ.setdefault("MASTER_PORT", str(env.master_port))
            os.environ.setdefault("RANK", str(env.rank))
            os.environ.setdefault("WORLD_SIZE", str(env.world_size))
            os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
        addr = os.environ.get("MASTER_ADDR", env.master_addr)
        port = os.environ.get("MASTER_PORT", str(env.master_port))
        timeout = datetime.timedelta(seconds=rdzv)
        backend = backend_for(dev)
        blocking_wait = prepare_nccl_timeouts() if backend == "nccl" else False
        try:
            prefix = attempt_prefix(environ)
            if prefix is not None:
                # torchrun's agent store (its rendezvous TCPStore, shared with the workers since torch
                # 2.4) outlives a --max-restarts restart and holds the dead attempt's gloo addresses and
                # barrier counters: give every attempt its own key space in it.
                base = dist.TCPStore(addr, int(port), env.world_size, is_master=False, timeout=timeout)
                init = dict(store=dist.PrefixStore(prefix, base))
            else:
                init = dict(init_method="env://")
            dist.init_process_group(
                backend=backend,
                rank=env.rank,
                world_size=env.world_size,
                timeout=timeout,
                **init,
                **({"device_id": dev} if dev.type == "cuda" else {}),
            )
        except RuntimeError as e:  # DistNetworkError / DistStoreError / gloo: name the address and the key
            raise RendezvousError(
                f"rank {env.rank}/{env.world_size}: could not join the process group at {addr}:{port} "
                f"within dist.rendezvous_timeout_s={rdzv:g} s ({str(e).strip().splitlines()[-1]})"
            ) from e
        if rdzv != timeout_s:
            from torch.distributed.distributed_c10d import _set_pg_timeout

            _set_pg_timeout(datetime.timedelta(seconds=timeout_s))
        comm.set_timeout_info(timeout_s, "dist.timeout_s")
        if backend == "nccl" and env.rank == 0:
            print(nccl_timeout_note(timeout_s, blocking_wait), flush=True)
    return env, dev


def shutdown(code: int = 0) -> None:
    """Barrier, destroy the process group, flush, and ``os._exit``.

    torch 2.13 + gloo aborts at interpreter exit in ~20% of runs (SIGABRT), which torchrun
    reports as a failed job; leaving through ``os._exit`` skips the faulty teardown.
    """
    try:
        if dist.is_available() and dist.is_initialized():
            if code == 0:
                try:
                    comm.barrier(name="shutdown")
                except RuntimeError as e:  # a peer died after this rank finished: say so, exit non-zero
                    print(f"fr_dist: {e}", file=sys.stderr)
                    code = 1
            if code == 0:  # destroying a group with a dead/hung peer can block: leave without it
                dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# ----------------------------------------------------------------------------- config section
from pydantic import Field  # noqa: E402
from pydantic.dataclasses import dataclass as pydantic_dataclass  # noqa: E402


@pydantic_dataclass(config=SECTION_CONFIG)
class DistConfig:
    """``dist``: timeouts of the process group this module starts."""

    timeout_s: float = Field(180.0, gt=0)
    """Process-group timeout in seconds: a collective that a rank does not join within it (hung,
    stopped or dead peer) raises CollectiveTimeout naming the collective, instead of hanging."""
    rendezvous_timeout_s: float = Field(300.0, gt=0)
    """Seconds to wait for every rank to join at start-up (init_process_group / TCP store)."""
