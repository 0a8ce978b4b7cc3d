"""``fr-dist doctor``: pre-flight of a (multi-node) launch, before a week-long job starts.

It prints

* the rendezvous address (``MASTER_ADDR`` / ``RDZV_ENDPOINT`` / the first Slurm host) and what it
  resolves to, flagging a loopback answer (Debian's ``127.0.1.1 <hostname>`` line, most
  containers) that makes a multi-node job hang;
* this node's hostname and addresses, the address that routes to the rendezvous host, and the
  interface gloo / NCCL would use (``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` or the interface
  that owns that address);
* on the job's ranks (under torchrun or srun), all-reduce and all-gather latency and bus
  bandwidth per message size (NCCL-tests convention), so a wrong interface shows up as a number.

::

    fr-dist doctor                                   # one process: network report only
    torchrun --nproc-per-node=2 -m fr_dist.cli doctor --json doctor.json
    srun --ntasks-per-node=8 fr-dist doctor          # every rank of an allocation

The launch scripts use the address helpers through ``python -m fr_dist.doctor launch-env``
(prints shell assignments, refuses a loopback rendezvous host for a multi-node run).
Nothing in the network part imports torch.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from typing import Optional

from fr_dist import comm
from fr_dist.runtime import detect_env, first_slurm_host, init_distributed, shutdown

__all__ = [
    "split_endpoint",
    "resolve",
    "is_loopback",
    "route_source",
    "interfaces",
    "interface_of",
    "network_report",
    "launch_env",
    "bench_collectives",
    "bus_factor",
    "parse_size",
    "run_doctor",
]

DEFAULT_SIZES = "4,64,1K,16K,256K,1M,4M,16M,64M"


# ----------------------------------------------------------------------------- addresses


def split_endpoint(endpoint: str, default_port: int = 29400) -> tuple[str, int]:
    """``host:port`` / ``host`` / ``[v6]:port`` -> (host, port)."""
    ep = endpoint.strip()
    if ep.startswith("["):
        host, _, rest = ep[1:].partition("]")
        return host, int(rest.lstrip(":") or default_port)
    if ep.count(":") == 1:
        host, port = ep.split(":")
        return host, int(port or default_port)
    return ep, default_port


def resolve(host: str) -> list[str]:
    """Addresses of ``host`` (IPv4 first, in resolver order, no duplicates); [] when unresolvable."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return []
    v4 = [i[4][0] for i in infos if i[0] == socket.AF_INET]
    v6 = [i[4][0] for i in infos if i[0] == socket.AF_INET6]
    return list(dict.fromkeys(v4 + v6))


def is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr.split("%")[0]).is_loopback
    except ValueError:
        return False


def route_source(addr: str) -> Optional[str]:
    """The local address the kernel would use to reach ``addr`` (a UDP connect sends nothing)."""
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    try:
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.connect((addr, 9))
            return s.getsockname()[0]
    except OSError:
        return None


def interfaces() -> dict[str, list[str]]:
    """Interface name -> its addresses, from ``ip -o addr`` (Linux)."""
    out: dict[str, list[str]] = {}
    try:
        text = subprocess.run(
            ["ip", "-o", "addr", "show"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    for line in text.splitlines():
        # "2: eth0    inet 10.0.0.5/24 brd ... scope global eth0\ ..."
        parts = line.split()
        if len(parts) >= 4 and parts[2] in ("inet", "inet6"):
            name = parts[1].split("@")[0]
            out.setdefault(name, []).append(parts[3].split("/")[0])
    if not out:  # no iproute2: at least the names, and the loopback convention
        try:
            for _, name in socket.if_nameindex():
                out[name] = ["127.0.0.1"] if name == "lo" else []
        except OSError:
            pass
    return out


def interface_of(addr: Optional[str], ifaces: Optional[dict[str, list[str]]] = None) -> Optional[str]:
    if not addr:
        return None
    ifaces = interfaces() if ifaces is None else ifaces
    for name, addrs in ifaces.items():
        if addr in addrs:
            return name
    return "lo" if is_loopback(addr) else None


def _nccl_default_interface(ifaces: dict[str, list[str]]) -> Optional[str]:
    names = [n for n in ifaces if n != "lo" and not n.startswith("docker")]
    return next((n for n in names if n.startswith("ib")), names[0] if names else None)


def rendezvous_endpoint(environ=None) -> tuple[str, int, str]:
    """(host, port, where it came from) of the job's rendezvous, as the launchers set it."""
    env = os.environ if environ is None else environ
    if env.get("RDZV_ENDPOINT"):
        h, p = split_endpoint(env["RDZV_ENDPOINT"])
        return h, p, "RDZV_ENDPOINT"
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"], int(env.get("MASTER_PORT", 29500)), "MASTER_ADDR"
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if nodelist:
        return first_slurm_host(nodelist), int(env.get("MASTER_PORT", 29500)), "SLURM_JOB_NODELIST"
    return "127.0.0.1", int(env.get("MASTER_PORT", 29500)), "default (single node)"


def network_report(host: str, port: int, nnodes: int = 1, environ=None) -> dict:
    """Everything the network part of the doctor knows, plus a list of problems (with fixes)."""
    env = os.environ if environ is None else environ
    ifaces = interfaces()
    addrs = resolve(host)
    target = addrs[0] if addrs else None
    local = route_source(target) if target else None
    if local and is_loopback(local):
        local = None  # the rendezvous host is this node under a loopback name: no route info
    hostname = socket.gethostname()
    host_addrs = resolve(hostname)
    routable = [
        a for n, al in ifaces.items() for a in al if n != "lo" and not is_loopback(a) and ":" not in a
    ]
    if local is None:
        # this node's first non-loopback address of its hostname, else of any interface
        local = next((a for a in host_addrs if not is_loopback(a)), None) or (
            routable[0] if routable else None
        )
    auto_if = interface_of(local, ifaces)
    rep = dict(
        rendezvous_host=host,
        rendezvous_port=port,
        rendezvous_addrs=addrs,
        rendezvous_loopback=bool(addrs) and is_loopback(addrs[0]),
        hostname=hostname,
        hostname_addrs=host_addrs,
        hostname_loopback=bool(host_addrs) and all(is_loopback(a) for a in host_addrs),
        local_addr=local,
        local_interface=auto_if,
        interfaces=ifaces,
        gloo_socket_ifname=env.get("GLOO_SOCKET_IFNAME") or None,
        nccl_socket_ifname=env.get("NCCL_SOCKET_IFNAME") or None,
        # unset, gloo binds the address its hostname resolves to; NCCL takes the first interface
        # that is not lo/docker (ib* first); the launch scripts set both to ``local_interface``
        gloo_interface=env.get("GLOO_SOCKET_IFNAME")
        or interface_of(host_addrs[0] if host_addrs else None, ifaces),
        nccl_interface=env.get("NCCL_SOCKET_IFNAME") or _nccl_default_interface(ifaces),
        nnodes=nnodes,
        problems=[],
    )
    probs = rep["problems"]
    if not addrs:
        probs.append(
            f"rendezvous host {host!r} does not resolve on {hostname}: use an IP address "
            f"(RDZV_ENDPOINT=<ip>:{port}) or fix DNS / /etc/hosts"
        )
    elif nnodes > 1 and rep["rendezvous_loopback"]:
        probs.append(
            f"rendezvous host {host!r} resolves to {addrs[0]} (loopback) on {hostname}: the other nodes "
            f"cannot reach it and gloo/NCCL would advertise a loopback address. Fix: pass the node's "
            f"routable IP (RDZV_ENDPOINT=<ip of node 0>:{port}, --local-addr=<ip of this node>), set "
            f"GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME to the interface the nodes share, or make "
            f"/etc/hosts map the hostname to that IP instead of 127.0.1.1"
        )
    if nnodes > 1 and local is None:
        probs.append(f"{hostname} has no non-loopback address: it cannot take part in a multi-node job")
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        val = env.get(var, "")
        names = [n for n in val.lstrip("^=").split(",") if n]
        if (
            val
            and not val.startswith("^")
            and not any(n in ifaces or any(i.startswith(n) for i in ifaces) for n in names)
        ):
            probs.append(f"{var}={val} names no interface of {hostname} (have: {', '.join(sorted(ifaces))})")
    return rep


def launch_env(endpoint: str, nnodes: int, environ=None) -> tuple[int, dict[str, str], dict]:
    """For the launch scripts: (exit code, variables to export, report).

    Exit code 3 (with the problem printed by the caller) for a multi-node run whose rendezvous
    host is loopback or unresolvable. The variables: ``RDZV_ADDR`` (the resolved IP, used as
    endpoint), ``LOCAL_ADDR`` (this node's address towards it, for ``--local-addr``) and, when
    unset, ``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` = the interface owning ``LOCAL_ADDR``.
    """
    env = os.environ if environ is None else environ
    host, port = split_endpoint(endpoint)
    rep = network_report(host, port, nnodes, env)
    out: dict[str, str] = {}
    if rep["problems"] and nnodes > 1 and (rep["rendezvous_loopback"] or not rep["rendezvous_addrs"]):
        return 3, out, rep
    if rep["rendezvous_addrs"]:
        out["RDZV_ADDR"] = rep["rendezvous_addrs"][0]
    if nnodes > 1 and rep["local_addr"]:
        out["LOCAL_ADDR"] = env.get("LOCAL_ADDR") or rep["local_addr"]
        iface = interface_of(out["LOCAL_ADDR"], rep["interfaces"])
        if iface and iface != "lo":
            for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
                if not env.get(var):
                    out[var] = iface
    return 0, out, rep


# ----------------------------------------------------------------------------- collectives


def parse_size(s: str) -> int:
    """``4`` / ``16K`` / ``4M`` / ``1G`` (powers of 1024) -> bytes."""
    s = s.strip().upper().rstrip("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
    return int(float(s[:-1] if mult > 1 else s) * mult)


def bus_factor(kind: str, world: int) -> float:
    """NCCL-tests bus bandwidth = algorithm bandwidth x this (ring volume each rank moves)."""
    if world <= 1:
        return 0.0
    return 2.0 * (world - 1) / world if kind == "all_reduce" else (world - 1) / world


def bench_collectives(
    sizes: list[int], iters: int = 20, warmup: int = 3, device=None, group=None
) -> list[dict]:
    """Latency and bandwidth of fr_dist's all_reduce / all_gather on the default group.

    ``size`` is the logical buffer (all-reduce: the tensor; all-gather: the gathered output), as
    NCCL-tests counts it. Times are the median over ``iters`` of the slowest rank (max-reduced).
    """
    import torch
    import torch.distributed as dist

    _, world = comm.world_info(group)
    device = comm.device_of(group) if device is None else device
    rows = []
    for size in sizes:
        for kind in ("all_reduce", "all_gather"):
            n = max(1, size // 4) if kind == "all_reduce" else max(1, size // 4 // max(world, 1))
            x = torch.ones(n, dtype=torch.float32, device=device)  # [n]; all_gather -> [world*n]

            def op(x=x, kind=kind):
                if kind == "all_reduce":
                    return comm.all_reduce(x, "sum", group=group, name="doctor")
                return comm.all_gather(x, group=group, name="doctor")

            times = []
            for i in range(warmup + iters):
                if dist.is_initialized():
                    dist.barrier(group=group)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                op()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
            t = torch.tensor(sorted(times), dtype=torch.float64, device=device)  # [iters]
            t = comm.all_reduce(
                t, "max", group=group, name="doctor_times"
            )  # the slowest rank per rank of time
            med = float(t.median())
            nbytes = n * 4 * (world if kind == "all_gather" else 1)
            algbw = nbytes / med / 1e9 if med > 0 else 0.0
            rows.append(
                dict(
                    kind=kind,
                    bytes=nbytes,
                    world=world,
                    latency_us=med * 1e6,
                    algbw_gbps=algbw,
                    busbw_gbps=algbw * bus_factor(kind, world),
                )
            )
    comm.reset_comm_stats()
    return rows


def _fmt_bytes(n: int) -> str:
    for unit, div in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


def format_report(rep: dict, rows: list[dict], env_info: dict) -> str:
    lines = [
        f"fr-dist doctor: {env_info['world_size']} rank(s) via {env_info['launcher']} on {env_info['device']}",
        f"  rendezvous      {rep['rendezvous_host']}:{rep['rendezvous_port']} ({rep.get('source', '')}) -> "
        + (", ".join(rep["rendezvous_addrs"]) or "UNRESOLVED")
        + ("  [LOOPBACK]" if rep["rendezvous_loopback"] else ""),
        f"  this node       {rep['hostname']} -> {', '.join(rep['hostname_addrs']) or 'unresolved'}"
        + ("  [hostname resolves to loopback: pass --local-addr]" if rep["hostname_loopback"] else ""),
        f"  local address   {rep['local_addr']} on {rep['local_interface']}",
        f"  gloo interface  {rep['gloo_interface']}"
        + ("" if rep["gloo_socket_ifname"] else "  (GLOO_SOCKET_IFNAME unset: the hostname's address)"),
        f"  NCCL interface  {rep['nccl_interface']}"
        + (
            "" if rep["nccl_socket_ifname"] else "  (NCCL_SOCKET_IFNAME unset: NCCL's first non-lo interface)"
        ),
        "  interfaces      "
        + "; ".join(f"{n}={','.join(a) or '-'}" for n, a in sorted(rep["interfaces"].items())),
    ]
    for p in rep["problems"]:
        lines.append(f"  PROBLEM: {p}")
    if rows:
        lines.append(f"  {'collective':<11}{'size':>8}{'latency us':>13}{'alg GB/s':>11}{'bus GB/s':>11}")
        for r in rows:
            lines.append(
                f"  {r['kind']:<11}{_fmt_bytes(r['bytes']):>8}{r['latency_us']:>13.1f}"
                f"{r['algbw_gbps']:>11.3f}{r['busbw_gbps']:>11.3f}"
            )
    else:
        lines.append("  collectives     not measured (one process: run under torchrun or srun to measure)")
    return "\n".join(lines)


def run_doctor(args) -> int:
    """``fr-dist doctor``: report, measure, exit through runtime.shutdown (never returns when launched)."""
    denv = detect_env()
    host, port, source = rendezvous_endpoint()
    # NNODES may be an elastic range MIN:MAX (launch/torchrun_multinode.sh): the most nodes it allows
    nnodes = int(str(os.environ.get("NNODES") or os.environ.get("SLURM_JOB_NUM_NODES") or 1).split(":")[-1])
    if os.environ.get("GROUP_WORLD_SIZE") and os.environ.get("LOCAL_WORLD_SIZE"):
        nnodes = max(nnodes, int(os.environ["WORLD_SIZE"]) // max(int(os.environ["LOCAL_WORLD_SIZE"]), 1))
    rep = network_report(host, port, nnodes)
    rep["source"] = source
    if denv.world_size <= 1:
        print(format_report(rep, [], dict(world_size=1, launcher=denv.launcher, device="cpu")), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(network=rep, collectives=[], world_size=1), f, indent=1)
        return 1 if rep["problems"] and nnodes > 1 else 0

    code = 0
    try:
        env, device = init_distributed(args.device, timeout_s=args.timeout)
        sizes = [parse_size(s) for s in args.sizes.split(",") if s]
        rows = bench_collectives(sizes, iters=args.iters, device=device)
        if env.is_main:
            info = dict(world_size=env.world_size, launcher=env.launcher, device=str(device))
            print(format_report(rep, rows, info), flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(dict(network=rep, collectives=rows, **info), f, indent=1)
    except Exception as e:  # one line per rank: which rank, which address, what failed
        print(
            f"fr-dist doctor: rank {denv.rank} failed ({host}:{port}): {type(e).__name__}: {e}",
            file=sys.stderr,
        )
        code = 1
    shutdown(code)
    return code  # pragma: no cover - shutdown exits


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sizes", default=DEFAULT_SIZES, help=f"message sizes (bytes, K, M), default {DEFAULT_SIZES}"
    )
    p.add_argument("--iters", type=int, default=10, help="timed iterations per size (median reported)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--timeout", type=float, default=120.0, help="process-group timeout, seconds")
    p.add_argument("--json", default=None, help="write the report here (rank 0)")


def wait_reachable(addr: str, port: int, timeout_s: float) -> Optional[str]:
    """Retry a TCP connect to ``addr:port`` until it succeeds (None) or ``timeout_s`` passes (last error)."""
    deadline = time.monotonic() + timeout_s
    err = "timed out"
    while True:
        try:
            with socket.create_connection((addr, port), timeout=max(1.0, min(5.0, timeout_s))):
                return None
        except OSError as e:
            err = e.strerror or str(e)
        if time.monotonic() >= deadline:
            return err
        time.sleep(1.0)


def _main_launch_env(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m fr_dist.doctor launch-env")
    p.add_argument("--endpoint", required=True)
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--probe", type=float, default=0.0, help="wait up to this many s for the store to accept")
    a = p.parse_args(argv)
    code, out, rep = launch_env(a.endpoint, a.nnodes)
    for p_ in rep["problems"]:
        print(f"fr-dist launch: {p_}", file=sys.stderr)
    if code == 0 and a.probe > 0 and out.get("RDZV_ADDR"):
        err = wait_reachable(out["RDZV_ADDR"], rep["rendezvous_port"], a.probe)
        if err is not None:
            print(
                f"fr-dist launch: cannot reach the rendezvous store {rep['rendezvous_host']}:{rep['rendezvous_port']}"
                f" ({out['RDZV_ADDR']}) from {rep['hostname']} (local address {rep['local_addr']} on "
                f"{rep['local_interface']}) within {a.probe:.0f} s: {err}. Is node 0 up and its launcher "
                f"started, does {rep['rendezvous_host']} name node 0's routable address here, and does a "
                f"firewall allow port {rep['rendezvous_port']}? (RDZV_TIMEOUT sets this wait)",
                file=sys.stderr,
            )
            return 4
    for k, v in out.items():
        print(f"{k}={shlex.quote(v)}")
    return code


if __name__ == "__main__":
    if sys.argv[1:2] == ["launch-env"]:
        sys.exit(_main_launch_env(sys.argv[2:]))
    ap = argparse.ArgumentParser(prog="python -m fr_dist.doctor")
    add_arguments(ap)
    sys.exit(run_doctor(ap.parse_args()))
