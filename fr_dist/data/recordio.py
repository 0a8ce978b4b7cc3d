"""MXNet RecordIO, read and written natively (byte-compatible with files MXNet / dmlc-core write).

Record framing (dmlc-core ``recordio.cc``): ``uint32 magic 0xCED7230A``, ``uint32 lrec``
(top 3 bits: continuation flag, low 29 bits: length), payload, zero padding to 4 bytes. A payload
that contains the magic word at a 4-aligned position is split there: parts carry flags
1 (first), 2 (middle), 3 (last), and the reader re-inserts the magic between parts.

Payload (``mx.recordio.pack``): 24-byte header ``<IfQQ`` (flag, label, id, id2); if flag > 0,
``flag`` float32 labels follow (and the scalar label field is 0). Then the encoded image.
The ``.idx`` file is text, ``key\\toffset`` per line.

Layouts:
* ``insightface``: key 0 is a header record, flag > 0, label = [first identity key, end];
  keys 1 .. label[0]-1 are images (scalar label); identity records hold [start, end) key ranges.
* ``flat`` (im2rec): every record is an image with a scalar (or first-of-vector) label.

Reads use ``os.pread`` on a per-process descriptor, so threads and forked DataLoader workers
never share a file offset.
"""

from __future__ import annotations

import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import numpy as np

__all__ = [
    "MAGIC",
    "IRHeader",
    "RecordIOError",
    "RecordIOReader",
    "RecordIOWriter",
    "open_recordio",
    "pack_header",
    "unpack_header",
    "read_property",
    "write_property",
]

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_HEADER = struct.Struct("<IfQQ")
HEADER_SIZE = _HEADER.size  # 24
_LEN_MASK = (1 << 29) - 1


class RecordIOError(ValueError):
    """A malformed RecordIO file; the message names the file, key and byte offset."""

    def __init__(self, path, msg: str, key: Optional[int] = None, offset: Optional[int] = None):
        where = f"{path}"
        if key is not None:
            where += f", key {key}"
        if offset is not None:
            where += f", byte offset {offset}"
        super().__init__(f"{where}: {msg}")
        self.path, self.key, self.offset = str(path), key, offset


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
    label = np.asarray(header.label, dtype=np.float32).reshape(-1)
    return _HEADER.pack(label.size, 0.0, int(header.id), int(header.id2)) + label.tobytes() + payload


def unpack_header(buf: bytes, path="<bytes>", key=None, offset=None) -> tuple[IRHeader, bytes]:
    """``mx.recordio.unpack``: (IRHeader, payload)."""
    if len(buf) < HEADER_SIZE:
        raise RecordIOError(path, f"record of {len(buf)} bytes is shorter than the 24-byte header", key, offset)
    flag, label, id_, id2 = _HEADER.unpack_from(buf, 0)
    body = buf[HEADER_SIZE:]
    if flag > 0:
        if len(body) < 4 * flag:
            raise RecordIOError(path, f"header announces {flag} labels but the record is too short", key, offset)
        label = tuple(float(v) for v in np.frombuffer(body, dtype="<f4", count=flag))
        body = body[4 * flag :]
    return IRHeader(flag, label if flag > 0 else float(label), id_, id2), body


def read_property(folder) -> Optional[tuple[int, int, int]]:
    """``property`` file: ``num_classes,height,width`` (None when absent)."""
    p = Path(folder) / "property"
    if not p.is_file():
        return None
    parts = [int(x) for x in p.read_text().strip().split(",")]
    if len(parts) != 3:
        raise RecordIOError(p, f"expected 'num_classes,h,w', got {p.read_text().strip()!r}")
    return parts[0], parts[1], parts[2]


def write_property(folder, num_classes: int, height: int, width: int) -> None:
    (Path(folder) / "property").write_text(f"{num_classes},{height},{width}")


# ----------------------------------------------------------------------------- reader


class RecordIOReader:
    """Random access by key (through ``.idx``, rebuilt by a scan when missing) and sequential scan."""

    def __init__(self, rec_path, idx_path=None, check_labels: bool = True):
        self.path = Path(rec_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"RecordIO file not found: {self.path}")
        self.size = self.path.stat().st_size
        self.idx_path = Path(idx_path) if idx_path else self.path.with_suffix(".idx")
        self._fd, self._pid = None, None
        self._lock = threading.Lock()
        if self.idx_path.is_file():
            self.index = self._read_index()
            self.index_rebuilt = False
        else:
            self.index = {k: off for k, (off, _) in enumerate(self._scan_offsets())}
            self.index_rebuilt = True
        self.keys = sorted(self.index)
        self._detect_layout()
        self.check_labels = check_labels

    # -- low level
    def _fdesc(self) -> int:
        pid = os.getpid()
        if self._fd is None or self._pid != pid:  # first use, or a forked worker: own descriptor
            with self._lock:
                self._fd, self._pid = os.open(self.path, os.O_RDONLY), pid
        return self._fd

    def _pread(self, n: int, offset: int) -> bytes:
        return os.pread(self._fdesc(), n, offset)

    def _read_index(self) -> dict:
        index = {}
        for lineno, line in enumerate(self.idx_path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            try:
                key, off = int(parts[0]), int(parts[1])
            except (ValueError, IndexError):
                raise RecordIOError(self.idx_path, f"line {lineno} is not 'key<TAB>offset': {line!r}") from None
            if off < 0 or off + 8 > self.size:
                raise RecordIOError(
                    self.idx_path, f"index points past the end of {self.path.name} ({self.size} bytes)", key, off
                )
            index[key] = off
        return index

    def read_raw_at(self, offset: int, key=None) -> tuple[bytes, int]:
        """Payload of the record starting at ``offset`` (continuations joined) and the next offset."""
        parts, pos = [], offset
        while True:
            head = self._pread(8, pos)
            if len(head) < 8:
                raise RecordIOError(self.path, "truncated file: record header past the end", key, pos)
            magic, lrec = struct.unpack("<II", head)
            if magic != MAGIC:
                raise RecordIOError(self.path, f"wrong magic 0x{magic:08X} (expected 0x{MAGIC:08X})", key, pos)
            cflag, length = lrec >> 29, lrec & _LEN_MASK
            data = self._pread(length, pos + 8)
            if len(data) < length:
                raise RecordIOError(
                    self.path, f"truncated file: record of {length} bytes has only {len(data)}", key, pos
                )
            parts.append(data)
            pos += 8 + ((length + 3) & ~3)
            if cflag in (0, 3):
                break
            if cflag not in (1, 2):
                raise RecordIOError(self.path, f"invalid continuation flag {cflag}", key, pos)
        return _MAGIC_BYTES.join(parts), pos

    def _scan_offsets(self) -> Iterator[tuple[int, int]]:
        pos = 0
        while pos < self.size:
            _, nxt = self.read_raw_at(pos)
            yield pos, nxt
            pos = nxt

    def scan(self) -> Iterator[tuple[IRHeader, bytes]]:
        """Every record in file order, without the index."""
        for pos, _ in self._scan_offsets():
            raw, _ = self.read_raw_at(pos)
            yield unpack_header(raw, self.path, None, pos)

    # -- by key
    def offset(self, key: int) -> int:
        try:
            return self.index[key]
        except KeyError:
            raise KeyError(f"{self.path}: no record with key {key}") from None

    def read(self, key: int) -> tuple[IRHeader, bytes]:
        off = self.offset(key)
        raw, _ = self.read_raw_at(off, key)
        return unpack_header(raw, self.path, key, off)

    def read_header(self, key: int) -> IRHeader:
        return self.read(key)[0]

    # -- layout
    def _detect_layout(self) -> None:
        first = self.keys[0] if self.keys else None
        h0 = self.read_header(first) if first is not None else None
        prop = read_property(self.path.parent)
        if h0 is not None and first == 0 and h0.flag > 0 and len(h0.label) >= 2 and h0.label[0] >= 1:
            self.layout = "insightface"
            id_start, id_end = int(h0.label[0]), int(h0.label[1])
            self._image_keys = np.arange(1, id_start, dtype=np.int64)
            self.identity_keys = list(range(id_start, id_end))
            self._num_classes = id_end - id_start
        else:
            self.layout = "flat"
            self._image_keys = np.asarray(self.keys, dtype=np.int64)
            self.identity_keys = []
            self._num_classes = None
        if prop is not None:
            self._num_classes = prop[0]
            self.image_size = (prop[1], prop[2])
        else:
            self.image_size = None
        missing = [int(k) for k in self._image_keys[:1].tolist() + self._image_keys[-1:].tolist() if k not in self.index]
        if missing:
            raise RecordIOError(self.idx_path, f"image key {missing[0]} announced by the header is not in the index")

    @property
    def num_images(self) -> int:
        return int(self._image_keys.size)

    @property
    def image_keys(self) -> list:
        return self._image_keys.tolist()

    @property
    def image_keys_array(self) -> np.ndarray:
        return self._image_keys

    @property
    def num_classes(self) -> int:
        if self._num_classes is None:  # flat file without a property file: scan labels once
            self._num_classes = int(max(self.label(k) for k in self.keys)) + 1 if self.keys else 0
        return self._num_classes

    def id_range(self, identity: int) -> tuple[int, int]:
        """[start, end) image keys of identity ``identity`` (insightface layout)."""
        h = self.read_header(self.identity_keys[identity])
        return int(h.label[0]), int(h.label[1])

    def label(self, key: int) -> int:
        h = self.read_header(key)
        lab = h.label[0] if isinstance(h.label, tuple) else h.label
        y = int(lab)
        if self.check_labels and self._num_classes is not None and not 0 <= y < self._num_classes:
            raise RecordIOError(
                self.path, f"label {y} outside [0, {self._num_classes}) (num_classes)", key, self.index[key]
            )
        return y

    def decode(self, key: int) -> np.ndarray:
        from fr_dist.data.image import decode_image

        _, payload = self.read(key)
        try:
            return decode_image(payload)
        except Exception as e:
            raise RecordIOError(self.path, f"cannot decode image ({e})", key, self.index[key]) from None

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


def open_recordio(path, idx_path=None, check_labels: bool = True) -> RecordIOReader:
    """Open ``train.rec`` (``train.idx`` beside it, or rebuild the index by scanning)."""
    return RecordIOReader(path, idx_path, check_labels=check_labels)


# ----------------------------------------------------------------------------- writer


class RecordIOWriter:
    """dmlc-core compatible writer of ``.rec`` + ``.idx`` (``MXIndexedRecordIO`` semantics)."""

    def __init__(self, rec_path, idx_path=None):
        self.path = Path(rec_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.idx_path = Path(idx_path) if idx_path else self.path.with_suffix(".idx")
        self._f = open(self.path, "wb")
        self._idx = open(self.idx_path, "w")
        self.pos = 0

    def write_raw(self, key: int, payload: bytes) -> None:
        self._idx.write(f"{key}\t{self.pos}\n")
        n = len(payload)
        if n >= 1 << 29:
            raise ValueError(f"record {key} of {n} bytes exceeds RecordIO's 2^29 limit")
        out = []
        dptr = 0
        lower = n & ~3
        for i in range(0, lower, 4):  # split at 4-aligned occurrences of the magic (dmlc-core)
            if payload[i : i + 4] == _MAGIC_BYTES:
                out += [_MAGIC_BYTES, struct.pack("<I", ((1 if dptr == 0 else 2) << 29) | (i - dptr)), payload[dptr:i]]
                dptr = i + 4
        out += [_MAGIC_BYTES, struct.pack("<I", ((3 if dptr else 0) << 29) | (n - dptr)), payload[dptr:]]
        pad = ((n + 3) & ~3) - n
        if pad:
            out.append(b"\x00" * pad)
        blob = b"".join(out)
        self._f.write(blob)
        self.pos += len(blob)

    def write(self, key: int, header: IRHeader, payload: bytes) -> None:
        self.write_raw(key, pack_header(header, payload))

    def close(self) -> None:
        self._f.close()
        self._idx.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_dataset(
    out_dir,
    items: Iterable[tuple[int, bytes]],
    num_classes: int,
    image_size: tuple[int, int] = (112, 112),
    layout: str = "insightface",
    name: str = "train",
) -> Path:
    """Write (label, encoded image) items as ``name.rec/.idx`` + ``property``.

    ``insightface`` needs the items grouped by label (contiguous identities, any label order);
    it writes header record 0, image records 1..N and one identity record per label.
    """
    if layout not in ("insightface", "flat"):
        raise ValueError(f"unknown layout {layout!r}; known: insightface, flat")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rec = out / f"{name}.rec"
    items = list(items)
    with RecordIOWriter(rec) as w:
        if layout == "flat":
            for key, (label, payload) in enumerate(items):
                w.write(key, IRHeader(0, float(label), key, 0), payload)
        else:
            n = len(items)
            ranges: dict[int, list] = {}
            order = []
            for key, (label, _) in enumerate(items, start=1):
                if label not in ranges:
                    ranges[label] = [key, key]
                    order.append(label)
                elif ranges[label][1] != key - 1:
                    raise ValueError(f"insightface layout needs images grouped by identity; label {label} recurs")
                ranges[label][1] = key
            id_start = n + 1
            id_end = id_start + len(order)
            w.write(0, IRHeader(2, (float(id_start), float(id_end)), 0, 0), b"")
            for key, (label, payload) in enumerate(items, start=1):
                w.write(key, IRHeader(0, float(label), key, 0), payload)
            for j, label in enumerate(sorted(order)):
                s, e = ranges[label]
                w.write(id_start + j, IRHeader(2, (float(s), float(e + 1)), 0, 0), b"")
    write_property(out, num_classes, image_size[0], image_size[1])
    return rec
