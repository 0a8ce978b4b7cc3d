"""RecordIO against the file real MXNet 1.9.1 wrote, writer byte-compatibility, bad input.

The fixture tests run on tests/fixtures/rec_fr_dist (written by fr_dist, tools/make_test_fixtures.py)
and on ../shared/fixtures/mxnet_rec (written by MXNet) when present.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import struct
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

from fr_dist.data import IRHeader, RecordIOError, RecordIOWriter, open_recordio, write_dataset
from fr_dist.data.recordio import MAGIC, pack_header, unpack_header


@pytest.fixture(scope="module")
def fx(rec_fixture_dir):
    return rec_fixture_dir, json.loads((rec_fixture_dir / "fixture.json").read_text())


def test_fixture_layout_counts_labels(fx):
    d, meta = fx
    rec = open_recordio(d / "train.rec")
    assert rec.layout == "insightface"
    assert rec.num_images == meta["num_images"] == 200
    assert rec.num_classes == meta["identities"] == 20
    assert rec.image_keys == list(range(1, 201))
    h0, _ = rec.read(0)
    assert h0.flag == meta["train_rec"]["record0"]["flag"]
    assert list(h0.label) == meta["train_rec"]["record0"]["label"]
    labels = meta["train_rec"]["label_per_key"]
    counts = np.zeros(20, int)
    for k in rec.image_keys:
        y = rec.label(k)
        counts[y] += 1
        assert y == int(labels[str(k)])
        h, payload = rec.read(k)
        assert h.flag == 0 and h.id == k and payload[:2] == b"\xff\xd8"
    assert counts.tolist() == meta["image_counts"]
    assert [list(rec.id_range(i)) for i in range(20)] == meta["train_rec"]["id_ranges"]
    for i in range(20):  # identity records: contiguous [start, end) key ranges
        s, e = rec.id_range(i)
        assert all(rec.label(k) == i for k in range(s, e)) and e - s == meta["image_counts"][i]


def test_fixture_decode_equals_independent_decode(fx):
    d, _ = fx
    rec = open_recordio(d / "train.rec")
    for k in rec.image_keys:
        _, payload = rec.read(k)
        ref = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
        img = rec.decode(k)
        assert img.shape == (112, 112, 3) and img.dtype == np.uint8
        assert np.abs(img.astype(int) - ref.astype(int)).max() <= 1


def test_writer_bytes_identical_to_mxnet(fx, tmp_path):
    # [mxnet]: MXNet's own bytes; [fr_dist]: the committed bytes an earlier fr_dist writer made
    d, _ = fx
    rec = open_recordio(d / "train.rec")
    with RecordIOWriter(tmp_path / "copy.rec") as w:  # same records, same order, our framing
        for k in rec.keys:
            h, payload = rec.read(k)
            w.write(k, h, payload)
    assert (tmp_path / "copy.rec").read_bytes() == (d / "train.rec").read_bytes()
    assert (tmp_path / "copy.idx").read_text() == (d / "train.idx").read_text()
    # and from nothing but (label, jpeg) pairs, the whole insightface layout + property
    items = [(rec.label(k), rec.read(k)[1]) for k in rec.image_keys]
    write_dataset(tmp_path / "ds", items, num_classes=20)
    assert (tmp_path / "ds" / "train.rec").read_bytes() == (d / "train.rec").read_bytes()
    assert (tmp_path / "ds" / "train.idx").read_text() == (d / "train.idx").read_text()
    assert (tmp_path / "ds" / "property").read_text().strip() == (d / "property").read_text().strip()


def test_index_rebuilt_when_missing(fx, tmp_path):
    d, _ = fx
    shutil.copy(d / "train.rec", tmp_path / "train.rec")
    shutil.copy(d / "property", tmp_path / "property")
    rec = open_recordio(tmp_path / "train.rec")
    ref = open_recordio(d / "train.rec")
    assert rec.index_rebuilt and rec.index == ref.index
    assert rec.save_index().read_text() == (d / "train.idx").read_text()
    assert rec.layout == "insightface" and rec.num_images == 200
    assert len(list(rec.scan())) == 221


def test_flat_layout_and_vector_labels(tmp_path):
    items = [(i % 3, b"\xff\xd8payload%d" % i) for i in range(7)]
    write_dataset(tmp_path, items, num_classes=3, layout="flat")
    rec = open_recordio(tmp_path / "train.rec")
    assert rec.layout == "flat" and rec.num_images == 7 and rec.image_keys == list(range(7))
    assert [rec.label(k) for k in rec.image_keys] == [0, 1, 2, 0, 1, 2, 0]
    h, body = unpack_header(pack_header(IRHeader(0, (3.0, 7.5), 5, 9), b"xyz"))
    assert h.flag == 2 and h.label == (3.0, 7.5) and (h.id, h.id2) == (5, 9) and body == b"xyz"


def test_continuation_records_round_trip(tmp_path):
    """A payload holding the magic word at 4-aligned offsets is split like dmlc-core does."""
    magic = struct.pack("<I", MAGIC)
    payloads = [magic + b"abcd" + magic + b"xy", b"1234" + magic, magic, b"\x00" * 5, b"ab" + magic]
    with RecordIOWriter(tmp_path / "train.rec") as w:
        for k, p in enumerate(payloads):
            w.write(k, IRHeader(0, float(k), k, 0), p)
    raw = (tmp_path / "train.rec").read_bytes()
    flags, pos = [], 0
    while pos < len(raw):
        _, lrec = struct.unpack_from("<II", raw, pos)
        flags.append(lrec >> 29)
        pos += 8 + (((lrec & ((1 << 29) - 1)) + 3) & ~3)
    assert {1, 2, 3} <= set(flags)
    rec = open_recordio(tmp_path / "train.rec")
    assert rec.layout == "flat"
    for k, p in enumerate(payloads):
        h, body = rec.read(k)
        assert body == p and h.label == float(k) and rec.read_header(k) == h
    (tmp_path / "train.idx").unlink()  # the scan joins the parts too
    rebuilt = open_recordio(tmp_path / "train.rec")
    assert rebuilt.index_rebuilt and [rebuilt.read(k)[1] for k in range(len(payloads))] == payloads


def test_read_header_matches_full_read_and_threads_forks(fx):
    d, _ = fx
    rec = open_recordio(d / "train.rec")
    full = {k: rec.read(k) for k in rec.keys}
    assert all(rec.read_header(k) == full[k][0] for k in rec.keys)
    with ThreadPoolExecutor(4) as ex:  # one descriptor, pread: no shared file offset
        assert list(ex.map(lambda k: rec.read(k)[1], rec.keys)) == [full[k][1] for k in rec.keys]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:  # forked children reopen their own descriptor
        got = pool.map(_payload_len, [(rec, k) for k in rec.image_keys[:40]])
    assert got == [len(full[k][1]) for k in rec.image_keys[:40]]
    assert (rec.labels() == np.array([rec.label(k) for k in rec.image_keys])).all()


def _payload_len(args):
    rec, key = args
    return len(rec.read(key)[1])


def _small(tmp_path, n_ids=3, per=2, layout="insightface"):
    img = [cv2.imencode(".jpg", np.full((8, 8, 3), 40 * i, np.uint8))[1].tobytes() for i in range(n_ids)]
    items = [(i, img[i]) for i in range(n_ids) for _ in range(per)]
    write_dataset(tmp_path, items, num_classes=n_ids, image_size=(8, 8), layout=layout)
    return tmp_path / "train.rec"


def test_truncated_file_names_file_key_offset(tmp_path):
    rec_path = _small(tmp_path, layout="flat")
    data = rec_path.read_bytes()
    lines = (tmp_path / "train.idx").read_text().splitlines()
    off = int(lines[3].split("\t")[1])
    rec_path.write_bytes(data[: off + 20])  # record 3 loses its tail
    (tmp_path / "train.idx").write_text("\n".join(lines[:4]) + "\n")
    rec = open_recordio(rec_path)
    with pytest.raises(RecordIOError, match=r"train\.rec, key 3, byte offset \d+: truncated"):
        rec.read(3)


def test_wrong_magic(tmp_path):
    rec_path = _small(tmp_path)
    data = bytearray(rec_path.read_bytes())
    off = int((tmp_path / "train.idx").read_text().splitlines()[2].split("\t")[1])
    data[off : off + 4] = b"\x00\x11\x22\x33"
    rec_path.write_bytes(bytes(data))
    with pytest.raises(RecordIOError, match=rf"key 2, byte offset {off}: wrong magic 0x33221100"):
        open_recordio(rec_path).read(2)


def test_index_past_eof(tmp_path):
    rec_path = _small(tmp_path)
    with open(tmp_path / "train.idx", "a") as f:
        f.write("99\t999999\n")
    with pytest.raises(
        RecordIOError, match=r"train\.idx, key 99, byte offset 999999: index points past the end"
    ):
        open_recordio(rec_path)


def test_label_outside_num_classes(tmp_path):
    rec_path = _small(tmp_path)
    (tmp_path / "property").write_text("2,8,8")  # claims 2 classes, labels go to 2
    rec = open_recordio(rec_path)
    with pytest.raises(RecordIOError, match=r"key 5, byte offset \d+: label 2 outside \[0, 2\)"):
        rec.label(5)


def test_skip_bad_records_counts(tmp_path):
    from fr_dist.data.loader import RecordDataset

    rec_path = _small(tmp_path)
    (tmp_path / "property").write_text("2,8,8")
    ds = RecordDataset(rec_path, skip_bad=True)
    img, y = ds[(4, False)]  # keys 5, 6 hold label 2 -> skipped, wraps to key 1
    assert ds.bad == 2 and y == 0 and img.shape == (3, 8, 8)
    with pytest.raises(RecordIOError):
        RecordDataset(rec_path, skip_bad=False)[(4, False)]


def test_bad_property_and_index_lines(tmp_path):
    rec_path = _small(tmp_path)
    (tmp_path / "property").write_text("three,8,8")
    with pytest.raises(RecordIOError, match=r"property: expected 'num_classes,height,width'"):
        open_recordio(rec_path)
    (tmp_path / "property").write_text("3,8,8")
    (tmp_path / "train.idx").write_text("0\t0\nnot a line\n")
    with pytest.raises(RecordIOError, match=r"train\.idx: line 2 is not 'key<TAB>offset'"):
        open_recordio(rec_path)


def test_header_announcing_too_many_labels(tmp_path):
    with RecordIOWriter(tmp_path / "train.rec") as w:
        w.write_raw(0, struct.pack("<IfQQ", 1000, 0.0, 0, 0) + b"\xff\xd8")
    with pytest.raises(RecordIOError, match=r"key 0, byte offset 0: header announces 1000 labels"):
        open_recordio(tmp_path / "train.rec")


def test_flat_file_with_vector_label_image_at_key0_is_flat(tmp_path):
    with RecordIOWriter(tmp_path / "train.rec") as w:
        for k in range(3):
            w.write(k, IRHeader(2, (float(k), 5.0), k, 0), b"\xff\xd8jpeg")
    rec = open_recordio(tmp_path / "train.rec")
    assert (
        rec.layout == "flat" and rec.image_keys == [0, 1, 2] and [rec.label(k) for k in range(3)] == [0, 1, 2]
    )


def test_check_counts_bad_records(tmp_path):
    rec_path = _small(tmp_path)
    (tmp_path / "property").write_text("2,8,8")
    rec = open_recordio(rec_path)
    res = rec.check(decode=True)
    assert res["checked"] == 6 and res["bad"] == 2 and "label 2 outside [0, 2)" in res["errors"][0]
    with pytest.raises(RecordIOError, match="key 5"):
        rec.check(skip_bad=False)
