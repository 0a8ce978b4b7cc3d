"""The loss interface of heads/: the registry, what a head tells the trainer, a family head built from a
loss class alone, and a loss's replicated state buffers through checkpoint re-sharding."""

from __future__ import annotations

import pytest
import torch

from fr_dist.heads import BinaryHead, PartialFCHead, SphereFace2, SphereFace2Head, create_head
from fr_dist.heads.registry import margin_class, margin_names, register_loss, register_margin
from fr_dist.heads.row_optim import RowAdamW, RowOptimizer


def test_registry_names_margins_and_rejects_duplicates():
    assert margin_names("sphereface2") == ("C", "A", "M")
    assert margin_names("partial_fc") == ("arcface", "cosface", "combined")
    assert (
        margin_class("sphereface2", "A")(0.5, 3.0).clip
        and not margin_class("sphereface2", "C")(0.4, 3.0).clip
    )
    with pytest.raises(ValueError, match=r"unknown SphereFace2 margin 'B'; known: \('C', 'A', 'M'\)"):
        SphereFace2(margin="B")
    with pytest.raises(ValueError, match="unknown margin 'arc'"):
        PartialFCHead(4, 5, margin="arc")
    with pytest.raises(ValueError, match="registered twice"):
        register_loss("sphereface2")(type("Other", (BinaryHead,), {}))
    with pytest.raises(ValueError, match="registered twice"):
        register_margin("sphereface2", "C")(type("OtherC", (), {}))


def test_optimizer_contract_and_row_optimizer():
    plain = SphereFace2Head(8, 10)
    assert not plain.optimizer_contract().row_optimizer
    fused = SphereFace2Head(8, 10, fused_update=True)
    contract = fused.optimizer_contract()
    assert contract.row_optimizer and contract.option == "head.sphereface2.fused_update"
    fused.configure_row_optimizer(
        "adamw", lr=0.01, momentum=0.9, nesterov=False, weight_decay=0.1, betas=(0.8, 0.95), eps=1e-7
    )
    assert fused.row_optimizer == RowAdamW(lr=0.01, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.1)
    assert fused.weight_exp_avg_sq.shape == fused.weight.shape  # AdamW state registered by the setter
    fused.configure_row_optimizer(
        "sgd", lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4, betas=None, eps=None
    )
    assert fused.row_optimizer == RowOptimizer(lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4)
    fused.set_row_lr(0.05)
    assert fused.row_optimizer.lr == 0.05
    plain.set_row_lr(0.05)  # no row optimizer: nothing to set
    pfc = PartialFCHead(8, 10)
    assert not pfc.optimizer_contract().row_optimizer
    with pytest.raises(ValueError, match="has no row optimizer"):
        pfc.configure_row_optimizer("sgd", lr=0.1)
    with pytest.raises(ValueError, match="no row optimizer for train.optimizer='lamb'"):
        fused.configure_row_optimizer("lamb", lr=0.1)


def test_log_scalars():
    head = SphereFace2Head(8, 10)
    assert head.log_scalars() == {"sf2_bias": float(head.bias.detach())}
    assert PartialFCHead(8, 10).log_scalars() == {}


def test_family_head_from_its_loss_class_alone():
    """A registered head needs no __init__: keywords split between the loss and the family's options."""

    class Head(BinaryHead):
        loss_cls = SphereFace2

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 8, generator=g), torch.randint(0, 10, (6,), generator=g)
    a = Head(8, 10, lam=0.6, m=0.3, margin="A", chunk_size=3, seed=2)
    b = SphereFace2Head(8, 10, lam=0.6, m=0.3, margin="A", chunk_size=3, seed=2)
    assert torch.equal(a(x, y), b(x, y)) and a.chunk_size == 3
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['lamda'\\]"):
        Head(8, 10, lamda=0.6)
    assert isinstance(create_head("sphereface2", embedding_size=8, num_classes=10, lam=0.6), SphereFace2Head)


class _StatefulSF2(SphereFace2):
    """SphereFace2 with a replicated statistic (as CurricularFace's EMA t would be)."""

    def state(self):
        return {"loss_t": torch.tensor([0.25])}


def _split(rec: dict, k: int, ema0: float, ema1: float) -> list[dict]:
    """A 1-rank shard record as the two records of a 2-rank run (rows [0, k) and [k, K))."""
    out = []
    for start, stop, ema in ((0, k, ema0), (k, rec["num_classes"], ema1)):
        r = dict(rec, class_start=start, num_local=stop - start, world_size=2)
        r["params"] = dict(rec["params"], weight=rec["params"]["weight"][start:stop])
        r["state_buffers"] = {"loss_t": torch.tensor([ema])}
        out.append(r)
    return out


def test_state_buffer_is_replicated_through_resharding():
    src = BinaryHead(4, 9, _StatefulSF2(), seed=1)
    assert src.state_buffers() == {"loss_t": torch.tensor([0.25])}
    src.loss_t.fill_(0.75)
    rec = src.shard_state()
    assert "loss_t" in rec["state_buffers"] and "loss_t" not in rec["row_buffers"]
    dst = BinaryHead(4, 9, _StatefulSF2(), seed=5)
    loaded = dst.load_resharded(_split(rec, 4, 0.75, 0.5))  # 2 saved ranks -> 1: rank 0's value
    assert "loss_t" in loaded and float(dst.loss_t) == 0.75
    torch.testing.assert_close(dst.weight, src.weight, rtol=0, atol=0)
