"""Two "hosts" on one machine: network namespaces joined by a veth pair, each with its own hostname
and /etc/hosts (bind-mounted in a private mount + UTS namespace).

A command runs on node i as ``nsenter --net=/run/netns/NS unshare --mount --uts sh -c '...'``:
plain ``ip netns exec`` would also remount /sys, which breaks slurmd's cgroup probing.
Every process is started in its own session and is torn down by its PID (process group) in
:meth:`TwoNodes.close`, followed by the namespaces (which removes the veth pair).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

# sh -c script: $0 = hosts file, $1 = hostname, then the command
_ENTER = 'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"'


def netns_unavailable() -> Optional[str]:
    """Why the namespace tests cannot run here (None when they can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, bind mounts)"
    for tool in ("ip", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found"
    probe = f"frdprobe{os.getpid() % 100000}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class TwoNodes:
    """node1 = 10.77.<k>.1, node2 = 10.77.<k>.2 on a veth pair; ``hosts`` overrides per node."""

    def __init__(self, workdir: Path, hostnames=("node1", "node2"), debian_hosts: bool = False):
        """``debian_hosts``: each node's own name maps to 127.0.1.1 (Debian's installer, most
        containers), the peer's name to its real address."""
        tag = os.getpid() % 10000
        self.k = 1 + os.getpid() % 250
        self.ns = [f"frd{tag}a", f"frd{tag}b"]
        self.veth = [f"frdv{tag}a", f"frdv{tag}b"]
        self.ips = [f"10.77.{self.k}.1", f"10.77.{self.k}.2"]
        self.hostnames = list(hostnames)
        self.workdir = Path(workdir)
        self.procs: list[subprocess.Popen] = []
        self.hosts_files = []
        for i in range(2):
            lines = ["127.0.0.1 localhost"]
            for j, (ip, h) in enumerate(zip(self.ips, self.hostnames)):
                lines.append(f"127.0.1.1 {h}" if (debian_hosts and i == j) else f"{ip} {h}")
            f = self.workdir / f"hosts.{self.hostnames[i]}"
            f.write_text("\n".join(lines) + "\n")
            self.hosts_files.append(f)
        try:
            self._up()
        except Exception:
            self.close()
            raise

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    def _up(self) -> None:
        for ns in self.ns:
            self._ip("netns", "add", ns)
        self._ip("link", "add", self.veth[0], "type", "veth", "peer", "name", self.veth[1])
        for ns, veth, ip in zip(self.ns, self.veth, self.ips):
            self._ip("link", "set", veth, "netns", ns)
            self._ip("-n", ns, "addr", "add", f"{ip}/24", "dev", veth)
            self._ip("-n", ns, "link", "set", veth, "up")
            self._ip("-n", ns, "link", "set", "lo", "up")

    def argv(self, i: int, cmd: list[str]) -> list[str]:
        """``cmd`` as run on node i (its netns, hostname and hosts file)."""
        return [
            "nsenter",
            f"--net=/run/netns/{self.ns[i]}",
            "unshare",
            "--mount",
            "--uts",
            "sh",
            "-c",
            _ENTER,
            str(self.hosts_files[i]),
            self.hostnames[i],
            *cmd,
        ]

    def popen(self, i: int, cmd: list[str], log: Path, env: Optional[dict] = None) -> subprocess.Popen:
        f = open(log, "ab")
        p = subprocess.Popen(
            self.argv(i, cmd), stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        f.close()
        self.procs.append(p)
        return p

    def run(
        self, i: int, cmd: list[str], env: Optional[dict] = None, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(i, cmd), capture_output=True, text=True, env=env, timeout=timeout)

    @staticmethod
    def kill(p: subprocess.Popen, grace_s: float = 5.0) -> None:
        """SIGTERM then SIGKILL the process group this helper started (pgid == the child's pid)."""
        if p.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    p.wait(timeout=grace_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        try:  # stragglers of the group (e.g. torchrun's workers) after the leader exited
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def close(self) -> None:
        for p in reversed(self.procs):
            self.kill(p)
        self.procs.clear()
        for ns in self.ns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        # deleting a namespace deletes its veth end and with it the peer; be sure for a half-built pair
        subprocess.run(["ip", "link", "del", self.veth[0]], capture_output=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def wait_all(procs: list[subprocess.Popen], timeout_s: float) -> list[Optional[int]]:
    """Exit codes (None for a process still running at the deadline)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.5)
    return [p.poll() for p in procs]
