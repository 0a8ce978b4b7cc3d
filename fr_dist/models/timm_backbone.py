"""Any timm model as a face backbone: ``create_backbone("timm/<model name>", ...)``.

timm is an optional extra (``pip install 'fr_dist[timm]'``; it needs torchvision) and is imported
only when such a backbone is built. The trunk is built without pretrained weights and without its
classifier (``num_classes=0``: pooled features); transformers get ``img_size=input_size`` so their
patch grid fits 112x112 crops, convnets take any size through their global pooling. A
dropout -> Linear -> BatchNorm1d neck maps the pooled features to ``embedding_size``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["TimmBackbone", "import_timm"]


def import_timm():
    """``import timm`` or an ImportError that names the ``timm`` extra and the original cause."""
    try:
        import timm
    except Exception as e:  # ImportError, or torchvision failing to import beside this torch
        raise ImportError(
            "timm backbones need the optional 'timm' extra: pip install 'fr_dist[timm]' "
            f"(import timm failed: {type(e).__name__}: {e})"
        ) from e
    return timm


class TimmBackbone(nn.Module):
    """timm trunk (no classifier, pooled features [N, F]) -> Dropout -> Linear -> BatchNorm1d."""

    def __init__(
        self,
        model_name: str,
        embedding_size: int = 512,
        input_size: int = 112,
        dropout: float = 0.0,
        activation_checkpointing: bool = False,
        **timm_kwargs,
    ):
        super().__init__()
        timm = import_timm()
        self.model_name = model_name
        self.embedding_size, self.input_size = int(embedding_size), int(input_size)
        kw = dict(pretrained=False, num_classes=0, **timm_kwargs)
        try:  # ViT / Swin / ... take the input size; convnets reject it
            self.trunk = timm.create_model(model_name, img_size=self.input_size, **kw)
        except TypeError:
            self.trunk = timm.create_model(model_name, **kw)
        except RuntimeError as e:  # unknown model name
            raise ValueError(f"timm backbone {model_name!r}: {e}") from e
        if activation_checkpointing:
            if not hasattr(self.trunk, "set_grad_checkpointing"):
                raise ValueError(f"timm model {model_name!r} does not support activation checkpointing")
            self.trunk.set_grad_checkpointing(True)
        features = getattr(self.trunk, "num_features", None)
        if features is None:
            with torch.no_grad():
                features = self.trunk(torch.zeros(1, 3, self.input_size, self.input_size)).shape[1]
        self.neck = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(int(features), self.embedding_size),
            nn.BatchNorm1d(self.embedding_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.trunk(x)  # [N, 3, S, S] -> [N, F]
        if f.dim() != 2:
            raise RuntimeError(
                f"timm model {self.model_name!r} returned features of shape {tuple(f.shape)}, "
                "expected pooled [N, F] (num_classes=0)"
            )
        return self.neck(f.float())  # [N, F] -> [N, D]
