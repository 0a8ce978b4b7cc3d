"""Pair verification exactly as insightface ``eval/verification.py`` (LFW / CFP-FP / AgeDB-30 ``.bin``).

* Accuracy (``calculate_roc``): 10 folds in order (sklearn ``KFold(shuffle=False)``), squared L2
  distance between L2-normalised embeddings, pair predicted "same" when ``dist < threshold``,
  thresholds ``np.arange(0, 4, 0.01)``; per fold the first threshold with the best accuracy on
  the 9 training folds is applied to the held-out fold. Reported: mean and (population) std of the
  10 fold accuracies, and the mean of the chosen thresholds.
* VAL at FAR = 1e-3 (``calculate_val``): thresholds ``np.arange(0, 4, 0.001)``; per fold the
  threshold giving FAR = 1e-3 on the training folds by ``scipy.interpolate.interp1d(far, thr,
  kind='slinear')`` (reimplemented, 0.0 when the training FAR never reaches the target), then
  VAL and FAR measured on the held-out fold; mean VAL, its std and the mean FAR.
* ROC AUC and EER from cosine similarities, as OpenSphere ``get_metrics`` computes them
  (sklearn ``roc_curve`` + ``auc``; EER = the FPR where ``1 - fpr = tpr`` on the linearly
  interpolated ROC, i.e. its ``brentq`` root, solved exactly here). OpenSphere prints them x100;
  here they are fractions like the accuracy.
* The "flip" protocol: the embedding of an image plus that of its mirror, L2-normalised.
* The ROC figure's numbers (``roc_points``, ``tar_at_far_on_roc``, ``resolvable_fars``): the pooled
  ROC of the cosine scores of all pairs (no folds), and TAR at a FAR as the highest TAR whose FAR does
  not exceed it; a FAR below ``1 / impostor pairs`` is not resolved by the set and is not reported.

No scipy / sklearn needed; ``tests/unit/test_verification.py`` checks closed-form cases.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from fr_dist import comm
from fr_dist.data.image import decode_image, normalize_pixels
from fr_dist.data.pairs import read_bin
from fr_dist.data.recordio_format import MAX_IMAGE_PIXELS, peek_image_size
from fr_dist.errors import DataFileError

__all__ = [
    "evaluate_pairs",
    "load_bin",
    "embed_images",
    "verify_bin",
    "kfold_splits",
    "roc_curve",
    "auc_eer",
    "interp1d_slinear",
    "l2_normalize",
    "format_table",
    "roc_points",
    "tar_at_far_on_roc",
    "resolvable_fars",
    "far_label",
    "ACC_THRESHOLDS",
    "VAL_THRESHOLDS",
    "QUOTED_FARS",
]

ACC_THRESHOLDS = np.arange(0, 4, 0.01)
"""insightface ``evaluate``: thresholds for the accuracy (squared L2 distance)."""
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
"""insightface ``evaluate``: thresholds for VAL@FAR."""
QUOTED_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
"""The FARs TAR is quoted at (IJB-B/C tables, MFR's 1e-6, LFW-style VAL@FAR=1e-3): the marks of a ROC figure."""


# ----------------------------------------------------------------------------- primitives
def kfold_splits(n: int, nfolds: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index arrays of sklearn ``KFold(nfolds, shuffle=False)``; insightface's
    ``LFold`` with ``nfolds == 1`` trains and tests on everything."""
    if nfolds < 1:
        raise ValueError(f"nfolds must be >= 1, got {nfolds}")
    idx = np.arange(n)
    if nfolds == 1:
        yield idx, idx
        return
    if n < nfolds:
        raise ValueError(f"{n} pairs cannot be split into {nfolds} folds")
    sizes = np.full(nfolds, n // nfolds, dtype=np.int64)
    sizes[: n % nfolds] += 1  # the first n % k folds are one longer
    start = 0
    for s in sizes:
        yield np.concatenate([idx[:start], idx[start + s :]]), idx[start : start + s]
        start += s


def _counts_below(sorted_values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """``[sum(values < t) for t in thresholds]`` for sorted ``values``."""
    return np.searchsorted(sorted_values, thresholds, side="left")


def _rates(thresholds, dist, actual):
    """Per threshold: (true accepts, false accepts, #same, #diff) with accept = ``dist < t``."""
    same = np.sort(dist[actual])
    diff = np.sort(dist[~actual])
    return _counts_below(same, thresholds), _counts_below(diff, thresholds), same.size, diff.size


def _accuracies(thresholds, dist, actual) -> np.ndarray:
    """insightface ``calculate_accuracy`` accuracy for every threshold: (TP + TN) / n."""
    tp, fp, _, n_diff = _rates(thresholds, dist, actual)
    return (tp + (n_diff - fp)) / dist.size


def _val_far(thresholds, dist, actual) -> tuple[np.ndarray, np.ndarray]:
    """insightface ``calculate_val_far`` for every threshold (0 where a class is absent)."""
    ta, fa, n_same, n_diff = _rates(np.atleast_1d(thresholds), dist, actual)
    val = ta / n_same if n_same else np.zeros(ta.shape)
    far = fa / n_diff if n_diff else np.zeros(fa.shape)
    return val, far


def interp1d_slinear(x_new: float, x: np.ndarray, y: np.ndarray) -> float:
    """``scipy.interpolate.interp1d(x, y, kind='slinear')(x_new)`` for ``x[0] <= x_new <= x[-1]``
    after a stable sort of ``x`` (duplicates allowed, as insightface's FAR curve has).

    scipy builds a degree-1 B-spline with knots ``[x0, x0, x1, ..., xn, xn]``: between distinct
    values it interpolates from the *last* point of the lower run to the *first* of the upper
    one; at a repeated value it gives the last point's y; at a repeated maximum (an empty last
    knot interval) it gives 0.
    """
    order = np.argsort(x, kind="mergesort")
    xs, ys = np.asarray(x, dtype=np.float64)[order], np.asarray(y, dtype=np.float64)[order]
    if not xs[0] <= x_new <= xs[-1]:
        raise ValueError(f"x_new={x_new} outside the interpolation range [{xs[0]}, {xs[-1]}]")
    if xs.size == 1:
        return float(ys[0])
    lo = int(np.clip(np.searchsorted(xs, x_new, side="right") - 1, 0, xs.size - 2))
    x0, x1 = xs[lo], xs[lo + 1]
    if x1 == x0:
        return 0.0
    w = 1.0 / (x1 - x0)  # de Boor's degree-1 step, in scipy's operation order
    return float(0.0 + ys[lo] * (w * (x1 - x_new)) + ys[lo + 1] * (w * (x_new - x0)))


def roc_curve(labels, scores, drop_intermediate: bool = True):
    """``sklearn.metrics.roc_curve(labels, scores)``: (fpr, tpr, thresholds), score >= thr accepted.

    Points ordered by decreasing threshold, starting at (0, 0) with threshold ``inf``;
    ``drop_intermediate`` removes collinear points as sklearn does (insightface's IJB table
    depends on it). ``fpr`` (``tpr``) is NaN when there are no negatives (positives).
    """
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in length")
    if s.size == 0:
        raise ValueError("roc_curve needs at least one score")
    order = np.argsort(s, kind="mergesort")[::-1]  # decreasing score, as sklearn
    s, y = s[order], y[order]
    distinct = np.where(np.diff(s))[0]
    idx = np.r_[distinct, y.size - 1]  # last index of each tie group
    tps = np.cumsum(y, dtype=np.float64)[idx]
    fps = 1 + idx - tps
    thresholds = s[idx]
    if drop_intermediate and fps.size > 2:
        keep = np.where(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])[0]
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    tps, fps = np.r_[0, tps], np.r_[0, fps]
    thresholds = np.r_[np.inf, thresholds]
    with np.errstate(invalid="ignore", divide="ignore"):
        fpr = fps / fps[-1] if fps[-1] > 0 else np.full(fps.shape, np.nan)
        tpr = tps / tps[-1] if tps[-1] > 0 else np.full(tps.shape, np.nan)
    return fpr, tpr, thresholds


def _eer_from_roc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Root of ``1 - x - interp(x, fpr, tpr)`` on [0, 1] (OpenSphere's ``brentq``), exactly.

    ``np.interp`` (what scipy's linear ``interp1d`` uses) takes the highest TPR at a repeated
    FPR; between FPR values it joins the top of one vertical run to the bottom of the next, so
    the root is either inside such a segment or at a vertical jump.
    """
    xs = np.unique(fpr)
    top = np.interp(xs, fpr, tpr)  # highest TPR at each FPR
    g = 1.0 - xs - top
    k = int(np.argmax(g <= 0))  # first knot where the curve is at or above the diagonal 1 - x
    if k == 0:
        return float(xs[0])
    first = tpr[np.searchsorted(fpr, xs[k], side="left")]  # lowest TPR at xs[k]
    g_left, g_right = g[k - 1], 1.0 - xs[k] - first
    if g_right > 0:  # no crossing on the open segment: the jump at xs[k] crosses
        return float(xs[k])
    return float(xs[k - 1] + g_left * (xs[k] - xs[k - 1]) / (g_left - g_right))


def auc_eer(labels, scores) -> tuple[float, float]:
    """(ROC AUC, EER) as OpenSphere's ``get_metrics`` (fractions; NaN without both classes)."""
    fpr, tpr, _ = roc_curve(labels, scores)
    if np.isnan(fpr).any() or np.isnan(tpr).any():
        return float("nan"), float("nan")
    trapezoid = getattr(np, "trapezoid", None) or np.trapz
    return float(trapezoid(tpr, fpr)), _eer_from_roc(fpr, tpr)


def far_label(far: float) -> str:
    """``1e-3 -> "1e-3"``, ``0.002 -> "0.002"`` (JSON keys and figure labels)."""
    exp = np.log10(far) if far > 0 else np.nan
    if np.isfinite(exp) and abs(exp - round(exp)) < 1e-9:
        return f"1e{int(round(exp))}"
    return f"{far:g}"


def resolvable_fars(num_negative: int, fars=QUOTED_FARS) -> list[float]:
    """The ``fars`` a set of ``num_negative`` impostor pairs resolves: ``far >= 1 / num_negative``.

    Below ``1 / num_negative`` one false accept is already too many, so every threshold the set can
    measure there has FAR 0: the TAR it would give is the TAR at FAR 0, not at that FAR.
    """
    n = int(num_negative)
    return [float(f) for f in fars if n > 0 and f * n >= 1.0 - 1e-9]


def tar_at_far_on_roc(fpr, tpr, far: float) -> float:
    """TAR at ``far`` on a ROC (``fpr``, ``tpr``): the highest TPR among its points with FPR <= ``far``
    (the best threshold that does not exceed the FAR; 0.0 when no point does)."""
    fpr, tpr = np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
    ok = fpr <= far * (1.0 + 1e-12)  # k / n and the literal k/n are the same double; a margin anyway
    return float(np.max(tpr[ok])) if ok.any() else 0.0


def roc_points(labels, scores, fars=QUOTED_FARS, max_points: int = 2000) -> dict:
    """The ROC of ``scores`` (higher = more alike, e.g. cosines) against ``labels`` (1 genuine), as JSON
    values: what a ROC figure is drawn from (:mod:`fr_dist.eval.plot`) and regenerated from.

    Returns ``{"far": [...], "tar": [...], "threshold": [...], "num_positive", "num_negative",
    "tar_at_far": {far_label(f): TAR for the resolvable f of fars}}``. The points are
    :func:`roc_curve`'s (sklearn's rules, collinear points dropped), in increasing FAR from (0, 0)
    (threshold None: sklearn's ``inf``). A ROC of more than ``max_points`` points keeps, for
    the resolvable ``fars`` and FARs spaced evenly in log between ``1 / num_negative`` and 1
    (``max_points`` in all with the first and last point), the point of highest TAR not above each
    one, so TAR at those FARs is unchanged.
    """
    y = np.asarray(labels).astype(bool).ravel()
    fpr, tpr, thr = roc_curve(y, scores)
    if np.isnan(fpr).any() or np.isnan(tpr).any():
        raise ValueError("a ROC needs both genuine (1) and impostor (0) pairs")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    marks = resolvable_fars(n_neg, fars)
    tar_at = {far_label(f): tar_at_far_on_roc(fpr, tpr, f) for f in marks}
    if fpr.size > max_points:
        grid = np.r_[np.geomspace(1.0 / n_neg, 1.0, max(1, max_points - 2 - len(marks))), marks]
        last = np.searchsorted(fpr, grid * (1.0 + 1e-12), side="right") - 1  # highest TPR at FPR <= g
        keep = np.unique(np.r_[0, last, fpr.size - 1])
        fpr, tpr, thr = fpr[keep], tpr[keep], thr[keep]
    return {
        "far": fpr.tolist(),
        "tar": tpr.tolist(),
        "threshold": [None if not np.isfinite(t) else float(t) for t in thr],
        "num_positive": n_pos,
        "num_negative": n_neg,
        "tar_at_far": tar_at,
    }


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (sklearn ``preprocessing.normalize``: zero rows stay 0)."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm == 0, 1.0, norm)


# ----------------------------------------------------------------------------- protocol
def evaluate_pairs(
    emb1: np.ndarray,
    emb2: np.ndarray,
    issame,
    nfolds: int = 10,
    far_target: float = 1e-3,
    roc: bool = False,
) -> dict:
    """insightface 10-fold verification of pairs (``emb1[i]``, ``emb2[i]``), [N, D] each.

    The embeddings should be L2-normalised (the thresholds assume squared distances in [0, 4]).

    Returns python floats: ``accuracy``, ``accuracy_std``, ``threshold`` (mean best squared-L2
    threshold), ``val_at_far_1e-3`` (VAL at ``far_target``), ``val_std``, ``far`` (mean test
    FAR at the VAL thresholds), ``auc``, ``eer``; and ``pairs`` (int). With ``roc``, also ``roc``:
    :func:`roc_points` of the cosine similarities of all the pairs (the pooled ROC; the numbers above
    are cross-validated over the folds).
    """
    emb1 = np.asarray(emb1, dtype=np.float64)
    emb2 = np.asarray(emb2, dtype=np.float64)
    actual = np.asarray(issame).astype(bool).ravel()
    if emb1.ndim != 2 or emb1.shape != emb2.shape:
        raise ValueError(f"emb1 {emb1.shape} and emb2 {emb2.shape} must both be [N, D]")
    if emb1.shape[0] != actual.size:
        raise ValueError(f"{emb1.shape[0]} embedding pairs but {actual.size} issame labels")
    n = actual.size
    dist = np.sum(np.square(emb1 - emb2), axis=1)  # [N] squared L2

    accs, best_thresholds, vals, fars = [], [], [], []
    for train, test in kfold_splits(n, nfolds):
        # calculate_roc: first best threshold on the training folds, applied to the test fold
        acc_train = _accuracies(ACC_THRESHOLDS, dist[train], actual[train])
        best = ACC_THRESHOLDS[int(np.argmax(acc_train))]
        best_thresholds.append(best)
        accs.append(_accuracies(np.array([best]), dist[test], actual[test])[0])
        # calculate_val: threshold reaching FAR = far_target on the training folds
        _, far_train = _val_far(VAL_THRESHOLDS, dist[train], actual[train])
        if np.max(far_train) >= far_target:
            threshold = interp1d_slinear(far_target, far_train, VAL_THRESHOLDS)
        else:
            threshold = 0.0
        v, f = _val_far(threshold, dist[test], actual[test])
        vals.append(v[0])
        fars.append(f[0])

    cos = np.sum(emb1 * emb2, axis=1)  # [N] cosine similarity of the normalised embeddings
    auc, eer = auc_eer(actual, cos)
    out = {
        "accuracy": float(np.mean(accs)),
        "accuracy_std": float(np.std(accs)),
        "threshold": float(np.mean(best_thresholds)),
        "val_at_far_1e-3": float(np.mean(vals)),
        "val_std": float(np.std(vals)),
        "far": float(np.mean(fars)),
        "auc": auc,
        "eer": eer,
        "pairs": int(n),
    }
    if roc:
        out["roc"] = roc_points(actual, cos)
    return out


# ----------------------------------------------------------------------------- .bin files
def load_bin(path, image_size=(112, 112)) -> tuple[np.ndarray, np.ndarray]:
    """Decode an insightface ``.bin``: (uint8 RGB images [2N, H, W, 3], issame bool [N]).

    Images ``2i`` and ``2i + 1`` form pair ``i``; images of another size are resized (bilinear).
    A malformed file or image raises :class:`~fr_dist.errors.DataFileError` (a ``ValueError``);
    an image whose header claims more than ``MAX_IMAGE_PIXELS`` pixels is refused undecoded.
    """
    bins, issame = read_bin(path)
    h, w = int(image_size[0]), int(image_size[1])
    out = np.empty((len(bins), h, w, 3), dtype=np.uint8)  # [2N, H, W, 3]
    for i, b in enumerate(bins):
        claimed = peek_image_size(b)
        if claimed is not None and claimed[0] * claimed[1] > MAX_IMAGE_PIXELS:
            raise DataFileError(
                f"{path}: image {i} (pair {i // 2}) claims {claimed[0]} x {claimed[1]} pixels "
                f"(more than {MAX_IMAGE_PIXELS}): refused before decoding"
            )
        try:
            img = decode_image(b)
        except Exception as e:
            raise DataFileError(f"{path}: image {i} (pair {i // 2}) cannot be decoded: {e}") from None
        if img.ndim != 3 or img.shape[2] != 3:
            raise DataFileError(f"{path}: image {i} decoded to shape {img.shape}, expected HxWx3")
        if img.shape[:2] != (h, w):
            import cv2

            img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
        out[i] = img
    return out, np.asarray(issame, dtype=bool)


def _unwrap(model):
    return getattr(model, "module", model)  # DDP / DataParallel


@torch.no_grad()
def embed_images(
    model,
    images: np.ndarray,
    batch_size: int = 128,
    device="cpu",
    flip: bool = True,
    rank: int = 0,
    world_size: int = 1,
    group=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Embed uint8 RGB ``images`` [N, H, W, 3] -> (embeddings [N, D], embeddings + embeddings of
    the mirrored images [N, D]), float32, not normalised; every rank returns all N rows.

    Rank ``r`` of ``world_size`` embeds the contiguous slice ``[r*P, (r+1)*P)`` with
    ``P = ceil(N / world_size)``; slices are zero-padded to P rows and all-gathered (one
    collective per call, on every rank), then trimmed. Pixels are scaled as in training
    (:func:`fr_dist.data.image.normalize_pixels`). The model runs in eval mode; its mode is restored.
    With ``flip=False`` the second array is the first.
    """
    if images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"images must be [N, H, W, 3] uint8, got {images.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    n = images.shape[0]
    per = -(-n // world_size) if n else 0
    lo, hi = min(n, rank * per), min(n, (rank + 1) * per)
    param = next(iter(model.parameters()), None)
    # inputs in the parameters' dtype (bf16 under DeepSpeed bf16); float32 without parameters
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32

    was_training = model.training
    model.eval()
    try:
        outs = []
        for s in range(lo, hi, batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[s : min(hi, s + batch_size)]))
            x = normalize_pixels(x.to(device).permute(0, 3, 1, 2), dtype)  # [b, H, W, 3] -> [b, 3, H, W]
            e = model(x).float()  # [b, D]
            if flip:
                e = torch.cat([e, e + model(torch.flip(x, dims=[3])).float()], dim=1)  # [b, 2D]
            outs.append(e)
        width = outs[0].shape[1] if outs else None
        if width is None:  # this rank has no images: learn D from one dummy forward
            probe = torch.zeros(1, 3, images.shape[1], images.shape[2], device=device, dtype=dtype)
            width = model(probe).shape[1] * (2 if flip else 1)
        mine = torch.cat(outs) if outs else torch.zeros(0, width, device=device)  # [k, W']
        if mine.shape[0] < per:
            mine = torch.cat([mine, mine.new_zeros(per - mine.shape[0], width)])  # [P, W']
        gathered = comm.all_gather(mine, group, name="eval_embeddings")  # [world*P, W']
    finally:
        model.train(was_training)
    allb = gathered[:n].cpu().numpy()  # [N, W']
    if not flip:
        return allb, allb
    d = width // 2
    return allb[:, :d], allb[:, d:]


TABLE_COLUMNS = ("accuracy", "accuracy_std", "threshold", "val_at_far_1e-3", "auc", "eer")


def format_table(results: dict) -> str:
    """``{set name: evaluate_pairs result}`` -> a fixed-width text table (sets without accuracy skipped)."""
    head = f"{'set':<18s}" + "".join(f"{c:>17s}" for c in TABLE_COLUMNS)
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        if "accuracy" not in r:
            continue
        lines.append(f"{name:<18s}" + "".join(f"{r[c]:>17.4f}" for c in TABLE_COLUMNS))
    return "\n".join(lines)


def verify_bin(
    model,
    path,
    device="cpu",
    batch_size: int = 128,
    nfolds: int = 10,
    group=None,
    image_size: Optional[int] = None,
    roc: bool = False,
) -> dict:
    """Evaluate ``model`` on one ``.bin`` file: ``{"flip": results, "noflip": results, "name": stem}``.

    Collective: every rank of ``group`` must call it (each embeds a slice). ``results`` are
    :func:`evaluate_pairs` dicts (with their ``roc`` points when ``roc``); "flip" is insightface's
    reported protocol.
    """
    rank, world = comm.world_info(group)
    size = image_size or getattr(_unwrap(model), "input_size", 112)
    images, issame = load_bin(path, (size, size))
    noflip, flipsum = embed_images(model, images, batch_size, device, True, rank, world, group)
    out = {}
    for name, emb in (("flip", l2_normalize(flipsum)), ("noflip", l2_normalize(noflip))):
        out[name] = evaluate_pairs(emb[0::2], emb[1::2], issame, nfolds=nfolds, roc=roc)  # [N, D] each
    out["name"] = Path(path).stem
    return out
