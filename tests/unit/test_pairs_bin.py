"""insightface .bin pair files: the RecordIO fixtures' pairs.bin, Python-2 pickles, round trip."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from fr_dist.data.pairs import read_bin, write_bin
from fr_dist.eval.verification import evaluate_pairs, load_bin


def test_fixture_pairs_bin_loads_and_evaluates(rec_fixture_dir):
    meta = json.loads((rec_fixture_dir / "fixture.json").read_text())["pairs_bin"]
    images, issame = load_bin(rec_fixture_dir / "pairs.bin")
    assert images.shape == (40, 112, 112, 3) and images.dtype == np.uint8
    assert issame.tolist() == meta["issame"]
    # raw-pixel embeddings: a valid (if weak) verifier, evaluated with the 10-fold protocol
    emb = images.reshape(40, -1).astype(np.float64)
    emb -= emb.mean(axis=1, keepdims=True)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    res = evaluate_pairs(emb[0::2], emb[1::2], issame, nfolds=10)
    assert 0.0 <= res["accuracy"] <= 1.0 and res["pairs"] == 20
    assert set(res) >= {"accuracy", "accuracy_std", "threshold", "val_at_far_1e-3", "auc", "eer"}


def test_python2_pickle_and_round_trip(tmp_path):
    imgs = [b"\xff\xd8a", b"\xff\xd8b", b"\xff\xd8c", b"\xff\xd8d"]
    write_bin(tmp_path / "a.bin", imgs, [True, False])
    assert read_bin(tmp_path / "a.bin") == (imgs, [True, False])
    # a protocol-2 pickle whose byte strings are Python 2 `str` (latin-1 escaped): needs encoding='bytes'
    py2 = b"\x80\x02]q\x00(U\x03\xff\xd8aq\x01U\x03\xff\xd8bq\x02e]q\x03\x88a\x86q\x04."
    (tmp_path / "py2.bin").write_bytes(py2)
    assert read_bin(tmp_path / "py2.bin") == ([b"\xff\xd8a", b"\xff\xd8b"], [True])
    (tmp_path / "bad.bin").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="bad.bin: not an insightface .bin pair file"):
        read_bin(tmp_path / "bad.bin")
    (tmp_path / "odd.bin").write_bytes(pickle.dumps(([b"a"], [True])))
    with pytest.raises(ValueError, match="1 images for 1 pairs"):
        read_bin(tmp_path / "odd.bin")
