"""MXNet RecordIO, read and written natively (byte-compatible with files MXNet / dmlc-core write).

One import point for the three modules that implement it (every name below is importable from here):

* :mod:`fr_dist.data.recordio_format`: record framing, the 24-byte image-record header, the
  ``.idx`` index in memory (:class:`RecordIndex`) and the ``property`` file.
* :mod:`fr_dist.data.recordio_reader`: :class:`RecordIOReader` / :func:`open_recordio` (random
  access by key, scans, layout detection: ``insightface`` or ``flat``, label checks, decode).
* :mod:`fr_dist.data.recordio_writer`: :class:`RecordIOWriter` and :func:`write_dataset`
  (``.rec`` + ``.idx`` + ``property``, byte-identical to insightface/MXNet's packer).

Every malformed input raises :class:`RecordIOError` naming the file, the key and the byte offset.
"""

from __future__ import annotations

from fr_dist.data.recordio_format import (
    HEADER_SIZE,
    MAGIC,
    IRHeader,
    RecordIndex,
    frame_record,
    pack_header,
    read_property,
    unpack_header,
    write_property,
)
from fr_dist.data.recordio_reader import RecordIOReader, open_recordio
from fr_dist.data.recordio_writer import RecordIOWriter, write_dataset, write_recordio
from fr_dist.errors import RecordIOError

__all__ = [
    "MAGIC",
    "HEADER_SIZE",
    "IRHeader",
    "RecordIOError",
    "RecordIOReader",
    "RecordIOWriter",
    "RecordIndex",
    "frame_record",
    "open_recordio",
    "write_dataset",
    "write_recordio",
    "pack_header",
    "unpack_header",
    "read_property",
    "write_property",
]
