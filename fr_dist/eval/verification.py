"""Pair verification exactly as insightface ``eval/verification.py`` (LFW / CFP-FP / AgeDB-30 ``.bin``).

* 10 folds in order (no shuffle); squared L2 distance thresholds ``0:4:0.01``; the threshold with
  the best accuracy on 9 folds is tested on the 10th; accuracy mean +- std and the mean best
  threshold are reported.
* VAL at FAR = 1e-3 (insightface ``calculate_val``: per fold, the threshold giving the target FAR
  on the training folds by linear interpolation, VAL/FAR measured on the test fold).
* ROC AUC and EER from cosine similarities, as OpenSphere reports them.
* The "flip" protocol: the embedding of an image plus that of its mirror, L2-normalised.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fr_dist import comm

__all__ = ["evaluate_pairs", "load_bin", "embed_images", "verify_bin", "roc_curve", "auc_eer"]


def _kfold(n: int, nfolds: int):
    """sklearn KFold(n_splits, shuffle=False): first n % k folds are one longer."""
    sizes = np.full(nfolds, n // nfolds, dtype=int)
    sizes[: n % nfolds] += 1
    idx = np.arange(n)
    start = 0
    for s in sizes:
        test = idx[start : start + s]
        train = np.concatenate([idx[:start], idx[start + s :]])
        yield train, test
        start += s


def _accuracy(threshold, dist, actual):
    predict = dist < threshold
    tp = np.sum(predict & actual)
    tn = np.sum(~predict & ~actual)
    fp = np.sum(predict & ~actual)
    fn = np.sum(~predict & actual)
    tpr = 0.0 if tp + fn == 0 else tp / (tp + fn)
    fpr = 0.0 if fp + tn == 0 else fp / (fp + tn)
    return tpr, fpr, (tp + tn) / dist.size


def _val_far(threshold, dist, actual):
    predict = dist < threshold
    ta = np.sum(predict & actual)
    fa = np.sum(predict & ~actual)
    n_same, n_diff = np.sum(actual), np.sum(~actual)
    val = ta / n_same if n_same else 0.0
    far = fa / n_diff if n_diff else 0.0
    return val, far


def _interp(x, xp, fp):
    """scipy interp1d(xp, fp, kind='slinear') at x; insightface only calls it when max(far) >= target."""
    order = np.argsort(xp, kind="stable")
    return float(np.interp(x, np.asarray(xp)[order], np.asarray(fp)[order]))


def roc_curve(labels: np.ndarray, scores: np.ndarray):
    """(fpr, tpr, thresholds) over decreasing score thresholds (sklearn semantics, no drop)."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order].astype(bool)
    distinct = np.where(np.diff(s))[0]
    idx = np.r_[distinct, y.size - 1]
    tps = np.cumsum(y)[idx]
    fps = 1 + idx - tps
    tps, fps = np.r_[0, tps], np.r_[0, fps]
    P, N = max(y.sum(), 1), max((~y).sum(), 1)
    return fps / N, tps / P, np.r_[np.inf, s[idx]]


def auc_eer(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    fpr, tpr, _ = roc_curve(labels, scores)
    auc = float(np.trapezoid(tpr, fpr)) if hasattr(np, "trapezoid") else float(np.trapz(tpr, fpr))
    fnr = 1 - tpr
    i = int(np.nanargmin(np.abs(fnr - fpr)))
    eer = float((fpr[i] + fnr[i]) / 2)
    return auc, eer


def evaluate_pairs(emb1: np.ndarray, emb2: np.ndarray, issame, nfolds: int = 10, far_target: float = 1e-3) -> dict:
    """insightface 10-fold verification on L2-normalised embeddings [N, D] of the two sides."""
    emb1, emb2 = np.asarray(emb1, dtype=np.float64), np.asarray(emb2, dtype=np.float64)
    actual = np.asarray(issame, dtype=bool)
    n = min(len(actual), emb1.shape[0])
    if n < nfolds:
        raise ValueError(f"{n} pairs cannot be split into {nfolds} folds")
    dist = np.sum(np.square(emb1[:n] - emb2[:n]), axis=1)  # squared L2
    actual = actual[:n]
    thresholds = np.arange(0, 4, 0.01)
    accs, best_th, vals, fars = [], [], [], []
    for train, test in _kfold(n, nfolds):
        acc_train = np.array([_accuracy(t, dist[train], actual[train])[2] for t in thresholds])
        bi = int(np.argmax(acc_train))
        best_th.append(thresholds[bi])
        accs.append(_accuracy(thresholds[bi], dist[test], actual[test])[2])
        far_train = np.array([_val_far(t, dist[train], actual[train])[1] for t in thresholds])
        th = _interp(far_target, far_train, thresholds) if np.max(far_train) >= far_target else 0.0
        v, f = _val_far(th, dist[test], actual[test])
        vals.append(v)
        fars.append(f)
    cos = np.sum(emb1[:n] * emb2[:n], axis=1)
    auc, eer = auc_eer(actual, cos)
    return {
        "accuracy": float(np.mean(accs)),
        "accuracy_std": float(np.std(accs)),
        "threshold": float(np.mean(best_th)),
        "val_at_far_1e-3": float(np.mean(vals)),
        "val_std": float(np.std(vals)),
        "far": float(np.mean(fars)),
        "auc": auc,
        "eer": eer,
        "pairs": int(n),
    }


def load_bin(path, image_size=(112, 112)) -> tuple[np.ndarray, np.ndarray]:
    """Decode an insightface .bin: (uint8 RGB images [2N, H, W, 3], issame bool [N])."""
    import cv2

    from fr_dist.data.image import decode_image
    from fr_dist.data.pairs import read_bin

    bins, issame = read_bin(path)
    h, w = image_size
    out = np.empty((len(bins), h, w, 3), dtype=np.uint8)
    for i, b in enumerate(bins):
        try:
            img = decode_image(b)
        except Exception as e:
            raise ValueError(f"{path}: image {i} cannot be decoded ({e})") from None
        if img.shape[:2] != (h, w):
            img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
        out[i] = img
    return out, np.asarray(issame, dtype=bool)


@torch.no_grad()
def embed_images(model, images: np.ndarray, batch_size: int = 128, device="cpu", flip: bool = True,
                 rank: int = 0, world_size: int = 1, group=None) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings [N, D], embeddings + flipped-image embeddings [N, D]); rank r embeds a slice.

    The slices are padded to equal length and all-gathered, so every rank returns everything.
    """
    device = torch.device(device)
    n = images.shape[0]
    per = -(-n // world_size)
    lo, hi = min(n, rank * per), min(n, (rank + 1) * per)
    outs, outs_flip = [], []
    for s in range(lo, hi, batch_size):
        x = torch.from_numpy(images[s : min(hi, s + batch_size)]).to(device)  # [b, H, W, 3] uint8
        x = x.permute(0, 3, 1, 2).float().sub_(127.5).div_(127.5)  # [b, 3, H, W] in [-1, 1]
        e = model(x).float()
        outs.append(e)
        outs_flip.append(e + model(torch.flip(x, dims=[3])).float() if flip else e)
    dim = getattr(model, "embedding_size", None) or (outs[0].shape[1] if outs else None)
    if dim is None:
        dim = model(torch.zeros(1, 3, images.shape[1], images.shape[2], device=device)).shape[1]
    mine = torch.cat(outs) if outs else torch.zeros(0, dim, device=device)
    mine_f = torch.cat(outs_flip) if outs_flip else torch.zeros(0, dim, device=device)
    pad = per - mine.shape[0]
    both = torch.cat([mine, mine_f], dim=1)  # [k, 2D]
    both = torch.cat([both, both.new_zeros(pad, 2 * dim)]) if pad else both  # [per, 2D]
    allb = comm.all_gather(both, group, name="eval_embeddings")[:n]  # [W*per, 2D] -> [N, 2D]
    allb = allb.cpu().numpy()
    return allb[:, :dim], allb[:, dim:]


def _normalize(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def verify_bin(model, path, device="cpu", batch_size: int = 128, nfolds: int = 10, group=None) -> dict:
    """{'flip': results, 'noflip': results} for one .bin file."""
    rank, world = comm.world_info(group)
    size = getattr(model, "input_size", 112)
    images, issame = load_bin(path, (size, size))
    was = model.training
    model.eval()
    e, ef = embed_images(model, images, batch_size, device, True, rank, world, group)
    model.train(was)
    out = {}
    for name, emb in (("flip", _normalize(ef)), ("noflip", _normalize(e))):
        out[name] = evaluate_pairs(emb[0::2], emb[1::2], issame, nfolds=nfolds)
    out["name"] = Path(path).stem
    return out
