"""IJB-B/C-style 1:1 template verification, as insightface ``eval_ijbc.py`` computes it.

Meta layout (``<dir>/<prefix>_...``, whitespace separated, one row per face image):

* ``<prefix>_face_tid_mid.txt``: ``image_name template_id media_id``
* ``<prefix>_template_pair_label.txt``: ``template_id_1 template_id_2 label`` (1 genuine, 0 impostor)
* ``<prefix>_name_5pts_score.txt`` (optional): ``image_name x1 y1 ... x5 y5 faceness``

Protocol (insightface defaults ``use_flip_test``, ``use_norm_score``, ``use_detector_score``):
image features = embedding (+ embedding of the mirrored image), not normalised, times the
faceness score -> per template: mean over the images of each media, summed over its media ->
L2-normalised -> pair score = cosine -> ROC (sklearn ``roc_curve``) -> TAR at each FAR is the TPR
of the ROC point whose FPR is nearest (the highest TPR among equal FPRs).

:func:`~fr_dist.data.ijb_meta.write_ijb_meta` writes this layout from per-image identity labels
(e.g. held-out synthetic identities), so the path is exercised end to end without IJB itself; the
meta files are read and written by :mod:`fr_dist.data.ijb_meta` (re-exported here).
:func:`evaluate_ijb` only needs numpy arrays, whatever computed the embeddings;
:func:`evaluate_ijb_folder` embeds a folder's images with a backbone (5-point alignment as
insightface, flip protocol, sharded over ranks) or reads precomputed features.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from fr_dist import comm
from fr_dist.data.ijb_meta import ARCFACE_5PTS, IJBMeta, find_ijb_prefix, read_ijb_meta, write_ijb_meta
from fr_dist.data.image import decode_image
from fr_dist.eval.verification import embed_images, l2_normalize, roc_curve

__all__ = [
    "IJB_FARS",
    "IJBMeta",
    "read_ijb_meta",
    "write_ijb_meta",
    "image_to_template_features",
    "score_template_pairs",
    "tar_at_far",
    "evaluate_ijb",
    "evaluate_ijb_meta",
    "evaluate_ijb_folder",
    "find_ijb_prefix",
    "similarity_transform",
    "far_key",
]

IJB_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
"""insightface's table columns (MFR reports 1e-6)."""


def far_key(far: float) -> str:
    """``1e-4 -> "tar_at_far_1e-4"`` (the result key for one FAR)."""
    exp = np.log10(far)
    text = f"1e{int(round(exp))}" if far > 0 and abs(exp - round(exp)) < 1e-9 else f"{far:g}"
    return f"tar_at_far_{text}"


# ----------------------------------------------------------------------------- protocol
def image_to_template_features(
    features: np.ndarray, templates: np.ndarray, medias: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """insightface ``image2template_feature``: (L2-normalised template features [T, D], sorted
    unique template ids [T]); per template, the mean over each media's images, summed over media."""
    features = np.asarray(features, dtype=np.float64)
    templates, medias = np.asarray(templates).ravel(), np.asarray(medias).ravel()
    if features.ndim != 2 or not features.shape[0] == templates.size == medias.size:
        raise ValueError(
            f"features {features.shape}, templates {templates.shape} and medias {medias.shape} "
            "must describe the same N images"
        )
    unique_templates, t_index = np.unique(templates, return_inverse=True)
    # (template, media) groups: mean per group, then sum per template
    groups, g_index = np.unique(np.stack([t_index, medias]), axis=1, return_inverse=True)
    g_index = g_index.ravel()
    sums = np.zeros((groups.shape[1], features.shape[1]))
    np.add.at(sums, g_index, features)  # [G, D]
    counts = np.bincount(g_index, minlength=groups.shape[1])[:, None]
    template_feats = np.zeros((unique_templates.size, features.shape[1]))
    np.add.at(template_feats, groups[0], sums / counts)  # [G, D] -> [T, D]
    return l2_normalize(template_feats), unique_templates


def score_template_pairs(
    template_feats: np.ndarray, unique_templates: np.ndarray, pair_t1, pair_t2
) -> np.ndarray:
    """Cosine score of each template pair [P] (insightface ``verification``)."""
    pair_t1, pair_t2 = np.asarray(pair_t1).ravel(), np.asarray(pair_t2).ravel()
    if pair_t1.shape != pair_t2.shape:
        raise ValueError(f"pair_t1 {pair_t1.shape} and pair_t2 {pair_t2.shape} differ")
    rows = []
    for name, t in (("pair_t1", pair_t1), ("pair_t2", pair_t2)):
        pos = np.clip(np.searchsorted(unique_templates, t), 0, unique_templates.size - 1)
        missing = unique_templates[pos] != t
        if missing.any():
            i = int(np.argmax(missing))
            raise ValueError(f"{name}[{i}] = template {int(t[i])} has no images")
        rows.append(pos)
    out = np.empty(pair_t1.size)
    for s in range(0, pair_t1.size, 100_000):  # bounded memory, as insightface
        a, b = template_feats[rows[0][s : s + 100_000]], template_feats[rows[1][s : s + 100_000]]
        out[s : s + 100_000] = np.sum(a * b, axis=1)
    return out


def tar_at_far(labels, scores, fars: Sequence[float] = IJB_FARS) -> dict:
    """insightface's TPR@FPR table: ``{far_key(far): TPR}`` and ``auc``.

    ROC by sklearn ``roc_curve`` rules (collinear points dropped), reversed; for each FAR the
    first point of minimal ``|fpr - far|``, i.e. the highest TPR at the nearest FPR.
    """
    fpr, tpr, _ = roc_curve(labels, scores)
    if np.isnan(fpr).any() or np.isnan(tpr).any():
        raise ValueError("TAR@FAR needs both genuine (1) and impostor (0) pairs")
    trapezoid = getattr(np, "trapezoid", None) or np.trapz
    out = {"auc": float(trapezoid(tpr, fpr))}
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    for far in fars:
        out[far_key(far)] = float(tpr[int(np.argmin(np.abs(fpr - far)))])
    return out


def evaluate_ijb(
    features: np.ndarray,
    templates,
    medias,
    pair_t1,
    pair_t2,
    labels,
    faceness: Optional[np.ndarray] = None,
    flip_features: Optional[np.ndarray] = None,
    normalize_images: bool = False,
    fars: Sequence[float] = IJB_FARS,
) -> dict:
    """1:1 template verification of per-image ``features`` [N, D] (row i = image i).

    Args:
        faceness: per-image detector scores [N] multiplied into the features (insightface D1).
        flip_features: embeddings of the mirrored images [N, D], added (insightface F2).
        normalize_images: L2-normalise image features first (insightface's ``use_norm_score=False``).
    Returns:
        ``{"tar_at_far_1e-6": ..., ..., "tar_at_far_1e-1": ..., "auc", "pairs", "genuine",
        "impostor", "templates"}`` (floats / ints).
    """
    x = np.asarray(features, dtype=np.float64)
    if flip_features is not None:
        flip = np.asarray(flip_features, dtype=np.float64)
        if flip.shape != x.shape:
            raise ValueError(f"flip_features {flip.shape} and features {x.shape} differ")
        x = x + flip
    if normalize_images:
        x = l2_normalize(x)
    if faceness is not None:
        fs = np.asarray(faceness, dtype=np.float64).ravel()
        if fs.size != x.shape[0]:
            raise ValueError(f"{fs.size} faceness scores for {x.shape[0]} images")
        x = x * fs[:, None]
    labels = np.asarray(labels).ravel().astype(np.int64)
    if labels.size != np.asarray(pair_t1).size:
        raise ValueError(f"{labels.size} labels for {np.asarray(pair_t1).size} pairs")
    feats, unique_templates = image_to_template_features(x, templates, medias)
    scores = score_template_pairs(feats, unique_templates, pair_t1, pair_t2)
    out = tar_at_far(labels, scores, fars)
    out.update(
        pairs=int(labels.size),
        genuine=int(labels.sum()),
        impostor=int((labels == 0).sum()),
        templates=int(unique_templates.size),
    )
    return out


def evaluate_ijb_meta(
    meta: IJBMeta,
    features: np.ndarray,
    flip_features: Optional[np.ndarray] = None,
    use_faceness: bool = True,
    **kwargs,
) -> dict:
    """:func:`evaluate_ijb` with the arrays of a :func:`read_ijb_meta` result."""
    if np.asarray(features).shape[0] != len(meta.image_names):
        raise ValueError(
            f"{np.asarray(features).shape[0]} feature rows for {len(meta.image_names)} meta images"
        )
    return evaluate_ijb(
        features,
        meta.templates,
        meta.medias,
        meta.pair_t1,
        meta.pair_t2,
        meta.labels,
        faceness=meta.faceness if use_faceness else None,
        flip_features=flip_features,
        **kwargs,
    )


# ----------------------------------------------------------------------------- images -> features
def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 similarity (rotation, uniform scale, translation) taking ``src`` [K, 2] onto ``dst``
    in the least-squares sense: Umeyama's method, as skimage ``SimilarityTransform.estimate``."""
    src, dst = np.asarray(src, dtype=np.float64), np.asarray(dst, dtype=np.float64)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    a = dst_c.T @ src_c / src.shape[0]  # [2, 2] cross-covariance
    d = np.ones(2)
    if np.linalg.det(a) < 0:
        d[1] = -1
    u, sv, vt = np.linalg.svd(a)
    if np.linalg.matrix_rank(a) == 1 and np.linalg.det(u) * np.linalg.det(vt) <= 0:
        d = np.array([1.0, -1.0])
    rot = u @ np.diag(d) @ vt
    scale = (sv @ d) / src_c.var(axis=0).sum()
    out = np.zeros((2, 3))
    out[:, :2] = scale * rot
    out[:, 2] = dst_mean - scale * rot @ src_mean
    return out


def _load_face(path: Path, size: int, landmarks: Optional[np.ndarray]) -> np.ndarray:
    """Decode to RGB and align as insightface ``Embedding.get``: similarity warp of the 5
    landmarks onto the arcface template (``size`` x ``size``, black border)."""
    import cv2

    try:
        img = decode_image(path.read_bytes())
    except FileNotFoundError:
        raise FileNotFoundError(f"IJB image not found: {path}") from None
    except Exception as e:
        raise ValueError(f"{path}: cannot be decoded ({e})") from None
    if landmarks is not None:
        m = similarity_transform(landmarks, ARCFACE_5PTS * (size / 112.0))
        if img.shape[:2] == (size, size) and np.allclose(m, [[1, 0, 0], [0, 1, 0]], atol=1e-4):
            return img  # already an aligned crop
        return cv2.warpAffine(img, m, (size, size), borderValue=0.0)
    if img.shape[:2] != (size, size):
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
    return img


def _image_root(folder: Path, names: list) -> Path:
    for cand in (folder / "loose_crop", folder / "images", folder):
        if (cand / names[0]).is_file():
            return cand
    raise FileNotFoundError(
        f"{folder}: image {names[0]!r} is in none of loose_crop/, images/ or the folder itself "
        "(or give precomputed features as <prefix>_features.npy)"
    )


def evaluate_ijb_folder(
    model,
    folder,
    prefix: Optional[str] = None,
    device="cpu",
    batch_size: int = 128,
    chunk: int = 4096,
    group=None,
    use_faceness: bool = True,
) -> dict:
    """Evaluate ``model`` on an IJB-layout folder; collective over ``group`` (every rank calls).

    Meta files live in ``folder`` or ``folder/meta`` (prefix auto-detected). Features are either
    precomputed in ``<prefix>_features.npy`` ([N, D], flip-summed; ``model`` is then unused) or
    embedded from the images named in the meta file, found in ``loose_crop/`` (IJB's release),
    ``images/`` or ``folder``, aligned with the 5 landmarks of ``<prefix>_name_5pts_score.txt``
    when present. Images are decoded ``chunk`` at a time and embedded with the flip protocol,
    each rank a slice (:func:`~fr_dist.eval.verification.embed_images`).
    Returns :func:`evaluate_ijb`'s dict plus ``prefix``.
    """
    folder = Path(folder)
    prefix = prefix or find_ijb_prefix(folder)
    meta = read_ijb_meta(folder, prefix)
    precomputed = [p / f"{prefix}_features.npy" for p in (folder, folder / "meta")]
    precomputed = [p for p in precomputed if p.is_file()]
    if precomputed:
        features = np.load(precomputed[0])
    else:
        rank, world = comm.world_info(group)
        size = int(getattr(getattr(model, "module", model), "input_size", 112))
        root = _image_root(folder, meta.image_names)
        parts = []
        for s in range(0, len(meta.image_names), chunk):
            names = meta.image_names[s : s + chunk]
            lmk = meta.landmarks[s : s + chunk] if meta.landmarks is not None else [None] * len(names)
            images = np.stack([_load_face(root / n, size, pt) for n, pt in zip(names, lmk)])
            _, flip_sum = embed_images(model, images, batch_size, device, True, rank, world, group)
            parts.append(flip_sum)  # [chunk, D]: embedding + embedding of the mirror (F2)
        features = np.concatenate(parts)  # [N, D]
    out = evaluate_ijb_meta(meta, features, use_faceness=use_faceness)
    out["prefix"] = prefix
    return out
