"""A tiny insightface ViT trained on 2 CPU ranks: the DDP path (no patch mask: the frozen mask token
keeps DDP from waiting on an unused parameter; activation checkpointing on, as the vit_b recipes
have it) and the DeepSpeed ZeRO-1 bf16 path (patch mask on: the mask token trains)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fr_dist.testing import spawn_gloo

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import _overrides, _train  # noqa: E402

pytestmark = pytest.mark.dist

TINY_DATA = dict(
    num_identities=16, images_per_identity=4, heldout_identities=4, heldout_pairs=8, seed=7
)  # the conftest's tiny_data fixture

# 112 / patch 28 -> 16 tokens of width 16, 2 blocks: ~9 k parameters (model.kwargs of a registered ViT)
TINY_VIT = "{embed_dim: 16, depth: 2, num_heads: 2, patch_size: 28, drop_path_rate: 0.1}"


def _check_replicated(results):
    for k, v in results[0]["backbone"].items():
        if "running_" not in k and "num_batches" not in k:  # BN statistics are per rank
            torch.testing.assert_close(results[1]["backbone"][k], v, msg=k)


def _at(run, step: int) -> dict:
    """The backbone of checkpoint ``step``, as fr_dist's export path loads it (fp32)."""
    from fr_dist.export import load_backbone_from_checkpoint

    model, _ = load_backbone_from_checkpoint(run, step=step)
    return {k: v.detach() for k, v in model.named_parameters()}


def _run(tiny_data, run, **extra):
    ov = _overrides(
        tiny_data,
        run,
        **{
            "model.kwargs": TINY_VIT,
            "train.optimizer": "adamw",
            "train.lr": 1e-2,
            "train.weight_decay": 0.1,
            "train.max_steps": 3,
            "checkpoint.every": 1,
            "checkpoint.keep": 3,
            **extra,
        },
    )
    res = spawn_gloo(_train, 2, args=(ov,), timeout_s=300)
    assert res[0]["step"] == 3
    assert all(np.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in res[0]["metrics"])
    _check_replicated(res)
    first, last = _at(run, 1), _at(run, 3)
    assert last["pos_embed"].shape == (1, 16, 16) and last["pos_embed"].dtype == torch.float32
    assert not torch.equal(first["pos_embed"], last["pos_embed"])
    return first, last


def test_vit_ddp_two_ranks(tiny_data, tmp_path):
    first, last = _run(
        tiny_data,
        tmp_path / "ddp",
        **{"model.name": "vit_t_dp005_mask0", "model.activation_checkpointing": True},
    )
    torch.testing.assert_close(first["mask_token"], last["mask_token"], rtol=0, atol=0)  # frozen: no mask


def test_vit_deepspeed_two_ranks(tiny_data, tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed extra not installed")
    first, last = _run(
        tiny_data,
        tmp_path / "ds",
        **{
            "engine": "deepspeed",
            "deepspeed.zero_stage": 1,
            "deepspeed.bf16": True,
            "model.name": "vit_t",  # mask_ratio 0.1: 14 of the 16 tokens kept
        },
    )
    assert not torch.equal(first["mask_token"], last["mask_token"])  # the mask token trains
