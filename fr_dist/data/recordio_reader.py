"""MXNet RecordIO reader: random access by key through the ``.idx`` (or a rebuilt index), scans.

Layouts:

* ``insightface``: key 0 is a header record (flag > 0, empty payload, label = [first identity
  key, end of identity keys]); keys 1 .. label[0]-1 are images (scalar label); identity records
  hold [start, end) image-key ranges.
* ``flat`` (im2rec): every record is an image with a scalar (or first-of-vector) label.

Reads use ``os.pread`` on a per-process descriptor (reopened after a fork), so threads and forked
DataLoader workers never share a file offset. Every malformed input raises :class:`RecordIOError`
naming the file, the key and the byte offset.
"""

from __future__ import annotations

import logging
import math
import os
import re
import struct
import threading
import warnings
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from fr_dist.data.image import decode_image
from fr_dist.data.recordio_format import (
    _INT64_MAX,
    _LEN_MASK,
    _MAGIC_BYTES,
    HEADER_SIZE,
    MAGIC,
    MAX_IMAGE_PIXELS,
    IRHeader,
    RecordIndex,
    peek_image_size,
    read_property,
    unpack_header,
)
from fr_dist.errors import RecordIOError

__all__ = ["RecordIOReader", "open_recordio"]

log = logging.getLogger("fr_dist.data.recordio")  # the public module's name, as before the split

_IMAGE_MAGICS = (b"\xff\xd8", b"\x89PNG")
_DECIMAL = re.compile(r"[+-]?[0-9]{1,19}", re.ASCII)  # an index number (int64 has 19 digits)


def _first_label(h: IRHeader) -> float:
    return h.label[0] if isinstance(h.label, tuple) else h.label


class RecordIOReader:
    """Random access by key (``.idx``, or rebuilt by a scan when missing) and sequential scan.

    Attributes: ``path``, ``idx_path``, ``size`` (bytes), ``index`` (read-only mapping key ->
    offset, :class:`RecordIndex`), ``keys`` (sorted int64 array), ``layout`` ("insightface" | "flat"), ``image_size`` ((h, w) from ``property`` or
    None), ``identity_keys`` (insightface), ``index_rebuilt``.
    """

    def __init__(self, rec_path, idx_path=None, check_labels: bool = True):
        self.path = Path(rec_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"RecordIO file not found: {self.path}")
        self.size = self.path.stat().st_size
        self.idx_path = Path(idx_path) if idx_path else self.path.with_suffix(".idx")
        self._fd: Optional[int] = None
        self._pid: Optional[int] = None
        self._lock = threading.Lock()
        if self.idx_path.is_file():
            self.index = self._read_index()
            self.index_rebuilt = False
        else:
            log.warning("%s: no index %s, rebuilding it by a scan", self.path, self.idx_path)
            offs = [off for off, _ in self._scan_offsets()]
            self.index = RecordIndex(np.arange(len(offs)), offs)
            self.index_rebuilt = True
        self.keys = self.index.keys_array  # sorted int64 keys of all records
        self._image_keys_list: Optional[list] = None
        self.check_labels = check_labels
        self._labels: Optional[np.ndarray] = None
        self._detect_layout()

    # ------------------------------------------------------------------ low level
    def _fdesc(self) -> int:
        pid = os.getpid()
        if self._fd is None or self._pid != pid:  # first use, or a forked worker: own descriptor
            with self._lock:
                if self._fd is None or self._pid != pid:
                    self._fd, self._pid = os.open(self.path, os.O_RDONLY), pid
        return self._fd

    def _pread(self, n: int, offset: int) -> bytes:
        return os.pread(self._fdesc(), n, offset)

    def _read_index(self) -> RecordIndex:
        raw = self.idx_path.read_bytes()
        lines = raw.count(b"\n") + (0 if raw.endswith(b"\n") or not raw else 1)
        flat = None
        if raw.strip() and self._one_tab_per_line(raw, lines):
            with warnings.catch_warnings():  # fast C parse; any odd line -> the careful path
                warnings.simplefilter("ignore")
                try:
                    flat = np.fromstring(raw, dtype=np.int64, sep=" ")
                except ValueError:
                    flat = None  # unparsable: take the careful path
        # numpy saturates an out-of-range integer to INT64_MAX (either sign): the careful path says so
        if flat is None or flat.size != 2 * lines or (flat.size and flat.max() == _INT64_MAX):
            flat = self._read_index_lines(raw.decode("utf-8", errors="replace"))
        if flat.size == 0:
            raise RecordIOError(self.idx_path, "index file is empty")
        keys, offs = flat[0::2], flat[1::2]
        bad = np.flatnonzero((offs < 0) | (offs > self.size - 8))  # (offs + 8 could overflow)
        if bad.size:
            i = int(bad[0])
            raise RecordIOError(
                self.idx_path,
                f"index points past the end of {self.path.name} ({self.size} bytes)",
                int(keys[i]),
                int(offs[i]),
            )
        return RecordIndex(keys, offs)

    @staticmethod
    def _one_tab_per_line(raw: bytes, lines: int) -> bool:
        """Every line is ``key<TAB>offset`` as far as separators go (no other whitespace, one tab
        per line): then 2 numbers per line on average means 2 on every line, and the fast parse holds."""
        if any(c in raw for c in (b" ", b"\r", b"\x0b", b"\x0c")):
            return False
        b = np.frombuffer(raw, dtype=np.uint8)
        tabs, ends = np.flatnonzero(b == 9), np.flatnonzero(b == 10)
        if ends.size < lines:
            ends = np.append(ends, b.size)  # the last line has no newline
        return bool(tabs.size == ends.size == lines and (tabs < ends).all() and (ends[:-1] < tabs[1:]).all())

    def _read_index_lines(self, text: str) -> np.ndarray:
        out = []
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or not all(_DECIMAL.fullmatch(p) for p in parts):
                raise RecordIOError(self.idx_path, f"line {lineno} is not 'key<TAB>offset': {line!r}")
            vals = [int(p) for p in parts]
            if not all(-_INT64_MAX - 1 <= v <= _INT64_MAX for v in vals):
                raise RecordIOError(self.idx_path, f"line {lineno}: {line!r} is out of the int64 range")
            out += vals
        return np.asarray(out, dtype=np.int64)

    def _frame(self, pos: int, key) -> tuple[int, int]:
        """(continuation flag, length) of the frame at ``pos``, checked against the file."""
        head = self._pread(8, pos)
        if len(head) < 8:
            raise RecordIOError(
                self.path,
                f"truncated file: record header past the end ({self.size} bytes)",
                key,
                pos,
            )
        magic, lrec = struct.unpack("<II", head)
        if magic != MAGIC:
            raise RecordIOError(self.path, f"wrong magic 0x{magic:08X} (expected 0x{MAGIC:08X})", key, pos)
        cflag, length = lrec >> 29, lrec & _LEN_MASK
        if pos + 8 + length > self.size:
            raise RecordIOError(
                self.path,
                f"truncated file: record of {length} bytes ends past the end of the file ({self.size} bytes)",
                key,
                pos,
            )
        return cflag, length

    def read_raw_at(self, offset: int, key=None) -> tuple[bytes, int]:
        """Payload of the record starting at ``offset`` (continuations joined) and the next offset."""
        parts, pos, first = [], offset, True
        while True:
            cflag, length = self._frame(pos, key)
            if first and cflag not in (0, 1):
                raise RecordIOError(
                    self.path,
                    f"record starts with continuation flag {cflag} (expected 0 or 1)",
                    key,
                    pos,
                )
            if not first and cflag not in (2, 3):
                raise RecordIOError(
                    self.path, f"continuation part has flag {cflag} (expected 2 or 3)", key, pos
                )
            parts.append(self._pread(length, pos + 8))
            pos += 8 + ((length + 3) & ~3)
            if cflag in (0, 3):
                break
            first = False
        return _MAGIC_BYTES.join(parts), pos

    def _scan_offsets(self) -> Iterator[tuple[int, int]]:
        pos = 0
        while pos < self.size:
            _, nxt = self.read_raw_at(pos)
            yield pos, nxt
            pos = nxt

    def scan(self) -> Iterator[tuple[int, IRHeader, bytes]]:
        """Every record in file order without the index: (byte offset, header, payload)."""
        for pos, _ in self._scan_offsets():
            raw, _ = self.read_raw_at(pos)
            h, payload = unpack_header(raw, self.path, None, pos)
            yield pos, h, payload

    # ------------------------------------------------------------------ by key
    def offset(self, key: int) -> int:
        try:
            return self.index[key]
        except KeyError:
            raise KeyError(f"{self.path}: no record with key {key}") from None

    def read(self, key: int) -> tuple[IRHeader, bytes]:
        """(header, payload) of record ``key``; payload is the encoded image for image records."""
        off = self.offset(key)
        raw, _ = self.read_raw_at(off, key)
        return unpack_header(raw, self.path, key, off)

    def read_header(self, key: int) -> IRHeader:
        """The header of ``key`` reading only its first bytes (labels without the image)."""
        off = self.offset(key)
        cflag, length = self._frame(off, key)
        if cflag != 0:  # split record: the header may straddle a part boundary
            return self.read(key)[0]
        if length < HEADER_SIZE:
            raise RecordIOError(
                self.path, f"record of {length} bytes is shorter than the 24-byte header", key, off
            )
        head = self._pread(HEADER_SIZE, off + 8)
        flag = struct.unpack_from("<I", head)[0]
        if flag > 0:
            if HEADER_SIZE + 4 * flag > length:
                return unpack_header(self._pread(length, off + 8), self.path, key, off)[0]
            head += self._pread(4 * flag, off + 8 + HEADER_SIZE)
        return unpack_header(head, self.path, key, off)[0]

    # ------------------------------------------------------------------ layout
    def _detect_layout(self) -> None:
        prop = read_property(self.path.parent)
        self.image_size = (prop[1], prop[2]) if prop is not None else None
        self.layout, self.identity_keys = "flat", []
        self._num_classes: Optional[int] = None
        h0, p0 = self.read(0) if 0 in self.index else (None, b"")
        if (
            h0 is not None
            and h0.flag >= 2
            and not p0.startswith(_IMAGE_MAGICS)
            and float(h0.label[0]).is_integer()
            and float(h0.label[1]).is_integer()
            and 1 <= h0.label[0] <= h0.label[1]
        ):
            self.layout = "insightface"
            id_start, id_end = int(h0.label[0]), int(h0.label[1])
            if id_end > len(self.index):  # keys 0 .. id_end-1 are all records: check before allocating
                raise RecordIOError(
                    self.idx_path,
                    f"the header record (label {list(h0.label)}) implies {id_end} records, the index "
                    f"holds {len(self.index)}",
                    0,
                    self.index[0],
                )
            ks = self.keys[np.searchsorted(self.keys, 1) : np.searchsorted(self.keys, id_end)]
            gap = np.flatnonzero(ks != np.arange(1, ks.size + 1))  # keys 1 .. id_end-1, all of them
            if ks.size != id_end - 1 or gap.size:
                k = int(gap[0]) + 1 if gap.size else ks.size + 1
                raise RecordIOError(
                    self.idx_path,
                    f"key {k} implied by the header record (label {list(h0.label)}) is not in the index",
                    0,
                    self.index[0],
                )
            self._image_keys = np.arange(1, id_start, dtype=np.int64)
            self.identity_keys = list(range(id_start, id_end))
            if id_end > id_start:
                self._num_classes = id_end - id_start
        else:
            self._image_keys = self.keys
        if prop is not None:
            self._num_classes = prop[0]

    @property
    def num_images(self) -> int:
        return int(self._image_keys.size)

    @property
    def image_keys(self) -> list:
        """Sorted list of the int keys holding images (cached)."""
        if self._image_keys_list is None:
            self._image_keys_list = self._image_keys.tolist()
        return self._image_keys_list

    @property
    def image_keys_array(self) -> np.ndarray:
        return self._image_keys

    @property
    def num_classes(self) -> int:
        """From ``property``, else the header record, else one scan of the labels (flat)."""
        if self._num_classes is None:
            labels = self.labels()
            self._num_classes = int(labels.max()) + 1 if labels.size else 0
        return self._num_classes

    def id_range(self, identity: int) -> tuple[int, int]:
        """[start, end) image keys of identity ``identity`` (insightface layout)."""
        if self.layout != "insightface":
            raise ValueError(f"{self.path}: id ranges exist only in the insightface layout")
        h = self.read_header(self.identity_keys[identity])
        if (
            not isinstance(h.label, tuple)
            or len(h.label) < 2
            or not all(math.isfinite(v) and v == int(v) for v in h.label[:2])
        ):
            raise RecordIOError(
                self.path,
                f"identity record has label {h.label!r}, expected [start, end)",
                self.identity_keys[identity],
                self.index[self.identity_keys[identity]],
            )
        return int(h.label[0]), int(h.label[1])

    def label_of(self, key: int, header: IRHeader) -> int:
        """Class of image record ``key`` from its header, range-checked against num_classes."""
        lab = _first_label(header)
        if not math.isfinite(lab) or int(lab) != lab or not 0 <= lab < 2**31:  # NaN, inf, 2.5, -1, 3e38
            raise RecordIOError(self.path, f"label {lab!r} is not a class index", key, self.index[key])
        y = int(lab)
        if self.check_labels and self._num_classes is not None and y >= self._num_classes:
            raise RecordIOError(
                self.path,
                f"label {y} outside [0, {self._num_classes}) (num_classes)",
                key,
                self.index[key],
            )
        return y

    def label(self, key: int) -> int:
        """Int class of image record ``key``."""
        return self.label_of(key, self.read_header(key))

    def labels(self) -> np.ndarray:
        """int64 labels of all image records in ``image_keys`` order (headers only; cached).

        Each is checked as :meth:`label_of` checks it (a class index: an integer >= 0, and below
        ``num_classes`` when that is known): a 2.5, -1 or NaN label raises, never truncates."""
        if self._labels is None:
            out = np.empty(self.num_images, dtype=np.int64)
            for i, k in enumerate(self.image_keys):
                out[i] = self.label_of(k, self.read_header(k))
            self._labels = out
        return self._labels

    def decode_payload(self, key: int, payload: bytes) -> np.ndarray:
        claimed = peek_image_size(payload)
        if claimed is not None and claimed[0] * claimed[1] > MAX_IMAGE_PIXELS:
            raise RecordIOError(
                self.path,
                f"image header claims {claimed[0]} x {claimed[1]} pixels (more than {MAX_IMAGE_PIXELS}): "
                "refused before decoding",
                key,
                self.index[key],
            )
        try:
            return decode_image(payload)
        except Exception as e:
            raise RecordIOError(
                self.path,
                f"cannot decode image payload of {len(payload)} bytes ({e})",
                key,
                self.index[key],
            ) from None

    def decode(self, key: int) -> np.ndarray:
        """HxWx3 uint8 RGB image of record ``key``."""
        _, payload = self.read(key)
        return self.decode_payload(key, payload)

    def sample(self, key: int) -> tuple[np.ndarray, int]:
        """(HxWx3 uint8 RGB, label) of image record ``key`` with a single read."""
        h, payload = self.read(key)
        return self.decode_payload(key, payload), self.label_of(key, h)

    def check(self, decode: bool = False, skip_bad: bool = True) -> dict:
        """Read every image record (and decode it with ``decode``); count and log bad ones.

        Returns {"checked", "bad", "errors": first 20 messages}; raises on the first bad record
        when ``skip_bad`` is False.
        """
        bad, errors = 0, []
        for k in self.image_keys:
            try:
                h, payload = self.read(k)
                self.label_of(k, h)
                if decode:
                    self.decode_payload(k, payload)
            except RecordIOError as e:
                if not skip_bad:
                    raise
                bad += 1
                if len(errors) < 20:
                    errors.append(str(e))
                log.warning("bad record %d (%d so far): %s", k, bad, e)
        return {"checked": self.num_images, "bad": bad, "errors": errors}

    def save_index(self, idx_path=None) -> Path:
        """Write the (e.g. rebuilt) index as ``key<TAB>offset`` lines; default: ``self.idx_path``."""
        target = Path(idx_path) if idx_path else self.idx_path
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        idx = self.index
        tmp.write_text(
            "".join(f"{k}\t{o}\n" for k, o in zip(idx.keys_array.tolist(), idx.offsets_array.tolist()))
        )
        os.replace(tmp, target)
        return target

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __getstate__(self):  # picklable for spawn-based workers: reopen on first use
        st = dict(self.__dict__)
        st["_fd"], st["_pid"], st["_lock"] = None, None, None
        return st

    def __setstate__(self, st):
        self.__dict__.update(st)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.keys)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return (
            f"RecordIOReader({str(self.path)!r}, layout={self.layout}, images={self.num_images}, "
            f"records={len(self.keys)})"
        )


def open_recordio(path, idx_path=None, check_labels: bool = True) -> RecordIOReader:
    """Open ``train.rec`` (``train.idx`` beside it, or rebuild the index by scanning)."""
    path = Path(path)
    if path.is_dir():
        path = path / "train.rec"
    return RecordIOReader(path, idx_path, check_labels=check_labels)
