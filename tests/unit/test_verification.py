"""insightface 10-fold verification, VAL@FAR, OpenSphere AUC/EER: closed-form cases, random
embeddings, the RecordIO fixtures' pairs.bin, and rank-sharded embedding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fr_dist.eval.verification import (
    auc_eer,
    embed_images,
    evaluate_pairs,
    interp1d_slinear,
    kfold_splits,
    l2_normalize,
    load_bin,
    roc_curve,
    verify_bin,
)
from fr_dist.models import create_backbone
from fr_dist.testing import spawn_gloo

KEYS = {"accuracy", "accuracy_std", "threshold", "val_at_far_1e-3", "val_std", "far", "auc", "eer"}


def _pairs_with_sq_distances(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors in 2-D whose squared L2 distance is ``d`` (= 2 - 2 cos): [N, 2] each."""
    cos = 1.0 - np.asarray(d, dtype=np.float64) / 2.0
    e1 = np.tile([1.0, 0.0], (len(d), 1))
    e2 = np.stack([cos, np.sqrt(np.clip(1 - cos**2, 0, None))], axis=1)
    return e1, e2


def test_kfold_is_sklearn_kfold_without_shuffle():
    folds = list(kfold_splits(25, 10))
    assert [len(te) for _, te in folds] == [3] * 5 + [2] * 5  # first n % k folds one longer
    assert np.concatenate([te for _, te in folds]).tolist() == list(range(25))  # in order
    for tr, te in folds:
        assert sorted(np.r_[tr, te].tolist()) == list(range(25)) and not set(tr) & set(te)
    ((tr, te),) = kfold_splits(7, 1)  # insightface LFold(1): train = test = all
    assert tr.tolist() == te.tolist() == list(range(7))
    with pytest.raises(ValueError, match="5 pairs cannot be split into 10 folds"):
        list(kfold_splits(5, 10))


def test_perfectly_separable_pairs():
    rng = np.random.default_rng(0)
    n = 600
    issame = np.arange(n) % 2 == 0
    e1 = l2_normalize(rng.standard_normal((n, 64)))
    # genuine: the same vector; impostor: a vector orthogonal to it (squared distance 2)
    other = l2_normalize(rng.standard_normal((n, 64)))
    ortho = l2_normalize(other - np.sum(other * e1, axis=1, keepdims=True) * e1)
    e2 = np.where(issame[:, None], e1, ortho)
    r = evaluate_pairs(e1, e2, issame)
    assert set(r) >= KEYS and all(type(r[k]) is float for k in KEYS) and r["pairs"] == n
    assert r["accuracy"] == 1.0 and r["accuracy_std"] == 0.0
    assert r["threshold"] == pytest.approx(0.01)  # first threshold accepting dist 0 only
    assert r["val_at_far_1e-3"] == 1.0 and r["val_std"] == 0.0
    assert r["auc"] == 1.0 and r["eer"] == 0.0


def test_designed_overlap_known_accuracy_and_val():
    """Each block of 10 pairs: genuine at squared distance 0.205, genuine at 3.0 (beyond every
    impostor), 8 impostors in [1.0005, 1.9755]; every fold holds 10 such blocks.

    Accuracy: the best threshold accepts 0.205 only -> 9/10 per fold, threshold 0.21.
    VAL@FAR=1e-3: the training FAR first exceeds 0 at threshold 1.001 (9/720), so the
    interpolated threshold is 1.00008 -> the 0.205 genuine pairs are accepted, the 3.0 ones and
    every impostor rejected: VAL = 0.5, FAR = 0.
    """
    imp = 1.0005 + 0.0125 * np.arange(80)  # 80 distinct impostor distances per fold
    d, same = [], []
    for _fold in range(10):
        for b in range(10):
            d += [0.205, 3.0] + list(imp[8 * b : 8 * b + 8])
            same += [True, True] + [False] * 8
    e1, e2 = _pairs_with_sq_distances(np.array(d))
    r = evaluate_pairs(e1, e2, np.array(same))
    assert r["accuracy"] == pytest.approx(0.9, abs=1e-12) and r["accuracy_std"] < 1e-12
    assert r["threshold"] == pytest.approx(0.21)
    assert r["val_at_far_1e-3"] == 0.5 and r["val_std"] == 0.0 and r["far"] == 0.0
    # cosine scores: genuine 0.8975 (above all impostors) and -0.5 (below all): AUC = 0.5 * 1
    # + 0.5 * 0, EER where 1 - x = tpr: tpr is 0.5 from fpr 0 to 1 -> x = 0.5
    assert r["auc"] == pytest.approx(0.5) and r["eer"] == pytest.approx(0.5)


def test_random_embeddings_are_chance():
    rng = np.random.default_rng(1)
    n = 4000
    e1 = l2_normalize(rng.standard_normal((n, 128)))
    e2 = l2_normalize(rng.standard_normal((n, 128)))
    issame = rng.random(n) < 0.5
    r = evaluate_pairs(e1, e2, issame)
    assert 0.46 <= r["accuracy"] <= 0.54
    assert 0.46 <= r["auc"] <= 0.54 and 0.46 <= r["eer"] <= 0.54
    assert r["val_at_far_1e-3"] < 0.02  # VAL at FAR 1e-3 ~ 1e-3 for chance scores


def test_roc_auc_eer_match_sklearn_and_opensphere():
    # sklearn.metrics.roc_curve on these (ties at 0.8, collinear points dropped)
    y = [1, 1, 0, 1, 0, 0, 1, 0, 0, 0]
    s = [0.9, 0.8, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    fpr, tpr, thr = roc_curve(y, s)
    np.testing.assert_allclose(fpr, [0, 0, 1 / 6, 1 / 6, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.25, 0.5, 0.75, 0.75, 1, 1])
    np.testing.assert_allclose(thr, [np.inf, 0.9, 0.8, 0.7, 0.5, 0.4, 0.1])
    fpr_all, _, _ = roc_curve(y, s, drop_intermediate=False)
    assert len(fpr_all) == 10
    auc, eer = auc_eer(y, s)
    assert auc == pytest.approx(0.8125)  # sklearn.metrics.auc
    assert eer == pytest.approx(0.25)  # OpenSphere: brentq(1 - x - interp1d(fpr, tpr)(x))
    # a tie between the only genuine and impostor score: the ROC is the diagonal
    assert auc_eer([1, 0], [0.3, 0.3]) == pytest.approx((0.5, 0.5))
    assert np.isnan(auc_eer([1, 1], [0.3, 0.2])[0])  # no impostors: undefined


def test_slinear_interpolation_matches_scipy_before_1_9():
    """insightface's calculate_val calls interp1d(far, thresholds, kind='slinear') on a FAR
    curve with repeated values; scipy <= 1.8 accepted that (later versions raise, insightface
    issues #2152 / #2290). Expected values: scipy's degree-1 B-spline on knots [x0, x, xn]."""
    x = np.array([0, 0, 0, 0.5, 0.5, 1, 1], dtype=float)
    y = np.arange(7, dtype=float)
    assert interp1d_slinear(0.25, x, y) == pytest.approx(2.5)  # last 0 (y=2) -> first 0.5 (y=3)
    assert interp1d_slinear(0.5, x, y) == 4.0  # repeated value: its last y
    assert interp1d_slinear(1.0, x, y) == 0.0  # repeated maximum: empty last knot interval
    assert interp1d_slinear(0.001, np.array([0, 0, 0.001, 0.002]), np.arange(4.0)) == 2.0
    assert interp1d_slinear(0.5, np.array([0, 0.2, 0.7]), np.arange(3.0)) == pytest.approx(1.6)
    with pytest.raises(ValueError, match="outside the interpolation range"):
        interp1d_slinear(2.0, x, y)


def test_evaluate_pairs_bad_input():
    e = l2_normalize(np.ones((20, 4)))
    with pytest.raises(ValueError, match="20 embedding pairs but 19 issame labels"):
        evaluate_pairs(e, e, [True] * 19)
    with pytest.raises(ValueError, match=r"must both be \[N, D\]"):
        evaluate_pairs(e, e[:, :3], [True] * 20)


# ----------------------------------------------------------------------------- .bin + models
def test_fixture_pairs_bin_loads_and_evaluates(rec_fixture_dir):
    truth = json.loads((rec_fixture_dir / "fixture.json").read_text())["pairs_bin"]
    images, issame = load_bin(rec_fixture_dir / "pairs.bin")
    assert images.shape == (40, 112, 112, 3) and images.dtype == np.uint8
    assert issame.dtype == bool and issame.tolist() == truth["issame"]
    small, _ = load_bin(rec_fixture_dir / "pairs.bin", image_size=(56, 56))  # resized
    assert small.shape == (40, 56, 56, 3)
    # raw-pixel embeddings: a valid if weak verifier, through the full 10-fold protocol
    emb = l2_normalize(images.reshape(40, -1) - images.reshape(40, -1).mean(axis=1, keepdims=True))
    r = evaluate_pairs(emb[0::2], emb[1::2], issame, nfolds=10)
    assert r["pairs"] == 20 and 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["auc"] <= 1.0


def test_verify_bin_with_random_backbone(rec_fixture_dir):
    torch.manual_seed(0)
    model = create_backbone("iresnet_tiny", embedding_size=32).train()
    r = verify_bin(model, rec_fixture_dir / "pairs.bin", batch_size=16)
    assert model.training  # mode restored
    assert set(r) == {"flip", "noflip", "name"} and r["name"] == "pairs"
    for res in (r["flip"], r["noflip"]):
        assert set(res) >= KEYS and res["pairs"] == 20 and 0 <= res["accuracy"] <= 1
    images, _ = load_bin(rec_fixture_dir / "pairs.bin")
    e, ef = embed_images(model, images[:5], batch_size=2)
    assert e.shape == ef.shape == (5, 32)
    model.eval()
    with torch.no_grad():  # flip sum = f(x) + f(mirror(x)), insightface's scaling
        x = torch.from_numpy(images[:5]).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5)
        expect = model(x) + model(torch.flip(x, dims=[3]))
    np.testing.assert_allclose(ef, expect.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(e, model(x).detach().numpy(), rtol=1e-4, atol=1e-4)
    e2, ef2 = embed_images(model, images[:5], batch_size=3, flip=False)
    np.testing.assert_allclose(e2, e, rtol=1e-4, atol=1e-5)
    assert ef2 is e2


def _sharded_embed(rank, world, images):
    torch.manual_seed(0)
    model = create_backbone("iresnet", layers=[1, 1, 1, 1], width=4, stem_stride=2, embedding_size=8)
    e, ef = embed_images(model, images, batch_size=2, rank=rank, world_size=world)
    return e, ef


@pytest.mark.dist
def test_embedding_is_sharded_over_ranks_and_gathered():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 112, 112, 3), dtype=np.uint8)  # 5 rows over 3 ranks
    ref_e, ref_ef = _sharded_embed(0, 1, images)
    results = spawn_gloo(_sharded_embed, 3, args=(images,), timeout_s=90)
    for e, ef in results:  # every rank gets all rows, in order, padding trimmed
        assert e.shape == (5, 8)
        np.testing.assert_allclose(e, ref_e, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ef, ref_ef, rtol=1e-5, atol=1e-6)
