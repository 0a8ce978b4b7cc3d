"""Stop signals (SIGTERM, SIGUSR1) recorded as a flag; the trainer checkpoints and stops on it.

Slurm sends SIGUSR1 ahead of preemption/time limit (``#SBATCH --signal=B:USR1@120`` forwarded by
the sbatch script) and torchrun forwards SIGTERM to its workers on shutdown. Handlers only set a
flag: the trainer reacts at a step boundary, after all ranks agreed, so no collective is cut.

Helper processes of a rank (DataLoader workers) call :func:`ignore_stop_signals` first thing: the
launcher's group kill (torchrun's ``killpg``, Slurm's step signal) reaches them too, and a worker
killed by SIGTERM would crash its rank ("DataLoader worker (pid N) is killed by signal") before
the rank checkpoints. They ignore the stop signals and die with their parent instead.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

__all__ = ["StopSignals", "ignore_stop_signals", "signal_name"]

SIGNALS = tuple(
    s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None
)


class StopSignals:
    def __init__(self, enabled: bool = True):
        self.received = None
        self._previous = {}
        # signal handlers can only be installed from the main thread
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        if self.enabled:
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.received = signum

    def restore(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous = {}


def signal_name(signum) -> str:
    if signum is None:
        return "(received by another rank)"
    try:
        return signal.Signals(signum).name
    except (ValueError, TypeError):
        return str(signum)


def ignore_stop_signals(die_with_parent: bool = True) -> None:
    """In a helper process: ignore SIGTERM/SIGUSR1 (and SIGINT); on Linux get SIGKILL when the parent dies."""
    for sig in SIGNALS + (signal.SIGINT,):
        signal.signal(sig, signal.SIG_IGN)
    if die_with_parent and sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            PR_SET_PDEATHSIG = 1
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
            if os.getppid() == 1:  # the parent died before prctl took effect
                os._exit(0)
        except (OSError, AttributeError):  # pragma: no cover - no prctl: the DataLoader watchdog exits us
            pass
