"""A real two-node Slurm cluster on one machine: munged (own socket), slurmctld on node1 and one
slurmd per node, each node a network namespace of :class:`netns.TwoNodes`.

``ProctrackType=proctrack/linuxproc``, ``TaskPlugin=task/none``, no accounting: no cgroups, no
database. Every daemon is started by this module and stopped by its PID in :meth:`close`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Optional

from netns import TwoNodes, netns_unavailable

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "scancel", "srun")


def slurm_unavailable() -> Optional[str]:
    why = netns_unavailable()
    if why:
        return why
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (apt-get install slurm-wlm munge)"
    return None


def _munge_key() -> Optional[Path]:
    for p in (Path("/etc/munge/munge.key"),):
        if p.is_file():
            return p
    return None


class SlurmCluster:
    def __init__(self, workdir: Path, cpus: int = 2):
        self.dir = Path(workdir) / "slurm"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.nodes = TwoNodes(self.dir, debian_hosts=True)
        self.procs: dict[str, subprocess.Popen] = {}
        try:
            self._start(cpus)
        except Exception:
            self.close()
            raise

    # --------------------------------------------------------------------- setup
    def _start(self, cpus: int) -> None:
        d = self.dir
        (d / "munge").mkdir(exist_ok=True)
        os.chmod(d / "munge", 0o700)
        key = _munge_key()
        if key is None:
            key = d / "munge" / "munge.key"
            subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
        self.munge_socket = d / "munge" / "munge.socket"
        munged = subprocess.Popen(
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={d / 'munge' / 'munged.pid'}",
                f"--log-file={d / 'munge' / 'munged.log'}",
                f"--seed-file={d / 'munge' / 'munged.seed'}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(d / "munged.err", "ab"),
            start_new_session=True,
        )
        self.procs["munged"] = munged
        self._wait_for(lambda: self.munge_socket.exists(), 20, "munged socket")
        for sub in ("state", "spool"):
            (d / sub).mkdir(exist_ok=True)
        n1, n2 = self.nodes.hostnames
        ip1, ip2 = self.nodes.ips
        conf = f"""ClusterName=frdist
SlurmctldHost={n1}({ip1})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
StateSaveLocation={d / "state"}
SlurmdSpoolDir={d / "spool"}/%n
SlurmctldPidFile={d / "slurmctld.pid"}
SlurmdPidFile={d / "slurmd-%n.pid"}
SlurmctldLogFile={d / "slurmctld.log"}
SlurmdLogFile={d / "slurmd-%n.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=30
SchedulerParameters=sched_interval=2
NodeName={n1} NodeAddr={ip1} CPUs={cpus} State=UNKNOWN
NodeName={n2} NodeAddr={ip2} CPUs={cpus} State=UNKNOWN
PartitionName=cpu Nodes={n1},{n2} Default=YES MaxTime=INFINITE State=UP
"""
        self.conf = d / "slurm.conf"
        self.conf.write_text(conf)
        env = self.env()
        self.procs["slurmctld"] = self.nodes.popen(
            0, ["slurmctld", "-D", "-i", "-f", str(self.conf)], d / "slurmctld.out", env=env
        )
        for i, name in enumerate(self.nodes.hostnames):
            self.procs[f"slurmd-{name}"] = self.nodes.popen(
                i, ["slurmd", "-D", "-N", name, "-f", str(self.conf)], d / f"slurmd-{name}.out", env=env
            )
        self._wait_for(self._nodes_idle, 60, "both nodes idle in sinfo")

    def env(self, **extra) -> dict:
        env = dict(os.environ, SLURM_CONF=str(self.conf) if hasattr(self, "conf") else "")
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def _nodes_idle(self) -> bool:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}:\n{self.logs()}")
        r = self.cmd(["sinfo", "-h", "-N", "-o", "%N %T"], check=False)
        states = r.stdout.split()
        return r.returncode == 0 and states.count("idle") == 2

    @staticmethod
    def _wait_for(cond, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if cond():
                return
            time.sleep(0.5)
        raise TimeoutError(f"timed out waiting for {what}")

    # --------------------------------------------------------------------- use
    def cmd(self, argv: list[str], check: bool = True, cwd=None, env=None, timeout: float = 60):
        """A Slurm client command, run on node1 (the controller's network)."""
        r = subprocess.run(
            ["nsenter", f"--net=/run/netns/{self.nodes.ns[0]}", *argv],
            capture_output=True,
            text=True,
            cwd=cwd,
            env=env or self.env(),
            timeout=timeout,
        )
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stdout}{r.stderr}")
        return r

    def job(self, job_id: str) -> dict[str, str]:
        r = self.cmd(["scontrol", "show", "job", "-o", job_id], check=False)
        out = {}
        for tok in r.stdout.split():
            k, _, v = tok.partition("=")
            out[k] = v
        return out

    def logs(self) -> str:
        parts = []
        for f in sorted(self.dir.glob("*.log")) + sorted(self.dir.glob("*.out")):
            parts.append(f"==> {f.name}\n" + f.read_text(errors="replace")[-2000:])
        return "\n".join(parts)

    def close(self) -> None:
        for name in [n for n in self.procs if n != "munged"] + ["munged"]:
            p = self.procs.get(name)
            if p is not None:
                TwoNodes.kill(p, grace_s=10)
        self.procs.clear()
        self.nodes.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
