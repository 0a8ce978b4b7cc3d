"""IJB path end to end: synthetic held-out identities -> IJB folder -> template TAR@FAR."""

from __future__ import annotations

import numpy as np
import torch

from fr_dist.data.synthetic import make_synthetic_ijb
from fr_dist.eval.ijb import evaluate_ijb_folder


class MeanColour(torch.nn.Module):
    """Embeds an image by its mean colour per quadrant: weak, but identity-correlated."""

    embedding_size, input_size = 12, 112

    def forward(self, x):
        q = torch.nn.functional.adaptive_avg_pool2d(x, 2)  # [N, 3, 2, 2]
        return q.flatten(1)  # [N, 12]


def test_synthetic_ijb_folder_evaluates(tmp_path):
    info = make_synthetic_ijb(tmp_path, num_identities=12, images_per_identity=6, seed=3)
    assert info["images"] == 72 and (tmp_path / "loose_crop").is_dir()
    res = evaluate_ijb_folder(MeanColour(), tmp_path)
    keys = [k for k in res if k.startswith("tar_at_far_")]
    assert {"tar_at_far_1e-4", "tar_at_far_1e-1"} <= set(keys)
    assert all(0.0 <= res[k] <= 1.0 for k in keys)
    assert res["genuine"] > 0 and res["impostor"] > 0
    assert np.isfinite(res["auc"]) and res["auc"] > 0.5  # better than chance
