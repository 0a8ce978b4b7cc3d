"""Property-based fuzzing of fr_dist's file readers, and one plain regression test per bug it found.

Readers: RecordIO (``.rec`` + ``.idx`` + ``property``, the index rebuild), the insightface ``.bin``
pair file (restricted unpickler + image decode), the IJB meta files, the config loader (YAML recipes +
dotted overrides), the checkpoint verifier (meta.json sizes + CRC-32; zip CRCs of old checkpoints).
Inputs: valid small files (written by fr_dist's own writers, or the committed fixtures) truncated,
byte-flipped, with bytes inserted or deleted, length / magic words overwritten, records inserted,
plus generated text (index lines, IJB rows, YAML, overrides) and generated pickle programs.

Properties: only the project's own error types come out (``fr_dist.errors``: RecordIOError,
DataFileError, ConfigError, CheckpointError; the verifier returns its reason), never a hang (small
inputs + a per-test pytest-timeout), a crash or a MemoryError, and no silent wrong result where a length
or a checksum can tell (a record cut by a truncation raises, a damaged checksummed checkpoint is
reported, an old checkpoint that verifies loads equal to the original).

Runs ``FR_DIST_FUZZ_EXAMPLES`` examples per property (default 150, derandomized for CI); set it to
run more, then each run draws new inputs: ``FR_DIST_FUZZ_EXAMPLES=5000 pytest tests/unit/test_fuzz_readers.py``.
"""

from __future__ import annotations

import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("hypothesis", reason="the fuzz tests need hypothesis (pip install -e .[test])")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fr_dist.checkpoint import atomic, layout
from fr_dist.checkpoint.manager import resume_path
from fr_dist.data.ijb_meta import read_ijb_meta
from fr_dist.data.image import encode_jpeg
from fr_dist.data.pairs import read_bin, write_bin
from fr_dist.data.recordio import (
    MAGIC,
    IRHeader,
    RecordIOReader,
    RecordIOWriter,
    write_dataset,
)
from fr_dist.errors import CheckpointError, ConfigError, DataFileError, RecordIOError
from fr_dist.eval.verification import load_bin
from fr_dist.train.config_load import field_info, load_config, save_config

pytestmark = pytest.mark.timeout(300)  # a hang (an alias bomb, a bogus length) fails, not blocks

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"

EXAMPLES = int(os.environ.get("FR_DIST_FUZZ_EXAMPLES", "150"))
settings.register_profile(
    "fr_dist_fuzz",
    max_examples=EXAMPLES,
    derandomize="FR_DIST_FUZZ_EXAMPLES" not in os.environ,  # CI: the same inputs every run
    deadline=None,  # no per-example deadline (a loaded CI machine is slow); a hang trips pytestmark's timeout
    database=None,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # tmp_path is shared by the examples: each rewrites its files
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)
FUZZ = settings.get_profile("fr_dist_fuzz")


# ----------------------------------------------------------------------------- byte mutations

U32_VALUES = [0, 1, 3, 4, 23, 24, 0x1FFFFFFF, 0x20000000, 0x3FFFFFFF, 0x7FFFFFFF, 0xFFFFFFFF, MAGIC]
_op = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 1 << 20)),
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 20), st.integers(1, 16)),
    st.tuples(
        st.just("u32"), st.integers(0, 1 << 20), st.sampled_from(U32_VALUES) | st.integers(0, 2**32 - 1)
    ),
)
MUTATIONS = st.lists(_op, min_size=1, max_size=3)


def mutate(data: bytes, ops, anchors=()) -> bytes:
    """Apply ``ops``; a position is taken modulo the length, and for ``u32`` it lands on an anchor
    (a frame start, a header field) when ``anchors`` are given, else on a 4-aligned offset."""
    b = bytearray(data)
    for op in ops:
        kind, pos = op[0], op[1] % (len(b) + 1)
        if kind == "truncate":
            del b[pos:]
        elif kind == "flip" and b:
            b[pos % len(b)] ^= op[2]
        elif kind == "insert":
            b[pos:pos] = op[2]
        elif kind == "delete":
            del b[pos : pos + op[2]]
        elif kind == "u32" and len(b) >= 4:
            at = anchors[op[1] % len(anchors)] if anchors else (pos & ~3)
            at = min(at, len(b) - 4)
            b[at : at + 4] = struct.pack("<I", op[2])
    return bytes(b)


# ----------------------------------------------------------------------------- RecordIO


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return encode_jpeg(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), quality=50)


def _small_sets() -> dict:
    """{name: (rec, idx, property, anchors)}: an insightface-layout set (3 identities, 6 images) and a
    flat set whose payloads hold the magic word (continuation frames), written by fr_dist's writers."""
    out = {}
    with tempfile.TemporaryDirectory() as d:
        items = [(c, _jpeg(10 * c + i)) for c in range(3) for i in range(2)]
        rec = write_dataset(Path(d) / "ins", items, num_classes=3, image_size=(8, 8))
        out["insightface"] = (rec.read_bytes(), rec.with_suffix(".idx").read_bytes(), b"3,8,8")
        rec = Path(d) / "flat" / "train.rec"
        rec.parent.mkdir()
        magic = struct.pack("<I", MAGIC)
        with RecordIOWriter(rec) as w:
            for k in range(4):
                payload = _jpeg(k) + b"\x00" * ((-len(_jpeg(k))) % 4) + magic + b"tail" + magic * k
                w.write(k, IRHeader(0, float(k % 2), k, 0), payload)
        out["flat"] = (rec.read_bytes(), rec.with_suffix(".idx").read_bytes(), None)
    for name, (rec_b, idx_b, prop) in out.items():
        offs = [int(line.split()[1]) for line in idx_b.decode().split("\n") if line]
        anchors = sorted({a for o in offs for a in (o, o + 4, o + 8, o + 12, o + 16, o + 20)})
        out[name] = (rec_b, idx_b, prop, anchors)
    return out


SETS = _small_sets()


def _write_set(folder: Path, rec: bytes, idx, prop) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in (("train.rec", rec), ("train.idx", idx), ("property", prop)):
        p = folder / name
        if data is None:
            p.unlink(missing_ok=True)
        else:
            p.write_bytes(data)
    return folder / "train.rec"


def _exercise_rec(path: Path) -> None:
    """Every reading entry point; each may raise RecordIOError, nothing else."""
    try:
        r = RecordIOReader(path)
    except RecordIOError:
        return
    calls = [lambda: r.num_classes, r.labels, lambda: r.check(decode=True), lambda: list(r.scan())]
    for k in r.keys.tolist():
        calls += [lambda k=k: r.read(k), lambda k=k: r.read_header(k)]
    for k in r.image_keys:
        calls += [lambda k=k: r.sample(k), lambda k=k: r.label(k)]
    calls += [lambda i=i: r.id_range(i) for i in range(len(r.identity_keys))]
    for call in calls:
        try:
            call()
        except RecordIOError:
            pass
    assert all(0 <= o <= r.size - 8 for o in r.index.offsets_array.tolist())
    r.close()


@FUZZ
@given(
    name=st.sampled_from(sorted(SETS)),
    rec_ops=MUTATIONS,
    idx_ops=st.none() | MUTATIONS,
    keep_idx=st.booleans(),
    prop=st.none() | st.binary(max_size=12) | st.sampled_from([b"3,8,8", b"1,8,8", b"0,0,0", b"-1,8,8"]),
)
def test_fuzz_recordio_mutated_files(tmp_path, name, rec_ops, idx_ops, keep_idx, prop):
    rec, idx, _, anchors = SETS[name]
    rec = mutate(rec, rec_ops, anchors)
    idx = (mutate(idx, idx_ops) if idx_ops else idx) if keep_idx else None
    _exercise_rec(_write_set(tmp_path / "set", rec, idx, prop))


@FUZZ
@given(
    name=st.sampled_from(sorted(SETS)),
    at=st.integers(0, 1 << 16),
    payload=st.binary(max_size=40),
    label=st.floats(allow_nan=True, allow_infinity=True, width=32) | st.integers(0, 5).map(float),
    keep_idx=st.booleans(),
)
def test_fuzz_recordio_inserted_record(tmp_path, name, at, payload, label, keep_idx):
    """A well-framed record inserted at a frame boundary: offsets after it shift (or the rebuild sees it)."""
    rec, idx, prop, _ = SETS[name]
    offs = [int(line.split()[1]) for line in idx.decode().split("\n") if line] + [len(rec)]
    pos = offs[at % len(offs)]
    with tempfile.TemporaryDirectory() as d:
        with RecordIOWriter(Path(d) / "one.rec") as w:
            w.write(0, IRHeader(0, label, 0, 0), payload)
        frame = (Path(d) / "one.rec").read_bytes()
    _exercise_rec(
        _write_set(tmp_path / "set", rec[:pos] + frame + rec[pos:], idx if keep_idx else None, prop)
    )


@FUZZ
@given(name=st.sampled_from(sorted(SETS)), cut=st.integers(0, 1 << 16))
def test_fuzz_recordio_truncation_is_never_silent(tmp_path, name, cut):
    """With the index: a record whose bytes the truncation cut raises; every other reads unchanged."""
    rec, idx, prop, _ = SETS[name]
    cut %= len(rec)
    whole = RecordIOReader(_write_set(tmp_path / "whole", rec, idx, prop))
    path = _write_set(tmp_path / "cut", rec[:cut], idx, prop)
    try:
        r = RecordIOReader(path)
    except RecordIOError:
        return  # the index points past the end, or record 0 (the header record) was cut
    for k in whole.keys.tolist():
        try:
            got = r.read(k)
        except RecordIOError:
            assert _data_end(whole, k) > cut
            continue
        assert _data_end(whole, k) <= cut and got == whole.read(k)


def _data_end(r: RecordIOReader, key: int) -> int:
    """Offset just past the last payload byte of ``key`` (its last frame's padding excluded)."""
    pos = r.offset(key)
    while True:
        cflag, length = r._frame(pos, key)
        if cflag in (0, 3):
            return pos + 8 + length
        pos += 8 + ((length + 3) & ~3)


@FUZZ
@given(
    payloads=st.lists(
        st.lists(st.binary(max_size=9) | st.just(struct.pack("<I", MAGIC)), max_size=6).map(b"".join),
        min_size=1,
        max_size=6,
    )
)
def test_fuzz_recordio_index_rebuild_equals_written_index(tmp_path, payloads):
    """Random payloads (the magic word anywhere: split records): the rebuilt index is the writer's."""
    rec = tmp_path / "r" / "train.rec"
    rec.parent.mkdir(exist_ok=True)
    with RecordIOWriter(rec) as w:
        for k, p in enumerate(payloads):
            w.write(k, IRHeader(0, float(k), k, 0), p)
    written = RecordIOReader(rec)
    rec.with_suffix(".idx").unlink()
    rebuilt = RecordIOReader(rec)
    assert (
        rebuilt.index_rebuilt and rebuilt.index.offsets_array.tolist() == written.index.offsets_array.tolist()
    )
    for k, p in enumerate(payloads):
        assert rebuilt.read(k) == (IRHeader(0, float(k), k, 0), p)
        assert rebuilt.read_header(k) == IRHeader(0, float(k), k, 0)


_INDEX_NUMBER = st.one_of(
    st.integers(-5, 5000),
    st.sampled_from([2**63 - 1, -(2**63), 2**63, 10**20, -(10**20), 2**64]),
).map(str) | st.sampled_from(["", "x", "1.5", "1e3", "0x10", "1_0", "+3", "٣", "\x00", " "])
_INDEX_LINE = st.lists(_INDEX_NUMBER, min_size=0, max_size=3).flatmap(
    lambda parts: st.sampled_from(["\t", " ", "\t\t", "\r", ","]).map(lambda sep: sep.join(parts))
)


@FUZZ
@given(
    name=st.sampled_from(sorted(SETS)),
    lines=st.lists(_INDEX_LINE, max_size=8),
    end=st.sampled_from(["\n", "\r\n", "\n\n", ""]),
)
def test_fuzz_recordio_index_text(tmp_path, name, lines, end):
    rec, _, prop, _ = SETS[name]
    idx = ("\n".join(lines) + end).encode()
    _exercise_rec(_write_set(tmp_path / "set", rec, idx, prop))
    try:
        r = RecordIOReader(tmp_path / "set" / "train.rec")
    except RecordIOError:
        return
    # what the reader accepted is what the lines say (no saturated or re-paired numbers)
    pairs = [ln.split() for ln in idx.decode().split("\n") if ln.strip()]
    want = {}
    for k, o in pairs:
        want[int(k)] = int(o)
    assert dict(zip(r.keys.tolist(), r.index.offsets_array.tolist())) == want


@FUZZ
@given(
    flag=st.integers(0, 6) | st.sampled_from([2**31, 2**32 - 1]),
    labels=st.lists(
        st.floats(allow_nan=True, allow_infinity=True, width=32)
        | st.sampled_from([0.0, 1.0, 2.0, 3.0, 5.0, 7.0, 1e9, 3e38, -1.0, 2.5]),
        min_size=0,
        max_size=6,
    ),
    key0=st.booleans(),
    image_label=st.floats(allow_nan=True, allow_infinity=True, width=32)
    | st.sampled_from([0.0, 1.0, 2.5, -3.0]),
)
def test_fuzz_recordio_header_values(tmp_path, flag, labels, key0, image_label):
    """Any header values (bogus label counts, NaN / huge / fractional labels, a header record whose
    identity range points anywhere): RecordIOError or labels that are exactly the headers' values."""
    rec = tmp_path / "h" / "train.rec"
    rec.parent.mkdir(exist_ok=True)
    with RecordIOWriter(rec) as w:
        body = struct.pack("<IfQQ", flag, 0.0, 0, 0) + np.asarray(labels, "<f4").tobytes()
        w.write_raw(0 if key0 else 9, body)
        for k in range(1, 4):
            w.write(k, IRHeader(0, image_label if k == 2 else 0.0, k, 0), _jpeg(k))
        w.write(4, IRHeader(2, (1.0, 4.0), 0, 0), b"")
    _exercise_rec(rec)
    try:
        r = RecordIOReader(rec)
        got = r.labels()
    except RecordIOError:
        return
    for k, y in zip(r.image_keys, got.tolist()):
        h = r.read_header(k)
        assert float(y) == (h.label[0] if isinstance(h.label, tuple) else h.label)


# ----------------------------------------------------------------------------- .bin pair files


def _bin_variants() -> dict:
    """Small .bin files the way writers make them: fr_dist's (protocol 4), Python 3 at protocol 2
    (``_codecs.encode``), numpy issame / uint8 and object image arrays (``_reconstruct`` + BUILD)."""
    imgs, issame = read_bin(FIXTURES / "rec_fr_dist" / "pairs.bin")
    imgs, issame = imgs[:4], issame[:2]
    out = {}
    with tempfile.TemporaryDirectory() as d:
        write_bin(Path(d) / "a.bin", imgs, issame)
        out["fr_dist"] = (Path(d) / "a.bin").read_bytes()
    out["proto2"] = pickle.dumps((imgs, issame), protocol=2)
    out["numpy"] = pickle.dumps(([np.frombuffer(b, np.uint8) for b in imgs], np.array(issame)), protocol=2)
    out["object_array"] = pickle.dumps((np.array(imgs, dtype=object), np.array(issame)), protocol=4)
    return out


BINS = _bin_variants()


def _exercise_bin(path: Path) -> None:
    for fn in (read_bin, lambda p: load_bin(p, (16, 16))):
        try:
            fn(path)
        except DataFileError:
            pass


@FUZZ
@given(name=st.sampled_from(sorted(BINS)), ops=MUTATIONS)
def test_fuzz_bin_mutated_files(tmp_path, name, ops):
    data = mutate(BINS[name], ops)
    (tmp_path / "p.bin").write_bytes(data)
    _exercise_bin(tmp_path / "p.bin")
    if len(data) < len(BINS[name]) and BINS[name].startswith(data):  # a pure truncation
        with pytest.raises(DataFileError):
            read_bin(tmp_path / "p.bin")


_GLOBALS = [
    b"c_codecs\nencode\n",
    b"c__builtin__\nbytearray\n",
    b"cbuiltins\nbytearray\n",
    b"cnumpy\nndarray\n",
    b"cnumpy\ndtype\n",
    b"cnumpy\nbool_\n",
    b"cnumpy.core.multiarray\n_reconstruct\n",
    b"cnumpy._core.multiarray\n_reconstruct\n",
    b"cnumpy._core.multiarray\nscalar\n",
    b"cposix\nsystem\n",
    b"cbuiltins\neval\n",
]


def _arg(fmt: str):
    return st.integers(0, 2 ** (8 * struct.calcsize(fmt)) - 1).map(lambda v: struct.pack(fmt, v))


_SIZED = st.sampled_from([0, 1, 2, 3, 8, 2**31 - 1, 2**32 - 1, 2**40]) | st.integers(0, 64)
_PICKLE_OP = st.one_of(
    st.sampled_from(
        [b"N", b"\x88", b"\x89", b"]", b")", b"}", b"(", b"a", b"e", b"t", b"\x85", b"\x86", b"\x87"]
        + [b"s", b"u", b"l", b"0", b"1", b"2", b"R", b"b", b"\x81", b"o", b"\x93", b"\x94", b"d"]
    ),
    st.sampled_from(_GLOBALS),
    st.tuples(st.sampled_from([b"K", b"q", b"h"]), _arg("<B")).map(b"".join),
    st.tuples(st.sampled_from([b"J", b"r", b"j"]), _arg("<I")).map(b"".join),
    st.tuples(st.sampled_from([b"M"]), _arg("<H")).map(b"".join),
    st.tuples(st.sampled_from([b"C", b"\x8c"]), st.binary(max_size=12)).map(
        lambda t: t[0] + bytes([len(t[1])]) + t[1]
    ),
    st.tuples(st.sampled_from([b"B", b"X"]), _SIZED, st.binary(max_size=12)).map(
        lambda t: t[0] + struct.pack("<I", t[1] % 2**32) + t[2]
    ),
    st.tuples(st.sampled_from([b"\x8e", b"\x96", b"\x95", b"\x8d"]), _SIZED, st.binary(max_size=12)).map(
        lambda t: t[0] + struct.pack("<Q", t[1]) + t[2]
    ),
    st.sampled_from(
        [b"X\x02\x00\x00\x00O8", b"X\x02\x00\x00\x00u1", b"X\x02\x00\x00\x00b1", b"X\x06\x00\x00\x00latin1"]
    ),
)


@FUZZ
@given(
    proto=st.sampled_from([b"", b"\x80\x02", b"\x80\x04", b"\x80\x05"]), ops=st.lists(_PICKLE_OP, max_size=24)
)
def test_fuzz_bin_pickle_programs(tmp_path, proto, ops):
    """Generated opcode streams: allowed and refused globals, calls, states, memo indices, lengths."""
    (tmp_path / "p.bin").write_bytes(proto + b"".join(ops) + b".")
    _exercise_bin(tmp_path / "p.bin")


class _ArrayState:
    """Pickles as numpy does an array (``_reconstruct`` + BUILD), with any shape / dtype / data."""

    def __init__(self, shape, dtype, raw):
        self.args = (shape, dtype, raw)

    def __reduce__(self):
        shape, dtype, raw = self.args
        return (
            np.ndarray.__reduce__(np.zeros(0))[0],
            (np.ndarray, (0,), b"b"),
            (1, shape, dtype, False, raw),
        )


@FUZZ
@given(
    shape=st.lists(st.integers(0, 6) | st.sampled_from([2**20, 2**31, 2**62]), max_size=3).map(tuple),
    dtype=st.sampled_from(["O", "u1", "b1", "f8", "i4", "U2", "S3"]).map(np.dtype),
    raw=st.binary(max_size=24) | st.lists(st.binary(max_size=3) | st.booleans(), max_size=6),
    where=st.sampled_from(["images", "issame"]),
)
def test_fuzz_bin_numpy_array_states(tmp_path, shape, dtype, raw, where):
    """The state numpy's own __setstate__ trusts: a shape larger than the data (an object array read past
    its list crashed the process) must be refused; a consistent one reads."""
    arr = _ArrayState(shape, dtype, raw)
    obj = (arr, [True]) if where == "images" else ([b"\xff\xd8a", b"\xff\xd8b"], arr)
    (tmp_path / "p.bin").write_bytes(pickle.dumps(obj, protocol=2))
    _exercise_bin(tmp_path / "p.bin")


# ----------------------------------------------------------------------------- IJB meta

_IJB_FIELD = st.one_of(
    st.integers(-3, 30).map(str),
    st.sampled_from(["x", "1.5", "nan", "inf", "-inf", "1e999", "9" * 30, "1_0", "٣", "", "img_1.jpg"]),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=6),
)
_IJB_FILE = st.one_of(
    st.lists(st.lists(_IJB_FIELD, min_size=0, max_size=13).map(" ".join), max_size=6).map(
        lambda rows: "\n".join(rows).encode("utf-8", "surrogatepass")
    ),
    st.binary(max_size=40),
)


@FUZZ
@given(tid=_IJB_FILE, pairs=_IJB_FILE, score=st.none() | _IJB_FILE, meta_dir=st.booleans())
def test_fuzz_ijb_meta(tmp_path, tid, pairs, score, meta_dir):
    folder = tmp_path / "ijb"
    for f in folder.glob("**/p_*.txt"):
        f.unlink()
    d = folder / "meta" if meta_dir else folder
    (folder / "meta").mkdir(parents=True, exist_ok=True)
    (d / "p_face_tid_mid.txt").write_bytes(tid)
    (d / "p_template_pair_label.txt").write_bytes(pairs)
    if score is not None:
        (d / "p_name_5pts_score.txt").write_bytes(score)
    try:
        m = read_ijb_meta(folder, "p")
    except DataFileError:
        return
    assert set(m.labels.tolist()) <= {0, 1}
    assert m.templates.size == m.medias.size == len(m.image_names)
    assert m.faceness is None or (np.isfinite(m.faceness).all() and m.faceness.size == len(m.image_names))
    assert m.landmarks is None or np.isfinite(m.landmarks).all()


# ----------------------------------------------------------------------------- config loader

LEAVES = [i for i in field_info()]
_YAML_SCALAR = st.one_of(
    st.sampled_from(
        ["-1", "0", "1", "2", "0.5", "1e-3", "1e999", "-.inf", ".nan", "null", "~", "true", "no", "''"]
        + ["[]", "{}", "[1, 2]", "[[1]]", "{a: 1}", "!!int x", "!!float x", "!!timestamp x", "!!binary x"]
        + [
            "9" * 5000,
            "&a [*a]",
            "[" * 200,
            "{? [1]: 2}",
            "'a\x00b'",
            "a" * 300,
            "!!python/object:os.system x",
        ]
        + [
            "sphereface2",
            "partial_fc",
            "iresnet18",
            "none",
            "auto",
            "fp32",
            "bf16",
            "ddp",
            "x.bin",
            "2024-01-01",
        ]
    ),
    st.text(max_size=12),
)


@st.composite
def _overrides(draw):
    out = []
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(LEAVES))["key"]
        key = draw(
            st.sampled_from([key, key.rsplit(".", 1)[0], key + ".x", key.replace(".", ".."), "x" + key])
        )
        out.append(f"{key}={draw(_YAML_SCALAR)}")
    return out


@FUZZ
@given(overrides=_overrides(), check_paths=st.booleans())
def test_fuzz_config_overrides(tmp_path, overrides, check_paths):
    """Dotted overrides of any key with any YAML value: ConfigError, or a config that saves and
    loads back identical (no value silently changed on the way)."""
    try:
        cfg = load_config(None, overrides, check_paths=check_paths)
    except ConfigError:
        return
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml", check_paths=False).to_dict() == cfg.to_dict()


def _mapping_strategy():
    keys = sorted({p for i in LEAVES for p in i["key"].split(".")} | {"defaults", "x"})
    leaf = _YAML_SCALAR
    return st.recursive(
        st.dictionaries(st.sampled_from(keys), leaf, max_size=4),
        lambda inner: st.dictionaries(st.sampled_from(keys), inner | leaf, max_size=4),
        max_leaves=12,
    )


def _to_yaml(d, indent=0) -> str:
    """Nested mapping of raw YAML scalar texts -> block YAML (the texts are not quoted: YAML reads them)."""
    lines = []
    for k, v in d.items():
        if isinstance(v, dict):
            lines.append(" " * indent + f"{k}:")
            lines.append(_to_yaml(v, indent + 2))
        else:
            lines.append(" " * indent + f"{k}: {v}")
    return "\n".join(x for x in lines if x)


@FUZZ
@given(
    recipe=_mapping_strategy().map(_to_yaml) | st.text(max_size=60),
    ops=st.none() | MUTATIONS,
    base=st.sampled_from([None, "demo_cpu.yaml", "ms1mv3_r50_sf2.yaml"]),
)
def test_fuzz_config_recipes(tmp_path, recipe, ops, base):
    """YAML recipe text (structured, random, or a real recipe byte-mutated), its ``defaults`` resolved."""
    configs = tmp_path / "configs"
    if not configs.is_dir():
        shutil.copytree(REPO / "configs", configs)
    text = recipe.encode("utf-8", "surrogatepass") if base is None else (REPO / "configs" / base).read_bytes()
    data = mutate(text, ops) if ops else text
    (configs / "fuzz.yaml").write_bytes(data)
    try:
        load_config(configs / "fuzz.yaml", [f"output_dir={tmp_path / 'run'}"], check_paths=False)
    except ConfigError:
        pass


# ----------------------------------------------------------------------------- checkpoints


def _small_checkpoint(run: Path, step: int) -> Path:
    """A checkpoint folder written by fr_dist's own writer (atomic.finalize: sizes + CRC-32 in meta.json)."""
    tmp = layout.tmp_dir(run, step)
    tmp.mkdir(parents=True)
    atomic.atomic_save({"weight": torch.arange(12.0).reshape(3, 4), "class_start": 0}, tmp / "head_rank0.pt")
    atomic.atomic_save({"step": step, "epoch": 0}, tmp / "trainer.pt")
    (tmp / "config.yaml").write_text("seed: 1\n")
    return atomic.finalize(run, step, {"world_size": 1, "num_classes": 3, "embedding_size": 4})


@pytest.fixture(scope="module")
def ckpt_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ckpt") / "run"
    _small_checkpoint(run, 1)
    _small_checkpoint(run, 3)
    return run


@FUZZ
@given(which=st.sampled_from(["head_rank0.pt", "trainer.pt", "config.yaml"]), ops=MUTATIONS)
def test_fuzz_checkpoint_damage_is_always_reported(ckpt_run, which, ops):
    """Any change to a file meta.json lists (a flip, a truncation, inserted bytes) is reported by the
    verifier, an explicit resume from it raises CheckpointError, and resume=auto falls back to step 1."""
    f = layout.step_dir(ckpt_run, 3) / which
    original = f.read_bytes()
    data = mutate(original, ops)
    assume(data != original)
    try:
        f.write_bytes(data)
        assert layout.verify_checkpoint(f.parent) is not None
        with pytest.raises(CheckpointError, match="not usable"):
            resume_path(ckpt_run, str(f.parent))
        assert layout.newest_usable(ckpt_run) == layout.step_dir(ckpt_run, 1)
    finally:
        f.write_bytes(original)


@FUZZ
@given(ops=MUTATIONS, deep=st.booleans())
def test_fuzz_checkpoint_meta_json(ckpt_run, ops, deep):
    """A damaged meta.json: the verifier returns a reason (or None when what it still lists is intact)."""
    meta = layout.step_dir(ckpt_run, 3) / "meta.json"
    original = meta.read_bytes()
    try:
        meta.write_bytes(mutate(original, ops))
        reason = layout.verify_checkpoint(meta.parent, deep=deep)
        assert reason is None or isinstance(reason, str)
        try:
            layout.read_meta(meta.parent)
        except CheckpointError:
            pass
    finally:
        meta.write_bytes(original)


V1_FILES = ["head_rank0.pt", "trainer.pt"]


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@FUZZ
@given(which=st.sampled_from(V1_FILES), ops=MUTATIONS)
def test_fuzz_checkpoint_v1_zip_crcs(tmp_path, which, ops):
    """An old checkpoint (tests/fixtures/ckpt_v1: no file list, zip CRCs checked): a damaged .pt is
    reported, or it verifies and then loads equal to the original (a change it cannot see is harmless)."""
    folder = tmp_path / "v1"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for name in V1_FILES + ["meta.json"]:
        shutil.copy(FIXTURES / "ckpt_v1" / name, folder / name)
    f = folder / which
    f.write_bytes(mutate(f.read_bytes(), ops))
    if layout.verify_checkpoint(folder) is not None:
        return
    try:
        got = layout.safe_load(f)
    except CheckpointError:
        return
    assert _same(got, layout.safe_load(FIXTURES / "ckpt_v1" / which))


# ============================================================================= regressions
# One plain test per bug the fuzzing found (explicit bytes; each failed before its fix).


def _rec_files(tmp_path, records, idx=None) -> Path:
    """``records``: [(header, payload)] at keys 0.. (flag, labels given raw); the .idx as written or ``idx``."""
    rec = tmp_path / "train.rec"
    with RecordIOWriter(rec) as w:
        for k, (h, p) in enumerate(records):
            w.write(k, h, p)
    if idx is not None:
        rec.with_suffix(".idx").write_text(idx)
    return rec


def test_regression_index_number_out_of_int64_range(tmp_path):
    """numpy's fast parse saturated 10**20 to INT64_MAX: a wrong key silently, or an offset whose
    ``+ 8`` overflowed past the EOF check and made ``os.pread`` raise OSError(EINVAL)."""
    rec = _rec_files(tmp_path, [(IRHeader(0, 0.0, 0, 0), b"\xff\xd8x")])
    for idx in ("99999999999999999999\t0\n", "0\t99999999999999999999\n", "0\t9223372036854775807\n"):
        rec.with_suffix(".idx").write_text(idx)
        with pytest.raises(RecordIOError, match="train.idx"):
            RecordIOReader(rec)


def test_regression_index_lines_with_three_and_one_fields(tmp_path):
    """'0 TAB 0 TAB 0' then '0': 4 numbers on 2 lines passed the fast parse's count and were re-paired."""
    rec = _rec_files(tmp_path, [(IRHeader(0, 0.0, 0, 0), b"\xff\xd8x")])
    rec.with_suffix(".idx").write_text("0\t0\t0\n0\n")
    with pytest.raises(RecordIOError, match="line 1 is not 'key<TAB>offset'"):
        RecordIOReader(rec)


def test_regression_header_record_with_a_huge_identity_range(tmp_path):
    """label [3e38, 3e38]: np.arange raised ValueError; [1e9, 1e9]: an 8 GB array was filled first."""
    for label in ((3e38, 3e38), (1e9, 1e9), (3.0, 9.0)):
        rec = _rec_files(tmp_path, [(IRHeader(2, label, 0, 0), b""), (IRHeader(0, 0.0, 1, 0), b"\xff\xd8x")])
        with pytest.raises(RecordIOError, match="header record"):
            RecordIOReader(rec)


def test_regression_header_record_range_with_a_gap(tmp_path):
    """Keys 0, 1, 3, 4 and a header record implying keys 1..3: key 2 is missing (it was a KeyError later)."""
    rec = _rec_files(
        tmp_path,
        [(IRHeader(2, (3.0, 4.0), 0, 0), b"")]
        + [(IRHeader(0, 0.0, k, 0), b"\xff\xd8x") for k in (1, 2, 3, 4)],
    )
    lines = rec.with_suffix(".idx").read_text().splitlines()
    rec.with_suffix(".idx").write_text("\n".join(line for line in lines if not line.startswith("2\t")) + "\n")
    with pytest.raises(RecordIOError, match="key 2 implied by the header record"):
        RecordIOReader(rec)


@pytest.mark.parametrize("label", [float("nan"), float("inf"), 2.5, -3.0, 3e38])
def test_regression_image_label_not_a_class_index(tmp_path, label):
    """NaN raised ValueError and inf OverflowError from int(); labels() truncated 2.5 to 2 and kept -3
    (num_classes became -2); 3e38 (found by test_fuzz_recordio_header_values) overflowed the int64 array."""
    rec = _rec_files(tmp_path, [(IRHeader(0, label, 0, 0), b"\xff\xd8x")])
    r = RecordIOReader(rec)
    for call in (lambda: r.label(0), r.labels, lambda: r.num_classes):
        with pytest.raises(RecordIOError, match="is not a class index"):
            call()


def test_regression_identity_record_with_nan_range(tmp_path):
    rec = _rec_files(
        tmp_path,
        [
            (IRHeader(2, (2.0, 3.0), 0, 0), b""),
            (IRHeader(0, 0.0, 1, 0), b"\xff\xd8x"),
            (IRHeader(2, (float("nan"), 2.0), 0, 0), b""),
        ],
    )
    with pytest.raises(RecordIOError, match="expected \\[start, end\\)"):
        RecordIOReader(rec).id_range(0)


def test_regression_property_file_not_utf8(tmp_path):
    rec = _rec_files(tmp_path, [(IRHeader(0, 0.0, 0, 0), b"\xff\xd8x")])
    (tmp_path / "property").write_bytes(b"\xff\xfe3,8,8")
    with pytest.raises(RecordIOError, match="property"):
        RecordIOReader(rec)


def _huge_jpeg(side: int = 65535) -> bytes:
    j = bytearray(encode_jpeg(np.zeros((16, 16, 3), np.uint8)))
    i = j.find(b"\xff\xc0")  # SOF0: length, precision, height, width
    j[i + 5 : i + 9] = struct.pack(">HH", side, side)
    return bytes(j)


def test_regression_image_header_claiming_huge_size(tmp_path):
    """A 600-byte JPEG claiming 65535 x 65535: the decoder filled 12.9 GB (8000 x 8000: 192 MB, 2.4 s)."""
    rec = _rec_files(tmp_path, [(IRHeader(0, 0.0, 0, 0), _huge_jpeg())])
    with pytest.raises(RecordIOError, match="claims 65535 x 65535 pixels"):
        RecordIOReader(rec).sample(0)
    write_bin(tmp_path / "p.bin", [_huge_jpeg(), _huge_jpeg()], [True])
    with pytest.raises(DataFileError, match="image 0 .*claims 65535 x 65535 pixels"):
        load_bin(tmp_path / "p.bin")


def _run_isolated(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (a crash or a memory blow-up stays out of the test process)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


# a 230-byte .bin: numpy _reconstruct + BUILD of an object array of shape (10**6,) from a 2-item list
SEGFAULT_BIN = (
    b"\x80\x02]q\x00(c_codecs\nencode\nq\x01X\x01\x00\x00\x00aq\x02X\x06\x00\x00\x00latin1q\x03\x86q\x04Rq\x05"
    b"h\x01X\x01\x00\x00\x00bq\x06h\x03\x86q\x07Rq\x08ecnumpy._core.multiarray\n_reconstruct\nq\tcnumpy\nndarray\n"
    b"q\nK\x00\x85q\x0bh\x08\x87q\x0cRq\r(K\x01J@B\x0f\x00\x85q\x0ecnumpy\ndtype\nq\x0fX\x02\x00\x00\x00O8q\x10"
    b"\x89\x88\x87q\x11Rq\x12(K\x03X\x01\x00\x00\x00|q\x13NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK?tq\x14b\x89]q\x15"
    b"(K\x01K\x02etq\x16b\x86q\x17."
)


def test_regression_bin_object_array_past_its_list_crashed_the_process(tmp_path):
    """numpy's ndarray.__setstate__ reads an object array's items past the list it is given: the
    process died with SIGSEGV (numpy 2.4.6); now the reader compares shape and data first."""
    (tmp_path / "segv.bin").write_bytes(SEGFAULT_BIN)
    code = (
        "import sys\nfrom fr_dist.data.pairs import read_bin\nfrom fr_dist.errors import DataFileError\n"
        f"try:\n    read_bin({str(tmp_path / 'segv.bin')!r})\nexcept DataFileError as e:\n    print('refused:', e)\n"
    )
    res = _run_isolated(code)
    assert res.returncode == 0, f"rc={res.returncode} (-11 = SIGSEGV)\n{res.stderr[-2000:]}"
    assert "refused: " in res.stdout and "object array of shape (1000000,)" in res.stdout


_BIG = 1 << 18  # 256 KB


@pytest.mark.parametrize(
    "data, why",
    [
        # LONG_BINPUT 2**24: the C unpickler grew its memo list to 2**25 slots and zeroed them (256 MB
        # resident from 11 bytes; 2**31 exhausts the machine)
        (
            b"\x80\x02N" + b"r" + struct.pack("<I", 1 << 24) + b".",
            "expected a pickled \\(images, issame\\) pair",
        ),
        # bytearray(2**28): an allowed global called with a length, 256 MB zeroed
        (b"\x80\x02c__builtin__\nbytearray\nJ" + struct.pack("<i", 1 << 28) + b"\x85R.", "bytearray"),
        # BYTEARRAY8 of 2**33 bytes in a 20-byte file: the pure-Python unpickler's bytearray(n) first
        (b"\x80\x05\x96" + struct.pack("<Q", 1 << 33) + b"ab.", "BYTEARRAY8 of 8589934592 bytes"),
        # _codecs.encode(x, 'hex') doubles its input: 28 nested calls in 280 bytes ask for 2**29 bytes
        (
            b"\x80\x02c_codecs\nencode\nq\x00"
            + b"h\x00" * 27
            + b"C\x01a"
            + b"X\x03\x00\x00\x00hex\x86R" * 28
            + b".",
            "_codecs.encode",
        ),
        # found reviewing the fuzzer's memo ops (BINPUT / BINGET): one 256 KB bytes memoized, then copied
        # 1024 times by bytearray(...) calls of 6 bytes each: 256 MB from a 262 KB file
        (
            b"\x80\x04B"
            + struct.pack("<I", _BIG)
            + b"\xff\xd8"
            + b"a" * (_BIG - 2)
            + b"\x94"
            + b"cbuiltins\nbytearray\n\x94("
            + b"h\x01h\x00\x85R" * 1024
            + b"l]\x88a\x86.",
            "bytes created past 4 x the file's size",
        ),
        # ... or listed 1024 times in issame: np.asarray(issame) made a 256 MB string array
        (
            b"\x80\x04B"
            + struct.pack("<I", _BIG)
            + b"\xff\xd8"
            + b"a" * (_BIG - 2)
            + b"\x94"
            + b"]("
            + b"h\x00" * 1024
            + b"l\x86.",
            "issame entries must be booleans",
        ),
        # ... or 1024 references to one 256 KB uint8 image array: each tobytes() a copy (256 MB), and
        # load_bin would then decode the same image 1024 times into [2048, 112, 112, 3]
        (
            pickle.dumps(([np.zeros(_BIG, np.uint8)] * 1024, [True] * 512), protocol=4),
            "its 1024 images add up to 268435456 bytes",
        ),
    ],
    ids=[
        "long_binput",
        "bytearray_len",
        "bytearray8",
        "codecs_hex",
        "memo_copies",
        "memo_issame",
        "memo_images",
    ],
)
def test_regression_bin_memory_bombs(tmp_path, data, why):
    (tmp_path / "bomb.bin").write_bytes(data)
    code = (
        "from fr_dist.data.pairs import read_bin\nfrom fr_dist.errors import DataFileError\n"
        f"try:\n    read_bin({str(tmp_path / 'bomb.bin')!r})\nexcept DataFileError as e:\n    print('refused:', e)\n"
        "hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0].split()[1]\n"
        "print('peak_mb', int(hwm) // 1024)\n"  # (ru_maxrss would carry the forking pytest's)
    )
    res = _run_isolated(code)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "refused: " in res.stdout, res.stdout
    import re

    assert re.search(why, res.stdout), res.stdout
    assert int(res.stdout.rsplit("peak_mb", 1)[1]) < 200  # the imports take ~30 MB; each bomb >= 256 MB


@pytest.mark.parametrize(
    "issame, bad",
    [(["False"], "'False'"), ([1.5], "1.5"), ([2], "2")],
)
def test_regression_bin_issame_that_is_not_a_bool(tmp_path, issame, bad):
    """The string 'False' (and 1.5, 2) was read as True."""
    (tmp_path / "p.bin").write_bytes(pickle.dumps(([b"\xff\xd8a", b"\xff\xd8b"], issame)))
    with pytest.raises(DataFileError, match=f"issame entries must be booleans .*got {bad}"):
        read_bin(tmp_path / "p.bin")


def test_regression_bin_and_ijb_errors_are_project_errors(tmp_path):
    """read_bin / load_bin / read_ijb_meta raised plain ValueError, UnicodeDecodeError, OverflowError."""
    (tmp_path / "bad.bin").write_bytes(b"not a pickle")
    with pytest.raises(DataFileError, match="bad.bin: not an insightface .bin pair file"):
        read_bin(tmp_path / "bad.bin")
    write_bin(tmp_path / "undecodable.bin", [b"\xff\xd8", b"\xff\xd8"], [True])
    with pytest.raises(DataFileError, match="image 0 \\(pair 0\\) cannot be decoded"):
        load_bin(tmp_path / "undecodable.bin")
    cases = [
        (b"\xff 1 2\n", b"1 1 1\n", None, "p_face_tid_mid.txt:1: not UTF-8"),
        (
            b"a 1 2\n",
            b"99999999999999999999 1 1\n",
            None,
            "template id 1 99999999999999999999 is out of the int64",
        ),
        (b"a 1 2\n", b"1 1 " + b"1" * 5000 + b"\n", None, "label '1111"),
        (b"a 1 2\n", b"1 1 1\n", b"a 1 2 3 4 5 6 7 8 9 10 nan\n", "faceness 'nan' is not a finite number"),
        (b"a 1 2\n", b"1 1 1\n", b"a 1 2 3 4 5 6 7 8 9 inf 1\n", "landmark 'inf' is not a finite number"),
    ]
    for tid, pairs, score, match in cases:
        for f in tmp_path.glob("p_*"):
            f.unlink()
        (tmp_path / "p_face_tid_mid.txt").write_bytes(tid)
        (tmp_path / "p_template_pair_label.txt").write_bytes(pairs)
        if score is not None:
            (tmp_path / "p_name_5pts_score.txt").write_bytes(score)
        with pytest.raises(DataFileError, match=match):
            read_ijb_meta(tmp_path, "p")


@pytest.mark.parametrize(
    "text, match",
    [
        (b"\xff\xfe: 1\n", "not UTF-8"),
        (b"{[1]: 2}\n", "is not a scalar"),
        (b"train: {lr: !!int abc}\n", "invalid YAML: ValueError"),
        (b"train: {lr: !!float abc}\n", "invalid YAML: ValueError"),
        (b"train: {lr: !!timestamp abc}\n", "invalid YAML: AttributeError"),
        (b"train: {lr: " + b"1" * 5000 + b"}\n", "invalid YAML: ValueError: Exceeds the limit"),
        (b"train: " + b"[" * 600 + b"]" * 600 + b"\n", "invalid YAML: RecursionError"),
        (b"defaults: [" + b"a" * 300 + b"]\n", "cannot be read: .*File name too long"),
        (b'defaults: ["a\\0b"]\n', "cannot be read: embedded null byte"),
    ],
)
def test_regression_recipe_errors_are_config_errors(tmp_path, text, match):
    """Each raised UnicodeDecodeError, TypeError, ValueError, AttributeError, RecursionError or OSError."""
    (tmp_path / "c.yaml").write_bytes(text)
    with pytest.raises(ConfigError, match=match):
        load_config(tmp_path / "c.yaml", check_paths=False)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["train.lr=!!int x"], "cannot parse the value as YAML"),
        (["train.lr=" + "1" * 5000], "cannot parse the value as YAML"),
        (['eval.bins=["' + "a" * 300 + '"]'], "is not a usable path .*File name too long"),
        (['eval.bins=["a\\0b"]', "data.synthetic.generate=true"], "eval.bins: a\x00b does not exist"),
        (["checkpoint.resume=" + "a" * 300], "no such checkpoint folder"),
    ],
)
def test_regression_override_errors_are_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_regression_yaml_alias_bomb(tmp_path):
    """7 lines of nested aliases: 10**6 values once expanded; validation worded a 3.2 MB error message
    (each further line x10 the time and memory: a hang, then MemoryError)."""
    lines = ["x0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"x{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 6)]
    text = "model:\n  kwargs:\n" + "".join(f"    {line}\n" for line in lines) + "train:\n  milestones: *a5\n"
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match="aliases expand to more than 100000 values") as e:
        load_config(tmp_path / "c.yaml", check_paths=False)
    assert len(str(e.value)) < 1000
    # (not a bug before, a guard now: a list that contains itself is refused where it is read)
    (tmp_path / "c.yaml").write_text("model:\n  kwargs:\n    x: &a [*a]\n")
    with pytest.raises(ConfigError, match="a recursive alias"):
        load_config(tmp_path / "c.yaml", check_paths=False)


@pytest.mark.parametrize(
    "meta, match",
    [
        ("[1]", "not a JSON object"),
        ('{"files": [1]}', "files is a list"),
        ('{"files": {"trainer.pt": 1}}', "record of 'trainer.pt' is malformed"),
        ('{"files": {"trainer.pt": {"size": "1", "crc32": "0"}}}', "record of 'trainer.pt' is malformed"),
        ("[" * 100000, "not valid JSON \\(RecursionError"),
        ('{"files": {"/etc/hostname": {"size": 1, "crc32": "0"}}}', "not a file inside the checkpoint"),
        ('{"files": {"../x": {"size": 1, "crc32": "0"}}}', "not a file inside the checkpoint"),
    ],
)
def test_regression_checkpoint_meta_json_shapes(tmp_path, meta, match):
    """verify_checkpoint raised AttributeError / TypeError / RecursionError for these, and checked files
    outside the checkpoint folder that meta.json named (an absolute path, '..')."""
    folder = tmp_path / "checkpoints" / "2"
    folder.mkdir(parents=True)
    (folder / "trainer.pt").write_bytes(b"x")
    (folder / "meta.json").write_text(meta)
    reason = layout.verify_checkpoint(folder)
    assert reason is not None and __import__("re").search(match, reason), reason
    with pytest.raises(CheckpointError, match="not usable"):
        resume_path(tmp_path, str(folder))


def test_regression_v1_checkpoint_zip_flag_flips(tmp_path):
    """Old checkpoints (zip CRCs): a flipped 'encrypted' bit raised RuntimeError, a flipped compression
    method NotImplementedError, out of verify_checkpoint."""
    data = (FIXTURES / "ckpt_v1" / "trainer.pt").read_bytes()
    cd = data.rfind(b"PK\x01\x02")  # the last central-directory entry
    for offset, value, what in ((8, 0x01, "RuntimeError"), (10, 0x63, "NotImplementedError")):
        folder = tmp_path / what
        folder.mkdir()
        shutil.copy(FIXTURES / "ckpt_v1" / "meta.json", folder / "meta.json")
        b = bytearray(data)
        b[cd + offset] |= value
        (folder / "trainer.pt").write_bytes(bytes(b))
        reason = layout.verify_checkpoint(folder)
        assert reason is not None and what in reason, reason


def test_regression_v1_checkpoint_member_marked_as_directory(tmp_path):
    """Found by the 2,000-example run of test_fuzz_checkpoint_v1_zip_crcs: 4 bytes (the external
    attributes of archive/data/0 in the central directory, DOS directory bit set) pass every zip CRC, and
    torch's reader then reads no data for the head's weight: it loads as uninitialised memory (zeros in a
    fresh process, garbage in a used one), and the verifier said the checkpoint was fine."""
    folder = tmp_path / "v1"
    folder.mkdir()
    shutil.copy(FIXTURES / "ckpt_v1" / "meta.json", folder / "meta.json")
    b = bytearray((FIXTURES / "ckpt_v1" / "head_rank0.pt").read_bytes())
    assert b[2348:2352] == struct.pack("<I", 982)  # ... the entry's local-header offset follows
    b[2344:2348] = struct.pack("<I", 23)
    (folder / "head_rank0.pt").write_bytes(bytes(b))
    want = layout.safe_load(FIXTURES / "ckpt_v1" / "head_rank0.pt")["params"]["weight"]
    got = layout.safe_load(folder / "head_rank0.pt")["params"]["weight"]  # what a resume got, silently
    assert got.shape == want.shape and not torch.equal(got, want)
    reason = layout.verify_checkpoint(folder)
    assert reason is not None and "archive/data/0 is marked as a directory" in reason, reason
