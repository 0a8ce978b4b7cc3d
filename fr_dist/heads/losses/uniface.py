"""UniFace (Zhou et al., ICCV 2023; CVI-SZU/UniFace ``head.py`` ``Unified_Cross_Entropy_Loss``): the unified
cross-entropy, a margin-balanced sigmoid per (sample, class) pair with one learnable bias, no normaliser.

For a global batch of B embeddings with c_ij = <x_i / max(|x_i|, eps), w_j / max(|w_j|, eps)> (eps 1e-5)::

    L = (1/B) sum_i [ softplus(-clamp(s (c_iy - m) - b, -s, s)) + l sum_{j != y_i} softplus(clamp(s c_ij - b, -s, s)) ]

b is initialised to log(K r 10) (K the GLOBAL number of classes). The clamps pass no gradient outside
[-s, s] (inclusive inside): neither to the cosine nor to b.

family: binary (heads/binary.py's fused pass and its Triton kernel, heads/binary_head.py's head). In the
family's closed form a negative is z = k_z clip(c + 1)^t + z0 with t = 1, k_z = s, z0 = -s - b; the logit
clamp is the cosine clip [b/s, b/s + 2] of c + 1, exact for t = 1 (``clip_logit``: the bias gradient is
masked too). The bias is the paper's b: z = ... - b (``bias_sign`` = -1), so checkpoints, logs
(``uniface_bias``) and the official module hold the same number.
rows: normalised differentiably, as the official F.normalize (``project_rows = False``): the stored rows are
never re-projected, ``weight.grad`` is dL/dW_raw (radial projection included) and the fused update steps the
raw rows, as the official SGD does; initial rows N(0, 1/D), the official kaiming_normal_(a=1, fan_in) std.
margin: the target's, s (c - m) - b; no variants. state: none.
hyper-parameters (official names): m, s, l (weight of the negatives), r (only in the bias init here).

Differences from the official training script (train.py), said rather than hidden:

* ``r`` there is also the Partial-FC rate: each step keeps int(K r) classes (all positives) and drops the
  others WITHOUT reweighting. fr_dist's sampling (``sample_rate`` / ``num_negatives``) is per rank and
  reweights the sampled negatives by 1/p, an unbiased estimate of the full loss; keep r = 1 (the full
  loss's bias init) with it. Equal to the official code at sample_rate 1 (tests/golden/uniface_official.npz).
* the official SGD decays b with the weight decay (5e-4); fr_dist's head optimizer never decays a scalar
  bias (train/optim.py).
"""

from __future__ import annotations

import inspect
import math

import torch
from pydantic import Field
from pydantic.dataclasses import dataclass as pydantic_dataclass

from fr_dist.config_base import SECTION_CONFIG
from fr_dist.heads.binary import BinaryCoefficients, BinaryLoss
from fr_dist.heads.binary_head import BinaryHead
from fr_dist.heads.registry import register_loss
from fr_dist.heads.sections import BinaryFamilyConfig

__all__ = ["UniFace", "UniFaceConfig", "UniFaceHead", "uniface_bias_init"]

# the official F.normalize(..., eps=1e-5) of embeddings and rows
NORM_EPS = 1e-5


def uniface_bias_init(num_classes: int, r: float = 1.0) -> float:
    """The official initial bias log(K r 10) for K = ``num_classes`` (the GLOBAL K)."""
    return math.log(num_classes * r * 10.0)


class UniFace(BinaryLoss):
    """The unified cross-entropy with its hyper-parameters (see the module docstring)."""

    bias_metric = "uniface_bias"
    bias_sign = -1.0
    project_rows = False
    norm_eps = NORM_EPS
    clip_logit = True

    def __init__(self, m: float = 0.4, s: float = 64.0, l: float = 1.0, r: float = 1.0):  # noqa: E741
        for name, v in (("m", m), ("s", s), ("l", l), ("r", r)):
            if not math.isfinite(float(v)):
                raise ValueError(f"UniFace {name}={v!r} must be finite")
        if m < 0:
            raise ValueError(f"UniFace margin m={m!r} must be >= 0")
        if s <= 0:
            raise ValueError(f"UniFace scale s={s!r} must be > 0")
        if l <= 0:
            raise ValueError(f"UniFace negative weight l={l!r} must be > 0")
        if r <= 0:
            raise ValueError(f"UniFace r={r!r} (bias init log(K r 10)) must be > 0")
        self.m, self.s, self.l, self.r = float(m), float(s), float(l), float(r)

    def __repr__(self) -> str:
        return f"UniFace(m={self.m}, s={self.s}, l={self.l}, r={self.r})"

    def weight_init_std(self, embedding_size: int) -> float:
        # nn.init.kaiming_normal_(a=1, mode="fan_in", nonlinearity="leaky_relu"): gain 1, std 1/sqrt(D)
        return 1.0 / math.sqrt(embedding_size)

    def initial_bias(self, num_classes: int) -> float:
        return uniface_bias_init(num_classes, self.r)

    def coefficients(self, bias: float, batch_size: int) -> BinaryCoefficients:
        s = self.s
        w_pos, w_neg = 1.0 / batch_size, self.l / batch_size  # loss.sum(1).mean() over the batch
        return BinaryCoefficients(
            w_pos=w_pos,
            w_neg=w_neg,
            r=s,  # z_t = s (c - m) - b: d logit / d cos = s
            k_z=s,  # s c - b = s (c + 1) + z0
            t=1.0,
            z0=-s - bias,
            alpha=w_neg * s,  # dL/dcos = alpha * sigmoid(z) inside the clamp
            clip=True,
            lo_u=bias / s,  # s (c + 1) - s - b in [-s, s]  <=>  c + 1 in [b / s, b / s + 2]
            hi_u=bias / s + 2.0,
            exact=True,
            clip_logit=True,
        )

    def _target_z(self, cos_t, bias):
        return self.s * (cos_t - self.m) - bias  # the official cos_m_theta_p

    def target_logit(self, cos_t: torch.Tensor, bias) -> torch.Tensor:
        return self._target_z(cos_t, bias).clamp(-self.s, self.s)

    def target_slope(self, cos_t: torch.Tensor, bias):
        """The clamp's mask (1 inside [-s, s], inclusive, as torch.clamp's gradient; 0 outside): d value /
        d cos of the target (the logit's own slope s is ``coefficients().r``), and of its d z / d b."""
        z = self._target_z(cos_t, bias)
        return ((z >= -self.s) & (z <= self.s)).to(cos_t.dtype)


@register_loss("uniface")
class UniFaceHead(BinaryHead):
    """Model-parallel UniFace classifier: :class:`UniFace` on the binary family's head
    (``head.name=uniface``; every keyword is a ``head.uniface.*`` key)."""

    loss_cls = UniFace


# ----------------------------------------------------------------------------- config section

_UF = {p.name: p.default for p in inspect.signature(UniFaceHead).parameters.values()}


@pydantic_dataclass(config=SECTION_CONFIG)
class UniFaceConfig(BinaryFamilyConfig):
    """``head.uniface``: the keyword arguments of :class:`UniFaceHead` (defaults: its own, the official ones,
    except the lean update of every binary loss's section,
    :class:`~fr_dist.heads.sections.BinaryFamilyConfig`). Its rows are the raw ones (the update steps
    them with dL/dW_raw); the official ``partial_index`` sampling does not reweight, fr_dist's does (1/p)."""

    m: float = Field(_UF["m"], ge=0)
    """Cosine margin m of the target logit s (cos - m) - b (>= 0; official 0.4)."""
    s: float = Field(_UF["s"], gt=0)
    """Scale s of the logits, also their clamp [-s, s] (> 0; official 64)."""
    l: float = Field(_UF["l"], gt=0)  # noqa: E741
    """Weight l of the negatives' term (> 0; official 1)."""
    r: float = Field(_UF["r"], gt=0)
    """The bias init log(K r 10) (> 0; official 1). The official script also samples int(K r) classes per
    step with it; fr_dist samples with sample_rate / num_negatives (reweighted): keep r = 1 then."""


UniFaceHead.Config = UniFaceConfig  # the head.uniface section (torchtitan-style Component.Config)
