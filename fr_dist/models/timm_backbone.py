"""Any timm model as a face backbone: ``create_backbone("timm/<name>")`` (optional extra ``timm``)."""

from __future__ import annotations

import torch.nn as nn

__all__ = ["TimmBackbone"]


class TimmBackbone(nn.Module):
    """timm trunk (no classifier, global pooling) -> Linear -> BatchNorm1d neck of ``embedding_size``."""

    def __init__(
        self,
        model_name: str,
        embedding_size: int = 512,
        input_size: int = 112,
        dropout: float = 0.0,
        activation_checkpointing: bool = False,
        **kwargs,
    ):
        super().__init__()
        try:
            import timm
        except Exception as e:  # ImportError, or torchvision failing to import beside this torch
            raise ImportError(
                f"timm backbones need the optional extra: pip install 'fr_dist[timm]' ({type(e).__name__}: {e})"
            ) from e
        extra = dict(kwargs)
        try:
            self.trunk = timm.create_model(
                model_name, pretrained=False, num_classes=0, img_size=input_size, **extra
            )
        except TypeError:  # convnets take no img_size
            self.trunk = timm.create_model(model_name, pretrained=False, num_classes=0, **extra)
        if activation_checkpointing and hasattr(self.trunk, "set_grad_checkpointing"):
            self.trunk.set_grad_checkpointing(True)
        self.embedding_size, self.input_size = embedding_size, input_size
        self.neck = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(self.trunk.num_features, embedding_size),
            nn.BatchNorm1d(embedding_size),
        )

    def forward(self, x):
        return self.neck(self.trunk(x))  # [N, F] -> [N, D]
