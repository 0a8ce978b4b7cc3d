"""Stop signals (SIGTERM, SIGUSR1) recorded as a flag; the trainer checkpoints and stops on it.

Slurm sends SIGUSR1 ahead of preemption/time limit (``#SBATCH --signal=B:USR1@120`` forwarded by
the sbatch script) and torchrun forwards SIGTERM to its workers on shutdown. Handlers only set a
flag: the trainer reacts at a step boundary, after all ranks agreed, so no collective is cut.
"""

from __future__ import annotations

import signal
import threading

__all__ = ["StopSignals"]

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
