"""Across heads: a softmax classifier's rows initialise a binary head (SphereFace2, UniFace) and back.

    adapt_to_head(imported, "sphereface2", cfg.head.sphereface2)   -> ImportedRun for that head
    head_kind_of("arcface")                                         "softmax", or the binary loss's name
    binary_stationary_bias(loss, K, target_cos, negative_cos)       the closed-form bias
    mean_pairwise_cosine(rows)                                      mean cos(w_j, w_k), j != k, in O(K D)

The bias. A binary loss of the family (heads/binary.py) puts, on a sample's target, w_pos softplus(-z_y)
and on each of its K - 1 negatives w_neg softplus(z_n), with logits z = a + s b (s = the loss's
``bias_sign``: +1 SphereFace2, -1 UniFace, whose logit is ... - b). If every target has cosine c_y and
every negative c_n, so a_y = target_logit(c_y) (bias 0) and a_n = k_z (c_n + 1)^t + z0 (bias 0), the
bias gradient vanishes where

    w_pos sigmoid(-(a_y + beta)) = (K - 1) w_neg sigmoid(a_n + beta),   beta = s b,

a quadratic in exp(beta) with the one positive root

    beta = log(2 z) - a_n - log(1 - z + sqrt((1 - z)^2 + 4 z exp(a_y - a_n))),   z = w_pos / ((K - 1) w_neg).

For SphereFace2 z = lam / ((1 - lam)(K - 1)); at c_y = c_n = 0 this is OpenSphere's (and fr_dist's) initial
bias exactly, the paper's init (:meth:`~fr_dist.heads.losses.sphereface2.SphereFace2Stages.bias`, which
evaluates the formula). For UniFace (w_pos = 1, w_neg = l, s = -1) at c = 0 it gives b = log(l (K - 1) - 1)
to within exp(-s m) ~ 1e-11, about log(10 r) below the official heuristic init log(10 K r); the clamps of
UniFace's logits to [-s, s] are assumed inactive (they are at these values).

Fitting the rows: an embedding of class y is modelled as x = c_y w_y + (a direction orthogonal to the rows
on average), so its negatives' mean cosine is c_n = c_y * mean_pairwise_cosine(rows), computed exactly from
the row sum: (|sum_k w_k|^2 - K) / (K (K - 1)) for unit rows. ``target_cos`` = c_y defaults to 0 (the
paper's assumption at initialisation, then c_n = 0 whatever the rows); give a trained run's mean target
cosine (its logs) to fit a fine-tune.

Rows are normalised to unit length for every target head (SphereFace2 and SphereFace re-project them
anyway; UniFace normalises them in its forward and its official init has norm ~1; the softmax losses
normalise in the forward). The rows' momentum is dropped across heads (a softmax loss's momentum is not a
binary loss's, nor SphereFace2's UniFace's); the backbone's is kept. Same kind in, same kind out: nothing
changes.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Mapping
from typing import Any, Optional

import torch
import torch.nn.functional as F

import fr_dist.heads.losses  # noqa: F401  (registers every loss: head_class knows them all)
from fr_dist.convert import ImportedRun
from fr_dist.errors import ConfigError
from fr_dist.heads.binary_head import BinaryHead
from fr_dist.heads.losses.sphereface2 import SphereFace2Stages
from fr_dist.heads.registry import head_class

__all__ = ["adapt_to_head", "head_kind_of", "binary_stationary_bias", "mean_pairwise_cosine"]


def _head_class(head_name: str) -> type:
    try:
        return head_class(head_name)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def head_kind_of(head_name: str) -> str:
    """:attr:`ImportedRun.head_kind` of fr_dist head ``head_name``: ``"softmax"`` for any softmax-family head
    (their rows are interchangeable), else the binary loss's name (``"sphereface2"``, ``"uniface"``)."""
    return head_name if issubclass(_head_class(head_name), BinaryHead) else "softmax"


def mean_pairwise_cosine(rows: torch.Tensor, chunk: int = 1 << 16) -> float:
    """Mean cosine between distinct rows of ``rows`` [K, D], (|sum w_hat|^2 - K) / (K (K - 1)); 0 for K < 2.
    fp64 accumulation, ``chunk`` rows at a time (no [K, D] fp64 copy)."""
    K = int(rows.shape[0])
    if K < 2:
        return 0.0
    total = torch.zeros(rows.shape[1], dtype=torch.float64)
    for lo in range(0, K, chunk):
        total += F.normalize(rows[lo : lo + chunk].double(), dim=1).sum(0)
    return float((total.dot(total) - K) / (K * (K - 1)))


def binary_stationary_bias(
    loss, num_classes: int, target_cos: float = 0.0, negative_cos: float = 0.0
) -> float:
    """The bias b of binary ``loss`` (a :class:`~fr_dist.heads.binary.BinaryLoss`) at which dL/db = 0 when
    every target has cosine ``target_cos`` and every negative ``negative_cos`` (the module docstring's
    closed form); K = ``num_classes`` < 2 gives 0."""
    co = loss.coefficients(0.0, 1)
    v = (
        min(max(negative_cos + 1.0, co.lo_u), co.hi_u)
        if co.clip and not co.clip_logit
        else negative_cos + 1.0
    )
    a_n = co.k_z * v**co.t + co.z0
    a_y = float(loss.target_logit(torch.tensor([float(target_cos)], dtype=torch.float64), 0.0)[0])
    lam = co.w_pos / (co.w_pos + co.w_neg)  # lam / (1 - lam) = w_pos / w_neg
    beta = SphereFace2Stages.bias(num_classes, lam, a_n, a_y)
    return beta * float(getattr(loss, "bias_sign", 1.0))


def _loss_kwargs(loss_cls: type, hparams: Any) -> dict:
    """The keywords of ``loss_cls`` found in ``hparams`` (a mapping or a config section object)."""
    names = list(inspect.signature(loss_cls).parameters)
    if hparams is None:
        return {}
    if isinstance(hparams, Mapping):
        return {n: hparams[n] for n in names if n in hparams}
    return {n: getattr(hparams, n) for n in names if hasattr(hparams, n)}


def adapt_to_head(
    imported: ImportedRun,
    head_name: str,
    hparams: Any = None,
    *,
    target_cos: float = 0.0,
    bias: Optional[float] = None,
) -> ImportedRun:
    """``imported`` for fr_dist head ``head_name`` (``head.name``): rows normalised, a binary head's bias from
    the closed form (:func:`binary_stationary_bias` at ``target_cos`` and the rows' negatives; ``bias``
    given: that value), row momentum dropped across heads; one note says what was converted.

    ``hparams``: the target loss's hyper-parameters (a mapping or the ``head.<name>`` config section; the
    loss's defaults otherwise). A new ImportedRun is returned; ``imported`` is not changed.
    """
    cls = _head_class(head_name)
    kind = head_kind_of(head_name)
    binary = kind != "softmax"
    src = imported.head_kind
    if kind == src:
        note = f"{src} head kept for {head_name}: rows, bias and momentum as read"
        given = _loss_kwargs(cls.loss_cls, hparams) if binary else {}
        differ = {k: (v, given[k]) for k, v in imported.head_hparams.items() if k in given and given[k] != v}
        if differ:
            note += "; the source trained with " + ", ".join(
                f"{k}={a} (now {b})" for k, (a, b) in differ.items()
            )
        return dataclasses.replace(imported, notes=[*imported.notes, note])
    rows = F.normalize(imported.weight.float(), dim=1)
    what = "softmax classifier" if src == "softmax" else f"{src} head"
    if imported.weight_momentum is not None:
        dropped = f"row momentum dropped ({what}'s is not a {kind} loss's)"
    else:
        dropped = "no row momentum to carry"
    if imported.backbone_momentum:
        dropped += "; backbone momentum kept"
    old_b = "" if imported.bias is None else f"; its bias {float(imported.bias.reshape(-1)[0]):.6g} dropped"
    if not binary:
        note = f"{what} -> {head_name} (softmax) head: rows normalised{old_b}; {dropped}"
        return dataclasses.replace(
            imported, weight=rows, head_kind=kind, bias=None, weight_momentum=None, head_hparams={},
            notes=[*imported.notes, note],
        )  # fmt: skip
    kwargs = _loss_kwargs(cls.loss_cls, hparams)
    try:
        loss = cls.loss_cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"head.{head_name}: {e}") from None
    K = imported.num_classes
    c_n = float(target_cos) * mean_pairwise_cosine(rows) if target_cos else 0.0
    if bias is None:
        b = binary_stationary_bias(loss, K, float(target_cos), c_n)
        how = (
            f"from the closed form (dL/db = 0 at target cos {float(target_cos):g}, negative cos {c_n:.4g}; K={K}, "
            f"{loss!r}; the initial bias would be {loss.initial_bias(K):.6g})"
        )
    else:
        b, how = float(bias), "as given"
    if not math.isfinite(b):
        raise ConfigError(f"head.{head_name}: the closed-form bias is {b} for K={K} and {loss!r}")
    note = f"{what} -> {head_name} head: rows normalised, bias b = {b:.6g} {how}{old_b}; {dropped}"
    return dataclasses.replace(
        imported,
        weight=rows,
        head_kind=kind,
        bias=torch.tensor([b], dtype=torch.float32),
        weight_momentum=None,
        head_hparams=kwargs,
        notes=[*imported.notes, note],
    )
