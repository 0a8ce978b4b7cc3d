"""Folder packing (both layouts) round trip, `data info/pack/synth` CLI, the synthetic identity
generator (determinism, held-out identities) and .bin pair generation."""

from __future__ import annotations

import argparse
import json

import cv2
import numpy as np
import pytest

from fr_dist.data import make_synthetic_dataset, open_recordio, read_bin, write_bin
from fr_dist.data.cli import add_data_commands
from fr_dist.data.image import decode_image
from fr_dist.data.pairs import make_pairs_bin, sample_pairs
from fr_dist.data.synthetic import demo_dataset_spec, render_image


def data_main(argv) -> int:
    """Throwaway stand-in for ``fr-dist data ...``."""
    ap = argparse.ArgumentParser()
    add_data_commands(ap.add_subparsers(dest="cmd", required=True))
    args = ap.parse_args(argv)
    return args.func(args)


@pytest.fixture()
def folder(tmp_path):
    """3 identities (one with a PNG), sizes 16x16; plus an empty folder that must be skipped."""
    root = tmp_path / "faces"
    rng = np.random.default_rng(0)
    files = {}
    for ident, n in (("alice", 3), ("bob", 2), ("carol", 4)):
        (root / ident).mkdir(parents=True)
        for j in range(n):
            img = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
            ext = ".png" if (ident == "bob" and j == 1) else ".jpg"
            f = root / ident / f"{j:03d}{ext}"
            cv2.imwrite(str(f), img)
            files[f] = ident
    (root / "empty").mkdir()
    (root / "notes.txt").write_text("ignored")
    return root, files


@pytest.mark.parametrize("layout,shuffle", [("insightface", False), ("insightface", True), ("flat", True)])
def test_pack_round_trip(folder, tmp_path, layout, shuffle):
    root, files = folder
    out = tmp_path / f"out_{layout}_{shuffle}"
    assert (
        data_main(
            ["pack", str(root), str(out), "--layout", layout, "--seed", "3", "--quiet"]
            + (["--shuffle"] if shuffle else [])
        )
        == 0
    )
    rec = open_recordio(out / "train.rec")
    assert rec.layout == layout and rec.num_images == 9 and rec.num_classes == 3
    assert (out / "property").read_text() == "3,16,16"
    names = dict(line.split("\t") for line in (out / "train.classes.txt").read_text().splitlines())
    assert names == {"0": "alice", "1": "bob", "2": "carol"}
    by_bytes = {f.read_bytes(): ident for f, ident in files.items()}
    order = []
    for k in rec.image_keys:
        _, payload = rec.read(k)
        assert names[str(rec.label(k))] == by_bytes[payload]  # stored as is, right label
        assert rec.decode(k).shape == (16, 16, 3)
        order.append(payload)
    assert sorted(order) == sorted(by_bytes)
    if layout == "insightface":
        ranges = [rec.id_range(i) for i in range(3)]
        assert sorted(e - s for s, e in ranges) == [2, 3, 4]
        assert all(rec.label(k) == i for i, (s, e) in enumerate(ranges) for k in range(s, e))
    sorted_order = [f.read_bytes() for f in sorted(files, key=lambda f: (files[f], f.name))]
    assert (order == sorted_order) == (not shuffle)


def test_pack_resize_skip_bad_and_info(folder, tmp_path, capsys):
    root, _ = folder
    (root / "bob" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg: cannot decode"):
        data_main(["pack", str(root), str(tmp_path / "a"), "--quiet"])
    assert data_main(["pack", str(root), str(tmp_path / "b"), "--skip-bad", "--resize", "24", "--quiet"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["skipped"] == 1 and res["images"] == 9 and res["image_size"] == [24, 24]
    rec = open_recordio(tmp_path / "b")
    assert rec.decode(1).shape == (24, 24, 3) and (tmp_path / "b" / "property").read_text() == "3,24,24"
    assert data_main(["info", str(tmp_path / "b" / "train.rec"), "--decode"]) == 0
    text = capsys.readouterr().out
    assert "insightface layout" in text and "images      9" in text and "identities  3" in text
    assert data_main(["info", str(tmp_path / "b"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["images_per_identity"] == {"min": 2, "median": 3.0, "mean": 3.0, "max": 4}
    assert sum(b["identities"] for b in info["histogram"]) == 3


def test_info_on_mxnet_fixture(rec_fixture_dir, capsys):
    assert data_main(["info", str(rec_fixture_dir / "train.rec"), "--json", "--check"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "insightface" and info["images"] == 200 and info["num_classes"] == 20
    assert info["histogram"] == [{"images": "8-15", "identities": 20}] and info["check"]["bad"] == 0


def test_synthetic_dataset_deterministic_and_heldout(tmp_path):
    kw = dict(num_identities=6, images_per_identity=4, heldout_identities=5, heldout_pairs=11, seed=7)
    meta = make_synthetic_dataset(tmp_path / "a", workers=1, progress=False, **kw)
    make_synthetic_dataset(tmp_path / "b", workers=2, progress=False, **kw)  # parallel == serial
    for f in ("train.rec", "train.idx", "property", "heldout.bin"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (
        meta["num_images"] == 24 and json.loads((tmp_path / "a" / "synthetic.json").read_text())["seed"] == 7
    )
    rec = open_recordio(tmp_path / "a" / "train.rec")
    assert rec.layout == "insightface" and rec.num_images == 24 and rec.num_classes == 6
    assert [rec.label(k) for k in rec.image_keys] == [i for i in range(6) for _ in range(4)]
    assert rec.decode(1).shape == (112, 112, 3)
    assert rec.read(1)[1] == render_image(7, 0, 0)  # image j of identity i: pure function of (seed, i, j)
    bins, issame = read_bin(tmp_path / "a" / "heldout.bin")
    assert len(issame) == 11 and sum(issame) == 6 and len(bins) == 22
    train = {rec.read(k)[1] for k in rec.image_keys}
    held = {render_image(7, i, j): i for i in range(6, 11) for j in range(4)}  # identities 6..10
    assert not train & set(bins)
    for p, same in enumerate(issame):
        a, b = held[bins[2 * p]], held[bins[2 * p + 1]]
        assert (a == b) == same and bins[2 * p] != bins[2 * p + 1]
    other = make_synthetic_dataset(tmp_path / "c", workers=1, progress=False, **{**kw, "seed": 8})
    assert (tmp_path / "c" / "train.rec").read_bytes() != (tmp_path / "a" / "train.rec").read_bytes()
    assert other["seed"] == 8


def test_synthetic_identities_visible_but_varied():
    """Images of one identity differ (pose, light, noise) but are closer than other identities'."""

    def emb(i, j):
        x = decode_image(render_image(3, i, j)).astype(np.float64)
        x = cv2.resize(x, (28, 28), interpolation=cv2.INTER_AREA).ravel()
        x -= x.mean()
        return x / np.linalg.norm(x)

    e = np.array([[emb(i, j) for j in range(4)] for i in range(12)])  # [ids, imgs, D]
    same = [e[i, a] @ e[i, b] for i in range(12) for a in range(4) for b in range(a + 1, 4)]
    diff = [e[i, 0] @ e[k, 0] for i in range(12) for k in range(i + 1, 12)]
    assert max(same) < 0.999  # real intra-class variation
    assert np.mean(same) > np.mean(diff)


def test_synth_cli_and_demo_spec(tmp_path, capsys):
    spec = demo_dataset_spec()
    assert spec["num_identities"] >= 500 and spec["heldout_pairs"] >= 600
    assert (
        data_main(
            [
                "synth",
                str(tmp_path / "s"),
                "--num-ids",
                "3",
                "--images-per-id",
                "2",
                "--heldout-ids",
                "2",
                "--heldout-pairs",
                "4",
                "--layout",
                "flat",
                "--quiet",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    meta = json.loads(capsys.readouterr().out)
    assert meta["layout"] == "flat" and open_recordio(meta["rec"]).layout == "flat"
    assert len(read_bin(meta["bin"])[1]) == 4


def test_sample_pairs_and_bin_round_trip(tmp_path):
    labels = [0, 0, 0, 1, 1, 2, 3]
    pairs = sample_pairs(labels, 9, seed=1)
    assert pairs == sample_pairs(labels, 9, seed=1) and len(pairs) == 9
    assert sum(s for *_, s in pairs) == 5
    for i, j, same in pairs:
        assert i != j and (labels[i] == labels[j]) == same
    images = [b"\xff\xd8img%d" % i for i in range(7)]
    res = make_pairs_bin(tmp_path / "p.bin", images, labels, 6, seed=2)
    assert res["same"] == 3 and res["diff"] == 3
    bins, issame = read_bin(tmp_path / "p.bin")
    assert len(bins) == 12 and all(b in images for b in bins)
    with pytest.raises(ValueError, match="genuine pairs need"):
        sample_pairs([0, 1, 2], 2)
    with pytest.raises(ValueError, match="3 images for 1 pairs"):
        write_bin(tmp_path / "x.bin", images[:3], [True])
    (tmp_path / "list.bin").write_bytes(__import__("pickle").dumps([1, 2, 3]))
    with pytest.raises(ValueError, match="not an insightface .bin pair file"):
        read_bin(tmp_path / "list.bin")


_AFTER_CV2 = """
import sys, cv2, numpy as np
cv2.resize(np.zeros((1500, 1500, 3), np.uint8), (700, 700))  # starts OpenCV's thread pool here
from fr_dist.data import build_train_loader, make_synthetic_dataset
out = sys.argv[1]
make_synthetic_dataset(out, num_identities=4, images_per_identity=4, heldout_identities=2,
                       heldout_pairs=2, seed=1, workers=2, progress=False)
ld = build_train_loader(out + "/train.rec", 0, 1, 4, num_workers=2, image_size=(96, 96))
ld.sampler.set_epoch(0)
print(sum(x.shape[0] for x, _ in ld))
"""


def test_workers_do_not_deadlock_after_opencv_use(tmp_path):
    """OpenCV's thread pool does not survive fork(): generator and loader workers must not fork."""
    import subprocess
    import sys
    from pathlib import Path

    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-c", _AFTER_CV2, str(tmp_path / "s")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "16"
