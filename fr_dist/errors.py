"""Every error type fr_dist raises (layer 0: imports nothing of fr_dist).

    FrDistError                  the common base: ``except FrDistError`` catches any of them
      ConfigError(ValueError)    a configuration mistake, reported before anything starts
      CheckpointError(RuntimeError)        a checkpoint that cannot be written, found, verified or loaded
      CollectiveError(RuntimeError)        a collective failed (a peer died); names the collective
        CollectiveTimeout                  ... did not complete within the process-group timeout
      RendezvousError(RuntimeError)        the process group could not be started
      RecordIOError(ValueError)            a malformed RecordIO file (file, key, byte offset)
      DataFileError(ValueError)            a malformed .bin pair file or IJB meta file (file, line)
      BinUnpicklingError(pickle.UnpicklingError)  an insightface .bin naming a refused global

Each also derives from the builtin it always derived from, so ``except ValueError`` /
``except RuntimeError`` keep catching them. The modules that raise them re-export them under their
old names (``fr_dist.comm.CollectiveError is fr_dist.errors.CollectiveError``).
"""

from __future__ import annotations

import pickle
from typing import Optional

__all__ = [
    "FrDistError",
    "ConfigError",
    "CheckpointError",
    "CollectiveError",
    "CollectiveTimeout",
    "RendezvousError",
    "RecordIOError",
    "DataFileError",
    "BinUnpicklingError",
]


class FrDistError(Exception):
    """Base of every error type fr_dist defines."""


class ConfigError(FrDistError, ValueError):
    """A configuration mistake, reported before anything starts."""


class CheckpointError(FrDistError, RuntimeError):
    """A checkpoint that cannot be written, found, verified or loaded; the message names the path."""


class CollectiveError(FrDistError, RuntimeError):
    """A collective failed (a peer died or closed its connection); names the collective."""


class CollectiveTimeout(CollectiveError):
    """A collective did not complete within the process-group timeout (a peer hung or stopped)."""


class RendezvousError(FrDistError, RuntimeError):
    """The process group could not be started (store unreachable, peers never joined the set-up).

    The message names this rank, the store address and port, and the config key that bounds the
    wait (``dist.rendezvous_timeout_s``). Not a :class:`CollectiveError`: no collective ran.
    """


class RecordIOError(FrDistError, ValueError):
    """A malformed RecordIO file; the message names the file, key and byte offset."""

    def __init__(self, path, msg: str, key: Optional[int] = None, offset: Optional[int] = None):
        where = f"{path}"
        if key is not None:
            where += f", key {key}"
        if offset is not None:
            where += f", byte offset {offset}"
        super().__init__(f"{where}: {msg}")
        self.path, self.key, self.offset, self.reason = str(path), key, offset, msg


class DataFileError(FrDistError, ValueError):
    """A malformed evaluation data file (an insightface ``.bin`` pair file, IJB meta files, a
    ``.bin``'s images); the message names the file (and the line or image)."""


class BinUnpicklingError(FrDistError, pickle.UnpicklingError):
    """An insightface ``.bin`` pair file names a global (or persistent id) the reader refuses."""
