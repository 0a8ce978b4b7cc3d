"""IJB-style template verification: insightface template aggregation and TAR@FAR table on
closed-form cases, and the meta-file writer / reader end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch.nn as nn

from fr_dist.data.ijb_meta import ARCFACE_5PTS as _ARCFACE_5PTS
from fr_dist.data.image import encode_jpeg
from fr_dist.eval.ijb import (
    IJB_FARS,
    _load_face,
    evaluate_ijb,
    evaluate_ijb_folder,
    evaluate_ijb_meta,
    far_key,
    image_to_template_features,
    read_ijb_meta,
    score_template_pairs,
    similarity_transform,
    tar_at_far,
    write_ijb_meta,
)

TAR_KEYS = [far_key(f) for f in IJB_FARS]


def test_far_keys():
    assert TAR_KEYS == [
        "tar_at_far_1e-6",
        "tar_at_far_1e-5",
        "tar_at_far_1e-4",
        "tar_at_far_1e-3",
        "tar_at_far_1e-2",
        "tar_at_far_1e-1",
    ]
    assert far_key(0.3) == "tar_at_far_0.3"


def test_tar_at_far_closed_form_nearest_roc_point():
    """1000 impostors at 0.000 .. 0.999; 5 genuine above all of them, 5 at 0.5005.

    sklearn's ROC keeps the corners (0, 0.5), (0.499, 0.5), (0.499, 1), (1, 1) (collinear points
    dropped): TAR at FAR 1e-3 and 0.1 is read at FPR 0 (TPR 0.5), at 0.3 at FPR 0.499 (the
    highest TPR there, 1.0): the nearest-point rule of insightface's table.
    """
    scores = np.r_[np.arange(1000) / 1000, [2.0] * 5, [0.5005] * 5]
    labels = np.r_[np.zeros(1000), np.ones(10)]
    r = tar_at_far(labels, scores, fars=(1e-3, 0.1, 0.3))
    assert r[far_key(1e-3)] == 0.5 and r[far_key(0.1)] == 0.5 and r[far_key(0.3)] == 1.0
    assert r["auc"] == pytest.approx(0.5 + 0.5 * 0.501)
    with pytest.raises(ValueError, match="both genuine"):
        tar_at_far(np.ones(4), np.arange(4.0))


def test_template_aggregation_media_mean_then_sum():
    e1, e2, e3 = np.eye(3)
    # template 7: media 1 holds three images of e1 (a video), media 2 one image of e2
    # template 9: one image of e1; template 4: e3 with faceness 0 beside e2
    feats = np.stack([e1, e1, e1, e2, e1, e3, e2])
    templates = np.array([7, 7, 7, 7, 9, 4, 4])
    medias = np.array([1, 1, 1, 2, 3, 4, 5])
    tf, ut = image_to_template_features(feats, templates, medias)
    assert ut.tolist() == [4, 7, 9]
    np.testing.assert_allclose(tf[1], (e1 + e2) / np.sqrt(2))  # mean(e1, e1, e1) + e2
    s = score_template_pairs(tf, ut, [7, 7], [9, 4])
    np.testing.assert_allclose(s, [1 / np.sqrt(2), 0.5])  # template 4 = (e3 + e2) / sqrt 2
    faceness = np.array([1, 1, 1, 1, 1, 0, 1.0])  # drops the e3 image of template 4
    r = evaluate_ijb(feats, templates, medias, [7, 7], [9, 4], [1, 0], faceness=faceness)
    assert r["templates"] == 3 and r["pairs"] == 2 and r["genuine"] == 1 and r["impostor"] == 1
    # faceness 0 leaves template 4 = e2: genuine cos(e1 + e2, e1) ties impostor cos(e1 + e2, e2)
    assert r["auc"] == 0.5
    # flip features are added before aggregation; norm-free unless normalize_images
    flip = np.stack([e2, e2, e2, e1, e1, e3, e2])  # template 7: mean(3 x (e1 + e2)) + (e2 + e1)
    tf_flip, _ = image_to_template_features(feats + flip, templates, medias)
    np.testing.assert_allclose(tf_flip[1], (e1 + e2) / np.sqrt(2))
    with pytest.raises(ValueError, match="template 5 has no images"):
        score_template_pairs(tf, ut, [7], [5])
    with pytest.raises(ValueError, match="same N images"):
        image_to_template_features(feats[:3], templates, medias)


def test_separable_templates_give_tar_one():
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(20), 6)  # 20 identities x 6 images
    feats = np.eye(32)[ids] * rng.uniform(0.5, 2.0, (ids.size, 1))  # identity direction, any norm
    templates = ids * 2 + (np.arange(ids.size) % 6 >= 3)  # two templates per identity
    medias = np.arange(ids.size) // 2
    tid = np.unique(templates)
    t1, t2 = np.triu_indices(tid.size, k=1)
    labels = (tid[t1] // 2 == tid[t2] // 2).astype(int)
    r = evaluate_ijb(feats, templates, medias, tid[t1], tid[t2], labels)
    assert all(r[k] == 1.0 for k in TAR_KEYS) and r["auc"] == 1.0
    assert r["genuine"] == 20 and r["impostor"] == 40 * 39 // 2 - 20


def test_write_read_meta_and_evaluate_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    n_ids, per_id = 60, 9
    ids = np.repeat(np.arange(n_ids), per_id)
    names = [f"id{i:03d}/img{j}.jpg" for i, j in zip(ids, np.tile(np.arange(per_id), n_ids))]
    info = write_ijb_meta(tmp_path / "meta", "synth", names, ids, images_per_template=3, seed=1)
    assert info["templates"] == 180 and info["genuine_pairs"] == 180  # 3 templates -> 3 pairs each
    assert info["impostor_pairs"] == 180 * 179 // 2 - 180
    meta = read_ijb_meta(tmp_path, "synth")  # dataset root with meta/ also accepted
    assert meta.image_names == names and meta.faceness.tolist() == [1.0] * len(names)
    assert meta.labels.sum() == 180 and len(meta.labels) == info["genuine_pairs"] + info["impostor_pairs"]
    # templates are single-identity, with 1..2 media each
    for t in np.unique(meta.templates):
        rows = meta.templates == t
        assert np.unique(ids[rows]).size == 1 and 1 <= np.unique(meta.medias[rows]).size <= 2
    # identity-clustered embeddings verify nearly perfectly; random ones are at chance
    centers = rng.standard_normal((n_ids, 64))
    good = centers[ids] + 0.3 * rng.standard_normal((ids.size, 64))
    r = evaluate_ijb_meta(meta, good)
    assert r[far_key(1e-4)] >= 0.95 and r["auc"] > 0.999
    rand = evaluate_ijb_meta(meta, rng.standard_normal((ids.size, 64)))
    assert 0.03 <= rand[far_key(1e-1)] <= 0.2 and 0.4 <= rand["auc"] <= 0.6
    # sampled impostors, faceness scores written and read back
    info2 = write_ijb_meta(
        tmp_path / "m2", "x", names, ids, max_impostor_pairs=500, faceness=np.full(len(names), 0.5)
    )
    m2 = read_ijb_meta(tmp_path / "m2", "x")
    assert info2["impostor_pairs"] == 500 and (m2.labels == 0).sum() == 500
    assert np.allclose(m2.faceness, 0.5)
    with pytest.raises(ValueError, match="feature rows"):
        evaluate_ijb_meta(meta, good[:10])


def test_writer_and_reader_errors(tmp_path):
    with pytest.raises(ValueError, match="has whitespace"):
        write_ijb_meta(tmp_path, "p", ["a b.jpg", "c.jpg"], [0, 1])
    with pytest.raises(ValueError, match="2 image names but 3 identity labels"):
        write_ijb_meta(tmp_path, "p", ["a.jpg", "c.jpg"], [0, 1, 1])
    with pytest.raises(ValueError, match="0 genuine"):
        write_ijb_meta(tmp_path, "p", ["a.jpg", "c.jpg"], [0, 1])  # one image per identity
    with pytest.raises(FileNotFoundError, match="p_face_tid_mid.txt"):
        read_ijb_meta(tmp_path, "p")
    (tmp_path / "p_face_tid_mid.txt").write_text("a.jpg 1 1\nb.jpg 1 x\n")
    (tmp_path / "p_template_pair_label.txt").write_text("1 1 1\n")
    with pytest.raises(ValueError, match=r"p_face_tid_mid.txt:2: media id 'x' is not an integer"):
        read_ijb_meta(tmp_path, "p")
    (tmp_path / "p_face_tid_mid.txt").write_text("a.jpg 1 1\nb.jpg 1\n")
    with pytest.raises(ValueError, match=r"p_face_tid_mid.txt:2: expected 3 fields, got 2"):
        read_ijb_meta(tmp_path, "p")
    (tmp_path / "p_face_tid_mid.txt").write_text("a.jpg 1 1\nb.jpg 1 2\n")
    (tmp_path / "p_template_pair_label.txt").write_text("1 1 2\n")
    with pytest.raises(ValueError, match=r"p_template_pair_label.txt:1: label must be 0 or 1"):
        read_ijb_meta(tmp_path, "p")
    (tmp_path / "p_template_pair_label.txt").write_text("1 1 1\n")
    (tmp_path / "p_name_5pts_score.txt").write_text("a.jpg 0.9\n")
    with pytest.raises(ValueError, match="1 rows but p_face_tid_mid.txt has 2"):
        read_ijb_meta(tmp_path, "p")


def test_similarity_transform_recovers_rotation_scale_shift():
    src = np.array([[38.3, 51.7], [73.5, 51.5], [56.0, 71.7], [41.5, 92.4], [70.7, 92.2]])
    ang, scale, shift = 0.3, 1.7, np.array([-12.0, 40.0])
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    dst = src @ (scale * rot).T + shift
    m = similarity_transform(src, dst)
    np.testing.assert_allclose(m[:, :2], scale * rot, atol=1e-9)
    np.testing.assert_allclose(m[:, 2], shift, atol=1e-9)


class _MeanColour(nn.Module):
    """Embedding = mean pixel colour (in [-1, 1]): separates identities of distinct colours."""

    embedding_size, input_size = 3, 112

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x.mean(dim=(2, 3))  # [N, 3, H, W] -> [N, 3]


def test_evaluate_ijb_folder_from_images_and_from_features(tmp_path):
    colours = np.array([[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1], [1, -1, 1], [-1, 1, 1]])
    ids = np.repeat(np.arange(6), 6)
    names = [f"{i}_{k}.jpg" for k, i in enumerate(ids)]
    (tmp_path / "images").mkdir()
    for name, i in zip(names, ids):
        rgb = np.full((112, 112, 3), (colours[i] + 1) * 110 + 10, dtype=np.uint8)
        (tmp_path / "images" / name).write_bytes(encode_jpeg(rgb))
    write_ijb_meta(tmp_path / "meta", "toy", names, ids, images_per_template=2, seed=0)
    model = _MeanColour()
    r = evaluate_ijb_folder(model, tmp_path, batch_size=8, chunk=10)  # prefix auto-detected
    assert r["prefix"] == "toy" and r["templates"] == 18 and r["genuine"] == 18
    assert all(r[k] == 1.0 for k in TAR_KEYS) and r["auc"] == 1.0
    assert model.calls == 2 * 7  # chunks 10, 10, 10, 6 -> 2 + 2 + 2 + 1 batches, image + mirror
    # precomputed features: the model is not used
    np.save(tmp_path / "meta" / "toy_features.npy", np.random.default_rng(0).standard_normal((36, 8)))
    r2 = evaluate_ijb_folder(None, tmp_path)
    assert r2["pairs"] == r["pairs"] and 0 <= r2["auc"] <= 1


def test_alignment_undoes_a_shift(tmp_path):
    rng = np.random.default_rng(0)
    img = np.zeros((112, 112, 3), dtype=np.uint8)
    img[30:90, 30:80] = rng.integers(0, 256, (60, 50, 3), dtype=np.uint8)
    shifted = np.roll(img, (7, -4), axis=(0, 1))  # face moved down 7, left 4
    path = tmp_path / "s.png"
    import cv2

    cv2.imwrite(str(path), shifted[:, :, ::-1])
    lmk = _ARCFACE_5PTS + np.array([-4.0, 7.0])  # (x, y)
    aligned = _load_face(path, 112, lmk)
    np.testing.assert_array_equal(aligned[20:100, 20:100], img[20:100, 20:100])
