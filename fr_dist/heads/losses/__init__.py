"""The losses: one file each, ``heads/losses/<name>.py``. Importing this package registers them all.

A head is the sharded classifier (heads/sharded.py: rows, init, gather / reduce-scatter, re-sharding state)
plus a loss of one of two families:

* binary (heads/binary.py, heads/binary_head.py): one term per (sample, class) logit, no normaliser. The
  loss subclasses :class:`~fr_dist.heads.binary.BinaryLoss` and runs on the fused chunked pass and its
  Triton kernel. Negatives take the closed form z = k_z clip(c + 1)^t + z0 (the kernel's); targets (at
  most one per row) any formula with its derivative. Today: sphereface2.
* softmax (heads/softmax.py): a margin on the target logit + the class-sharded cross-entropy (3 [N]
  all-reduces) on the Partial-FC path, materialised or chunked online softmax. The loss subclasses
  :class:`~fr_dist.heads.softmax.SoftmaxLoss`. Today: partial_fc (ArcFace / CosFace / combined).

A loss file declares, in this order:

1. its margin(s): one class per variant, ``@register_margin("<loss>", "<variant>")``; an object that gives
   the value AND the derivative (SphereFace2Margin.value / .slope, SoftmaxMargin.value / .target) and the
   attributes the pass reads (e.g. ``clip``: the Triton kernel's CLIP constexpr). The registry picks the
   class once from the config string; nothing below it compares margin names.
2. the loss class (family base class): hyper-parameters under their official names as constructor
   arguments (``head.<loss>.*`` keys), validated there; its state as ``state()`` -> {name: initial tensor}
   (replicated buffers: the head registers them with ``register_state_buffer``, so they are checkpointed
   once and restored from saved rank 0 on any world size; none today).
3. its head class, the registry line: ``@register_loss("<loss>") class XHead(BinaryHead | SoftmaxHead)``
   with ``loss_cls = X`` (keywords split between the loss and the family's options; an explicit
   ``__init__`` is optional, SphereFace2Head / PartialFCHead keep one for their documented signature).
4. its config class (``XConfig``, the ``head.<loss>`` section), then its tests (tests/unit, tests/dist).

How the next losses plug in (not implemented):

* SphereFace (A-Softmax, OpenSphere's): softmax family; a margin class whose value is
  psi(theta) = (-1)^k cos(m theta) - 2k on the target, derivative by autograd (SoftmaxMargin.target) or
  analytic. No new stage.
* AdaFace (per-sample margin from the feature norm): softmax family. ``state()`` = {batch_mean,
  batch_std} (EMA of the norms); :meth:`SoftmaxLoss.for_batch` reads the norms of the gathered raw
  embeddings x_all (detached, as AdaFace does) and updates the EMA in place while training (x_all is the
  same on every rank, so the buffers stay replicated without a collective), and returns a per-batch loss
  whose ``target(cos_t, rows)`` uses the margins of ``rows``.
* MagFace (norm-dependent margin + a regulariser): as AdaFace, but the margin m(a_i) is differentiable in
  the norm a_i: its ``target`` also returns d value / d a, and _FusedMarginSoftmax takes the norms [N] as
  one more autograd input and returns dL/da (a [T] scatter into [N]); the regulariser lambda_g g(a_i)
  involves [N] only: each rank adds it for its own B rows before the gather, divided by the global N
  (comm.reduce_from_shards of the loss value, as SphereFace2's: one scalar all-reduce, no [N] one).
* CurricularFace (state + modulated negatives): softmax family. ``state()`` = {t} (EMA of the mean target
  cosine). Its negatives above cos(theta_y + m) become cos (t + cos): the softmax path needs each row's
  threshold on every rank, one more [N] all-reduce (sum; 0 where the target is elsewhere) before the max,
  from which the mean target cosine (identical on every rank: t stays replicated, re-shard safe as a
  state buffer) also follows; a ``negatives_(logits, threshold)`` stage (value and d logit / d cos in the
  backward) is the one addition to the pass.
* UniFace (UCE, margin-balanced sigmoid): binary family. Negatives z = s cos + b (t = 1: k_z = s,
  z0 = b - s, the kernel's POW = 0 branch), target z_t = s (cos - m) + b, w_neg = lambda; its initial
  bias in ``initial_bias``. No new stage.
"""

from __future__ import annotations

import importlib
import pkgutil

from fr_dist.heads.losses import partial_fc, sphereface2
from fr_dist.heads.losses.partial_fc import ArcFace, CombinedMargin, CosFace, MarginSoftmax, PartialFCHead
from fr_dist.heads.losses.sphereface2 import (
    AdditiveAngular,
    AdditiveCosine,
    MultiplicativeAngular,
    SphereFace2,
    SphereFace2Head,
)

# the losses, their heads and their margins (registered by name; reachable as classes too)
__all__ = [
    "partial_fc",
    "sphereface2",
    "SphereFace2",
    "SphereFace2Head",
    "AdditiveCosine",
    "AdditiveAngular",
    "MultiplicativeAngular",
    "MarginSoftmax",
    "PartialFCHead",
    "ArcFace",
    "CosFace",
    "CombinedMargin",
]

# every other loss file of this package registers itself on import (a new loss is one new file)
for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")
