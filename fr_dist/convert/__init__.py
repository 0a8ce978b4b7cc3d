"""Runs of other tools in and out of fr_dist: ``fr-dist convert --from arcface_torch|opensphere``, and
``fr-dist export RUN --arcface-torch DIR``.

    __init__.py        ImportedRun: what a reader found, in one neutral form (full [K, D] rows, class order)
    arcface_torch.py   insightface arcface_torch's layouts (train_v2 checkpoint_gpu_{r}.pt, the 2022
                       softmax_fc_gpu_{r}.pt + model_epoch_{n}.pt, the older rank_{r}_softmax_weight*.pt)
    arcface_torch_write.py  the writer of model.pt + checkpoint_gpu_{r}.pt for any world size
                       (``fr-dist export RUN --arcface-torch OUT_DIR``)
    opensphere.py      OpenSphere's ckpt_{step}.pth / model_{step}.pth and its 2022 backbone_ / head_ files
    across.py          a softmax classifier into a SphereFace2 / UniFace head and back (the bias in closed form)
    run.py             an ImportedRun + a training config -> an fr_dist run folder that resumes on any W

A reader never builds the model and never unpickles code (``torch.load(weights_only=True)``); it refuses
with :class:`fr_dist.errors.CheckpointError` naming the file and the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

__all__ = ["ImportedRun"]


@dataclass
class ImportedRun:
    """One run of another tool, as read: everything in fr_dist's class order and backbone key names."""

    source: str
    """Which tool and layout, e.g. ``"arcface_torch train_v2 (W=2)"``; said in the conversion's messages."""
    backbone: dict[str, torch.Tensor]
    """Backbone state dict with insightface key names (``module.`` prefixes stripped)."""
    weight: torch.Tensor
    """[K, D] classifier rows of every class, class order (shards concatenated)."""
    head_kind: str
    """``"softmax"`` (a Partial-FC / softmax-family classifier: any of fr_dist's softmax losses takes it),
    or the binary loss it was trained with: ``"sphereface2"``, ``"uniface"``."""
    bias: Optional[torch.Tensor] = None
    """The binary head's scalar bias (OpenSphere's SphereFace2 ``b``), [] or [1]; None for softmax heads."""
    backbone_momentum: Optional[dict[str, torch.Tensor]] = None
    """SGD momentum of the backbone by parameter name (same keys as ``backbone``), where the source has it."""
    weight_momentum: Optional[torch.Tensor] = None
    """[K, D] SGD momentum of the rows, where the source has it."""
    step: int = 0
    """Optimizer steps done (arcface_torch's global_step, OpenSphere's step)."""
    epoch: int = 0
    """Epochs done."""
    world_size: Optional[int] = None
    """The source run's world size (its shard files), where known: the converted run counts its global batch
    from it (``data.batch_size x world_size``), so a resume on another W scales the LR as fr_dist does."""
    notes: list[str] = field(default_factory=list)
    """What was carried and what was not, one line each; printed by ``fr-dist convert``."""
    head_hparams: dict = field(default_factory=dict)
    """The source loss's hyper-parameters under fr_dist's names where the source says them (OpenSphere's
    SphereFace2 config: ``lam``, ``r``, ``m``, ``t``, ``lw``, ``margin``); {} when unknown."""
    backbone_arch: Optional[str] = None
    """fr_dist's backbone name for the source's network (``"iresnet100"``), or a description of it
    (``"iresnet(layers=[1, 1, 1, 1], width=16)"``); None when the reader does not say."""

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def embedding_size(self) -> int:
        return int(self.weight.shape[1])
