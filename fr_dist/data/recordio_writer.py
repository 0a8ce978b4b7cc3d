"""MXNet RecordIO writer (``MXIndexedRecordIO`` semantics) and the dataset packer on top of it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from fr_dist.data.recordio_format import IRHeader, frame_record, pack_header, write_property

__all__ = ["RecordIOWriter", "write_dataset", "write_recordio"]


class RecordIOWriter:
    """dmlc-core compatible writer of ``.rec`` + ``.idx`` (``MXIndexedRecordIO`` semantics)."""

    def __init__(self, rec_path, idx_path=None):
        self.path = Path(rec_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.idx_path = Path(idx_path) if idx_path else self.path.with_suffix(".idx")
        self._f = open(self.path, "wb")
        self._idx = open(self.idx_path, "w")
        self.pos = 0
        self.offsets: dict[int, int] = {}

    def write_raw(self, key: int, payload: bytes) -> None:
        """Frame and append ``payload`` (already packed) under ``key``."""
        blob = frame_record(payload, key)
        self._idx.write(f"{key}\t{self.pos}\n")
        self.offsets[key] = self.pos
        self._f.write(blob)
        self.pos += len(blob)

    def write(self, key: int, header: IRHeader, payload: bytes) -> None:
        """``mx.recordio.pack(header, payload)`` then :meth:`write_raw`."""
        self.write_raw(key, pack_header(header, payload))

    def overwrite(self, key: int, header: IRHeader, payload: bytes) -> None:
        """Rewrite record ``key`` in place; the new record must frame to the same size."""
        blob = frame_record(pack_header(header, payload), key)
        pos = self.offsets[key]
        nxt = min((o for o in self.offsets.values() if o > pos), default=self.pos)
        if len(blob) != nxt - pos:
            raise ValueError(f"record {key}: in-place rewrite of {nxt - pos} bytes with {len(blob)}")
        self._f.flush()
        os.pwrite(self._f.fileno(), blob, pos)

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
    """Stream (label, encoded image) items into ``name.rec/.idx`` + ``property``; returns the .rec.

    ``flat``: key i holds item i (flag 0, scalar label, id = i).
    ``insightface``: items must be grouped by label (each identity contiguous, any label order);
    writes header record 0 (patched in place once the image count is known), image records 1..N
    (id = key) and one identity record per class 0..num_classes-1 with its [start, end) key range
    (an empty range for a class without images). Byte-identical to insightface/MXNet's packer.
    """
    if layout not in ("insightface", "flat"):
        raise ValueError(f"unknown layout {layout!r}; known: flat, insightface")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rec = out / f"{name}.rec"
    with RecordIOWriter(rec) as w:
        if layout == "flat":
            for key, (label, payload) in enumerate(items):
                if not 0 <= int(label) < num_classes:
                    raise ValueError(f"item {key}: label {label} outside [0, {num_classes})")
                w.write(key, IRHeader(0, float(label), key, 0), payload)
        else:
            w.write(0, IRHeader(2, (0.0, 0.0), 0, 0), b"")  # placeholder, patched below
            ranges: dict[int, list] = {}
            last, key = None, 0
            for key, (label, payload) in enumerate(items, start=1):
                label = int(label)
                if not 0 <= label < num_classes:
                    raise ValueError(f"item {key - 1}: label {label} outside [0, {num_classes})")
                if label != last:
                    if label in ranges:
                        raise ValueError(
                            f"insightface layout needs images grouped by identity; label {label} "
                            f"recurs at item {key - 1}"
                        )
                    ranges[label] = [key, key]
                    last = label
                ranges[label][1] = key + 1
                w.write(key, IRHeader(0, float(label), key, 0), payload)
            n = key
            id_start = n + 1
            prev_end = 1
            for c in range(num_classes):
                s, e = ranges.get(c, (prev_end, prev_end))
                prev_end = e
                w.write(id_start + c, IRHeader(2, (float(s), float(e)), 0, 0), b"")
            w.overwrite(0, IRHeader(2, (float(id_start), float(id_start + num_classes)), 0, 0), b"")
    write_property(out, num_classes, image_size[0], image_size[1])
    return rec


write_recordio = write_dataset
