"""``python -m fr_dist.launch``: torchrun that exits 0 after a graceful stop.

Same arguments as ``torchrun``::

    python -m fr_dist.launch --standalone --nproc-per-node=2 -m fr_dist.cli train --config CONFIG ...

torchrun forwards a stop signal (SIGTERM from a scheduler, ``kill``, Slurm's step signal) to its
workers; fr_dist's ranks then agree at the next log step, write a checkpoint and exit 0. torch's
elastic agent nevertheless re-raises the signal it received (``SignalException``) and torchrun
exits 1, so a graceful stop looked like a crash to schedulers and scripts. This wrapper runs
torchrun's own ``main`` with a per-job marker directory exported to the workers
(``FR_DIST_STOP_MARKER_DIR``); every rank that stopped gracefully writes a marker there (step,
signal, checkpoint) just before it exits. When the launcher was signalled and every local rank of
the last attempt left its marker, it prints ``fr_dist.launch: stopped gracefully by SIGTERM at step
N, checkpoint ...`` and exits 0; otherwise the signal / failure propagates as with torchrun
(non-zero exit).

``FR_DIST_LAUNCH_STATUS_DIR`` (optional, set by ``launch/slurm/train.sbatch``): the launcher writes
``<dir>/<hostname>.<pid>`` containing ``finished``, ``stopped`` or ``failed``, so a batch script
can tell a run that finished from one stopped for preemption (requeue only the latter).

SIGUSR1 is added to the signals torchrun's agent handles (``--signals-to-handle``, unless given):
a SIGUSR1 sent to the launcher is forwarded to the ranks like SIGTERM (both are stop signals
of the trainer) instead of killing the launcher and orphaning its workers.

``FR_DIST_EXIT_BARRIER_TIMEOUT`` (seconds, optional; launch/torchrun_multinode.sh sets it, default 60):
how long an agent whose workers finished waits for the other agents before it exits (torch's exit
barrier: 300 s, no torchrun option). fr_dist's ranks finish together (a shutdown barrier), so the
barrier only waits for an agent that died after the run had finished.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

__all__ = [
    "main",
    "write_stop_marker",
    "read_stop_markers",
    "MARKER_ENV",
    "STATUS_ENV",
    "EXIT_BARRIER_ENV",
    "rendezvous_failure",
]

MARKER_ENV = "FR_DIST_STOP_MARKER_DIR"
STATUS_ENV = "FR_DIST_LAUNCH_STATUS_DIR"
EXIT_BARRIER_ENV = "FR_DIST_EXIT_BARRIER_TIMEOUT"
_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def write_stop_marker(env, stopped: dict) -> None:
    """In a rank that stopped gracefully (checkpoint written): leave a marker for the launcher.

    No-op unless the launcher exported ``FR_DIST_STOP_MARKER_DIR``. ``env`` is the rank's
    :class:`fr_dist.runtime.DistEnv`; ``stopped`` holds ``step``, ``signal``, ``checkpoint``.
    """
    root = os.environ.get(MARKER_ENV)
    if not root:
        return
    info = dict(
        stopped,
        rank=env.rank,
        local_rank=env.local_rank,
        attempt=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0),
    )
    path = Path(root) / f"rank{env.rank}.json"
    try:
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(info, default=str))
        os.replace(tmp, path)
    except OSError as e:  # the launcher then reports a non-graceful end; training itself is safe
        print(f"fr_dist: could not write the stop marker {path}: {e}", file=sys.stderr, flush=True)


def read_stop_markers(root: str | Path) -> list[dict]:
    """Markers of the last attempt that left any (a stopped attempt is never restarted)."""
    found = []
    for p in sorted(Path(root).glob("rank*.json")):
        try:
            found.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    if not found:
        return []
    last = max(m.get("attempt", 0) for m in found)
    return [m for m in found if m.get("attempt", 0) == last]


def _graceful(markers: list[dict], nproc: int) -> bool:
    return {m.get("local_rank") for m in markers} >= set(range(nproc))


def _status(word: str) -> None:
    root = os.environ.get(STATUS_ENV)
    if not root:
        return
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / f"{socket.gethostname()}.{os.getpid()}").write_text(word + "\n")
    except OSError as e:
        print(f"fr_dist.launch: could not write the status to {root}: {e}", file=sys.stderr, flush=True)


def _set_exit_barrier_timeout() -> None:
    """torch's elastic agent waits ``exit_barrier_timeout`` (300 s) for the other agents once its
    workers finished; torchrun has no option for it: take it from ``FR_DIST_EXIT_BARRIER_TIMEOUT``."""
    value = os.environ.get(EXIT_BARRIER_ENV, "").strip()
    if not value:
        return
    from torch.distributed.elastic.agent.server import local_elastic_agent

    cls = local_elastic_agent.LocalElasticAgent
    init = cls.__init__

    def __init__(self, *args, exit_barrier_timeout: float = float(value), **kwargs):
        init(self, *args, exit_barrier_timeout=exit_barrier_timeout, **kwargs)

    cls.__init__ = __init__


def rendezvous_failure(endpoint: str, run_id: str, e: BaseException) -> str:
    """The line the launcher prints when torchrun's rendezvous did not (re-)form the group."""
    detail = f": {e}" if str(e) else ""
    return (
        f"fr_dist.launch: the rendezvous at {endpoint} (id {run_id}) did not complete ({type(e).__name__}"
        f"{detail}): {endpoint} unreachable from {socket.gethostname()}, or the other nodes did not join in "
        "time (RDZV_TIMEOUT, --rdzv-conf join_timeout); the checkpoints written so far are kept: relaunch "
        "with checkpoint.resume=auto (exit 1)"
    )


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.rendezvous.api import RendezvousError

    argv = sys.argv[1:] if argv is None else list(argv)
    args = torchrun.parse_args(argv)  # torchrun's own parser: usage errors exit 2 as with torchrun
    _set_exit_barrier_timeout()
    nproc = torchrun.determine_local_world_size(args.nproc_per_node)
    if args.signals_to_handle == torchrun.get_args_parser().get_default("signals_to_handle"):
        argv = [f"--signals-to-handle={_SIGNALS}"] + argv  # SIGUSR1 too: forwarded, not fatal
    marker_dir = tempfile.mkdtemp(prefix="fr_dist_stop_")  # one per launcher (job x node)
    os.environ[MARKER_ENV] = marker_dir  # the agent starts the workers with this environment
    try:
        try:
            torchrun.main(argv)
        except SignalException as e:
            markers = read_stop_markers(marker_dir)
            name = getattr(e.sigval, "name", str(e.sigval))
            if not _graceful(markers, nproc):
                got = sorted(m.get("local_rank") for m in markers)
                print(
                    f"fr_dist.launch: received {name}; local ranks with a checkpoint-and-stop marker: {got} "
                    f"of {nproc}: NOT a graceful stop (exit 1)",
                    file=sys.stderr,
                    flush=True,
                )
                _status("failed")
                return 1
            step = max(int(m.get("step", -1)) for m in markers)
            ckpt = next((m.get("checkpoint") for m in markers if m.get("rank") == 0), None) or markers[0].get(
                "checkpoint"
            )
            seen = "" if ckpt and (Path(ckpt) / "meta.json").is_file() else " (not visible from this node)"
            print(
                f"fr_dist.launch: stopped gracefully by {name} at step {step}, checkpoint {ckpt}{seen}; "
                "relaunch with checkpoint.resume=auto to continue (exit 0)",
                file=sys.stderr,
                flush=True,
            )
            _status("stopped")
            return 0
        except RendezvousError as e:  # the agents never (re-)formed the group: name the address
            print(rendezvous_failure(args.rdzv_endpoint, args.rdzv_id, e), file=sys.stderr, flush=True)
            _status("failed")
            return 1
        except SystemExit as e:  # torchrun's own exits (argument errors)
            _status("finished" if not e.code else "failed")
            raise
        except BaseException:  # ChildFailedError and the rest: a real failure, exit non-zero as torchrun
            _status("failed")
            raise
        # every worker exited 0: finished, or stopped by a signal that reached the ranks only
        _status("stopped" if _graceful(read_stop_markers(marker_dir), nproc) else "finished")
        return 0
    finally:
        shutil.rmtree(marker_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
