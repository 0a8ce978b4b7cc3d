"""DALI CPU pipeline (device_id=None): insightface-layout files through a filtered image index,
rank sharding, and the same labels/pixels as the torch path (within 1 on uint8)."""

from __future__ import annotations

import shutil

import pytest
import torch

pytestmark = pytest.mark.dali

pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed (pip install 'fr_dist[dali]')")

from fr_dist.data import build_train_loader, open_recordio  # noqa: E402
from fr_dist.data.dali import DaliReaderSampler, image_index_path  # noqa: E402
from fr_dist.data.sampler import ShardedSampler  # noqa: E402

TOL = 1.0 / 127.5 + 1e-6  # 1 grey level after (x - 127.5) / 127.5


def _ref(rec, key, flip=False):
    img = rec.decode(key)
    img = img[:, ::-1] if flip else img
    return (torch.from_numpy(img.copy()).permute(2, 0, 1).float() - 127.5) / 127.5  # [3, H, W]


@pytest.fixture()
def fixture_copy(rec_fixture_dir, tmp_path):
    d = tmp_path / "rec"
    d.mkdir()
    for f in ("train.rec", "train.idx", "property"):
        shutil.copy(rec_fixture_dir / f, d / f)
    return d / "train.rec"


def test_image_index_lists_only_images_and_is_cached(fixture_copy, tmp_path):
    # the shared fixture is never used here: where ../shared is writable (a user's checkout) the
    # index would be written next to it; a read-only folder is a copy with its write bits cleared
    p = image_index_path(fixture_copy)
    assert p.parent == fixture_copy.parent  # writable folder: next to the dataset
    keys = [int(line.split("\t")[0]) for line in p.read_text().splitlines()]
    assert keys == list(range(1, 201))
    mtime = p.stat().st_mtime_ns
    assert image_index_path(fixture_copy) == p and p.stat().st_mtime_ns == mtime  # reused
    # a read-only dataset folder: the cache dir is used instead
    ro = tmp_path / "ro"
    shutil.copytree(fixture_copy.parent, ro, ignore=shutil.ignore_patterns("*.images-*"))
    ro.chmod(0o555)
    try:
        q = image_index_path(ro / "train.rec", cache_dir=tmp_path / "cache")
        assert not list(ro.glob("*.images-*"))  # nothing written beside the read-only dataset
    finally:
        ro.chmod(0o755)
    assert q.parent == tmp_path / "cache" and q.read_text() == p.read_text()


def test_mxnet_reader_matches_torch_path(fixture_copy):
    rec = open_recordio(fixture_copy)
    seen = []
    for rank in range(2):
        loader = build_train_loader(
            fixture_copy,
            rank,
            2,
            20,
            seed=1,
            num_workers=1,
            device="cpu",
            backend="dali",
            flip=False,
        )
        assert isinstance(loader.sampler, DaliReaderSampler) and len(loader) == 5
        assert loader.num_classes == 20 and loader.num_images == 200
        loader.sampler.set_epoch(0)
        n = 0
        for x, y, keys in loader.iter_with_keys():
            assert x.shape == (20, 3, 112, 112) and x.dtype == torch.float32 and y.dtype == torch.int64
            for i, k in enumerate(keys.tolist()):
                assert int(y[i]) == rec.label(k)
                assert (x[i] - _ref(rec, k)).abs().max() <= TOL
            seen += keys.tolist()
            n += 1
        assert n == 5
    assert sorted(seen) == list(range(1, 201))  # two shards cover the epoch exactly once


def test_mxnet_reader_resume_same_world(fixture_copy):
    def run(state=None):
        ld = build_train_loader(fixture_copy, 0, 1, 25, seed=4, num_workers=1, backend="dali", flip=True)
        ld.sampler.set_epoch(2)
        if state is not None:
            ld.sampler.load_state_dict(state)
        return [(y.clone(), k.clone()) for _, y, k in ld.iter_with_keys()]

    full = run()
    resumed = run(dict(epoch=2, consumed_global=75, num_samples=200, world_size=1, batch_size=25))
    assert len(full) == 8 and len(resumed) == 5
    assert all(torch.equal(a[1], b[1]) for a, b in zip(resumed, full[3:]))
    with pytest.warns(UserWarning, match="cannot resume epoch 2 mid-way"):
        s = DaliReaderSampler(200, 0, 2, 25, seed=4, drop_last=True)
        s.load_state_dict(dict(epoch=2, consumed_global=75, num_samples=200, world_size=1, batch_size=25))
    assert len(s) == 0


def test_sampler_reader_equals_torch_loader(rec_fixture_dir):
    kw = dict(rank=1, world_size=3, batch_size=8, seed=6, num_workers=1, device="cpu", flip=True)
    dali = build_train_loader(rec_fixture_dir / "train.rec", backend="dali", dali_reader="sampler", **kw)
    torch_ld = build_train_loader(rec_fixture_dir / "train.rec", backend="torch", **kw)
    assert isinstance(dali.sampler, ShardedSampler) and len(dali) == len(torch_ld) == 200 // 24
    for ld in (dali, torch_ld):
        ld.sampler.set_epoch(1)
        ld.sampler.load_state_dict(dict(epoch=1, consumed_global=48, seed=6))  # resumable like torch
    pairs = list(zip(dali, torch_ld))
    assert len(pairs) == 200 // 24 - 2
    for (xd, yd), (xt, yt) in pairs:
        assert torch.equal(yd, yt)
        assert (xd - xt).abs().max() <= TOL
