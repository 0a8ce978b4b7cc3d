"""Pure margin math (no collectives, no parameters): SphereFace2 C / A / M and ArcFace / CosFace / combined.

All functions are element-wise on a cosine matrix ``cos`` [N, n] with a boolean target mask
``is_target`` [N, n] (True at (i, y_i) when class y_i is one of the n columns).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "SPHEREFACE2_MARGINS",
    "SOFTMAX_MARGINS",
    "sphereface2_g",
    "sphereface2_target_value",
    "sphereface2_bias_init",
    "softmax_margin_cos",
    "straight_through",
    "target_mask",
]

SPHEREFACE2_MARGINS = ("C", "A", "M")
SOFTMAX_MARGINS = ("arcface", "cosface", "combined")

# OpenSphere's clips for the angular (A / M) variants.
_COS_EPS = 1e-5
_THETA_MIN, _THETA_MAX = 1e-5, 3.14159


def target_mask(target_col: torch.Tensor, num_cols: int) -> torch.Tensor:
    """[N] column index of the target (-1 = not among these columns) -> [N, n] bool mask."""
    cols = torch.arange(num_cols, device=target_col.device)
    return target_col.unsqueeze(1) == cols.unsqueeze(0)  # [N, 1] == [1, n] -> [N, n]


def sphereface2_g(u: torch.Tensor, t: float) -> torch.Tensor:
    """Angular map g(u) = 2 ((u + 1) / 2)^t - 1 (identity for t = 1)."""
    return 2.0 * ((u + 1.0) / 2.0) ** t - 1.0


def sphereface2_target_value(
    cos: torch.Tensor, is_target: torch.Tensor, margin: str, m: float, t: float
) -> torch.Tensor:
    """The margin-shifted value g_hat that multiplies r in the logit (OpenSphere conventions).

    C: g(c) - m on targets, g(c) + m elsewhere.
    A: theta = arccos(clip(c)); theta + m on targets; clip theta; g(cos theta).
    M: as A with theta * m on targets.
    """
    if margin == "C":
        m_t = torch.tensor(m, dtype=cos.dtype, device=cos.device)
        return sphereface2_g(cos, t) + torch.where(is_target, -m_t, m_t)
    if margin not in ("A", "M"):
        raise ValueError(f"unknown SphereFace2 margin {margin!r}; known: {SPHEREFACE2_MARGINS}")
    theta = torch.acos(cos.clamp(-1.0 + _COS_EPS, 1.0 - _COS_EPS))
    moved = theta + m if margin == "A" else theta * m
    theta = torch.where(is_target, moved, theta).clamp(_THETA_MIN, _THETA_MAX)
    return sphereface2_g(torch.cos(theta), t)


def sphereface2_bias_init(
    num_classes: int, lam: float, r: float, m: float, t: float, margin: str = "C"
) -> float:
    """OpenSphere's closed-form initial bias for K = ``num_classes`` (the GLOBAL K).

    z = lam / ((1 - lam)(K - 1)); b = log(2z) - a_i - log(1 - z + sqrt((1 - z)^2 + 4 z exp(a_y - a_i))).
    K = 1 has no negatives and the formula is undefined: 0 is returned.
    """
    if margin not in SPHEREFACE2_MARGINS:
        raise ValueError(f"unknown SphereFace2 margin {margin!r}; known: {SPHEREFACE2_MARGINS}")
    if num_classes < 2:
        return 0.0
    z = lam / ((1.0 - lam) * (num_classes - 1))
    if margin == "C":
        a_i = r * (2.0 * 0.5**t - 1.0 + m)
        a_y = r * (2.0 * 0.5**t - 1.0 - m)
    else:
        a_i = r * (2.0 * 0.5**t - 1.0)
        theta_y = min(math.pi, math.pi / 2 + m) if margin == "A" else min(math.pi, m * math.pi / 2)
        a_y = r * (2.0 * ((math.cos(theta_y) + 1.0) / 2.0) ** t - 1.0)
    return (
        math.log(2.0 * z)
        - a_i
        - math.log(1.0 - z + math.sqrt((1.0 - z) ** 2 + 4.0 * z * math.exp(a_y - a_i)))
    )


def softmax_margin_cos(
    cos: torch.Tensor,
    is_target: torch.Tensor,
    margin: str,
    m1: float = 1.0,
    m2: float = 0.5,
    m3: float = 0.0,
    exact: bool = False,
) -> torch.Tensor:
    """Margin-modified cosine (before the scale s), insightface conventions.

    arcface:  cos(theta + m2) on the target (m1, m3 unused); no easy-margin fallback.
    cosface:  cos - m3 on the target (m1, m2 unused).
    combined: cos(m1 theta + m2) - m3 on the target.
    Non-target entries are unchanged. With ``exact=True`` the arccos argument is clipped to
    (-1, 1) by 1e-7 so the derivative sin(m1 theta + m2) m1 / sin(theta) stays finite.
    """
    if margin == "cosface":
        return torch.where(is_target, cos - m3, cos)
    if margin == "arcface":
        m1, m3 = 1.0, 0.0
    elif margin != "combined":
        raise ValueError(f"unknown softmax margin {margin!r}; known: {SOFTMAX_MARGINS}")
    c = cos.clamp(-1.0 + 1e-7, 1.0 - 1e-7) if exact else cos
    theta = torch.acos(c)
    return torch.where(is_target, torch.cos(m1 * theta + m2) - m3, cos)


def straight_through(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """Forward ``value``, gradient of ``surrogate`` (d value / d surrogate treated as 1)."""
    return surrogate + (value - surrogate).detach()
