"""MXNet RecordIO on disk: record framing, the image-record header and the ``property`` file.

Record framing (dmlc-core ``recordio.cc``): ``uint32 magic 0xCED7230A``, ``uint32 lrec``
(top 3 bits: continuation flag, low 29 bits: length), payload, zero padding to 4 bytes. A payload
that contains the magic word at a 4-aligned position is split there: parts carry flags
1 (first), 2 (middle), 3 (last), and the reader re-inserts the magic between parts.

Payload (``mx.recordio.pack``): 24-byte header ``<IfQQ`` (flag, label, id, id2); if flag > 0,
``flag`` float32 labels follow (and the scalar label field is 0). Then the encoded image.
The ``.idx`` file is text, ``key\\toffset`` per line (:class:`RecordIndex` holds it in memory);
``property`` is ``num_classes,height,width``.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from fr_dist.errors import RecordIOError

__all__ = [
    "MAGIC",
    "HEADER_SIZE",
    "IRHeader",
    "RecordIndex",
    "pack_header",
    "unpack_header",
    "frame_record",
    "read_property",
    "write_property",
    "MAX_IMAGE_PIXELS",
    "peek_image_size",
]

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_HEADER = struct.Struct("<IfQQ")
HEADER_SIZE = _HEADER.size  # 24
_LEN_MASK = (1 << 29) - 1
_INT64_MAX = (1 << 63) - 1

MAX_IMAGE_PIXELS = 1 << 26
"""Readers refuse an encoded image whose header claims more pixels (8192 x 8192, 192 MB as RGB)
before decoding it: a 600-byte JPEG can claim 65535 x 65535 and the decoder would fill 12 GB."""


@dataclass(frozen=True)
class IRHeader:
    """Image-record header. ``label`` is a float, or a tuple of floats when ``flag > 0``."""

    flag: int
    label: Union[float, tuple]
    id: int
    id2: int


def pack_header(header: IRHeader, payload: bytes) -> bytes:
    """``mx.recordio.pack``: header (+ float32 label vector when it is a sequence) + payload."""
    if isinstance(header.label, (int, float, np.integer, np.floating)):
        return _HEADER.pack(0, float(header.label), int(header.id), int(header.id2)) + payload
    label = np.asarray(header.label, dtype="<f4").reshape(-1)
    return _HEADER.pack(label.size, 0.0, int(header.id), int(header.id2)) + label.tobytes() + payload


def unpack_header(buf: bytes, path="<bytes>", key=None, offset=None) -> tuple[IRHeader, bytes]:
    """``mx.recordio.unpack``: (IRHeader, payload)."""
    if len(buf) < HEADER_SIZE:
        raise RecordIOError(
            path, f"record of {len(buf)} bytes is shorter than the 24-byte header", key, offset
        )
    flag, label, id_, id2 = _HEADER.unpack_from(buf, 0)
    body = buf[HEADER_SIZE:]
    if flag > 0:
        if len(body) < 4 * flag:
            raise RecordIOError(
                path,
                f"header announces {flag} labels ({4 * flag} bytes) but only {len(body)} bytes follow",
                key,
                offset,
            )
        label = tuple(float(v) for v in np.frombuffer(body, dtype="<f4", count=flag))
        body = body[4 * flag :]
    return IRHeader(flag, label if flag > 0 else float(label), id_, id2), body


def read_property(folder) -> Optional[tuple[int, int, int]]:
    """``property`` file: ``num_classes,height,width`` (None when absent)."""
    p = Path(folder) / "property"
    if not p.is_file():
        return None
    text = p.read_bytes().decode("utf-8", errors="replace").strip()
    try:
        parts = [int(x) for x in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) != 3 or min(parts) < 0:
        raise RecordIOError(p, f"expected 'num_classes,height,width' (3 integers), got {text!r}")
    return parts[0], parts[1], parts[2]


def write_property(folder, num_classes: int, height: int, width: int) -> None:
    """Write ``property`` as insightface does: ``num_classes,h,w`` (no newline)."""
    (Path(folder) / "property").write_text(f"{num_classes},{height},{width}")


class RecordIndex(Mapping):
    """Read-only ``{key: byte offset}`` backed by two sorted int64 arrays.

    16 bytes per record instead of a dict's ~100: WebFace42M's index is ~0.7 GB, and forked
    DataLoader workers share it copy-on-write (no per-object refcounts to dirty the pages).
    Contiguous keys (the usual case) are looked up directly, others by binary search.
    """

    def __init__(self, keys, offsets):
        keys = np.asarray(keys, dtype=np.int64).reshape(-1)
        offsets = np.asarray(offsets, dtype=np.int64).reshape(-1)
        # sort by key; for a repeated key the last line wins (as a dict built line by line)
        rev = np.arange(keys.size)[::-1]
        uniq, first = np.unique(keys[rev], return_index=True)
        self.keys_array = uniq
        self.offsets_array = offsets[rev[first]]
        n = uniq.size
        self._k0 = int(uniq[0]) if n else 0
        self._contiguous = n == 0 or int(uniq[-1]) - self._k0 == n - 1

    def _pos(self, key) -> int:
        try:
            k = int(key)
        except (TypeError, ValueError):
            return -1
        if self._contiguous:
            i = k - self._k0
            return i if 0 <= i < self.keys_array.size else -1
        i = int(np.searchsorted(self.keys_array, k))
        return i if i < self.keys_array.size and int(self.keys_array[i]) == k else -1

    def offsets_of(self, keys) -> np.ndarray:
        """Vectorised lookup: int64 offsets of ``keys`` (all must exist)."""
        keys = np.asarray(keys, dtype=np.int64)
        pos = np.searchsorted(self.keys_array, keys)
        ok = (pos < self.keys_array.size) & (
            self.keys_array[np.minimum(pos, self.keys_array.size - 1)] == keys
        )
        if not ok.all():
            raise KeyError(int(keys[~ok][0]))
        return self.offsets_array[pos]

    def __getitem__(self, key) -> int:
        i = self._pos(key)
        if i < 0:
            raise KeyError(key)
        return int(self.offsets_array[i])

    def __contains__(self, key) -> bool:
        return self._pos(key) >= 0

    def __iter__(self):
        return iter(self.keys_array.tolist())

    def __len__(self) -> int:
        return int(self.keys_array.size)


def frame_record(payload: bytes, key=None) -> bytes:
    """dmlc-core framing of one record: magic, lrec, data, padding; split at aligned magics."""
    n = len(payload)
    if n >= 1 << 29:
        raise ValueError(f"record {key} of {n} bytes exceeds RecordIO's 2^29-byte limit")
    out = []
    dptr = 0
    for i in range(0, n & ~3, 4):  # split at 4-aligned occurrences of the magic (dmlc-core)
        if payload[i : i + 4] == _MAGIC_BYTES:
            cflag = 1 if dptr == 0 else 2
            # i and dptr are 4-aligned: middle parts need no padding
            out += [_MAGIC_BYTES, struct.pack("<I", (cflag << 29) | (i - dptr)), payload[dptr:i]]
            dptr = i + 4
    tail = n - dptr
    out += [_MAGIC_BYTES, struct.pack("<I", ((3 if dptr else 0) << 29) | tail), payload[dptr:]]
    out.append(b"\x00" * (((tail + 3) & ~3) - tail))
    return b"".join(out)


def peek_image_size(buf: bytes) -> Optional[tuple[int, int]]:
    """(height, width) a JPEG (first SOF marker) or PNG (IHDR) header claims; None for other bytes."""
    if buf[:8] == b"\x89PNG\r\n\x1a\n":
        if len(buf) < 24 or buf[12:16] != b"IHDR":
            return None
        w, h = struct.unpack(">II", buf[16:24])
        return h, w
    if buf[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(buf):
        if buf[i] != 0xFF:
            return None
        m = buf[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
        elif m == 0x01 or 0xD0 <= m <= 0xD9:  # markers without a length
            i += 2
        elif 0xC0 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC):  # SOFn: length, precision, h, w
            return struct.unpack(">HH", buf[i + 5 : i + 9]) if i + 9 <= len(buf) else None
        else:
            i += 2 + int.from_bytes(buf[i + 2 : i + 4], "big")
    return None
