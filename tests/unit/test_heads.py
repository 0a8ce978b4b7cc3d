"""Single-process head behaviour: sampling, dtypes, edge cosines, empty shards, bad input, registry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import sphereface2_partial_loss

from fr_dist.heads import (
    PartialFCHead,
    SphereFace2Head,
    create_head,
    init_weight_rows,
    list_heads,
)
from fr_dist.heads.sampling import sample_classes


def test_registry():
    assert list_heads() == [
        "adaface",
        "curricularface",
        "magface",
        "partial_fc",
        "sphereface",
        "sphereface2",
        "uniface",
    ]
    assert isinstance(create_head("sphereface2", embedding_size=4, num_classes=3), SphereFace2Head)
    with pytest.raises(ValueError, match="did you mean 'sphereface2'.*known heads"):
        create_head("spherface2", embedding_size=4, num_classes=3)


def test_init_is_world_size_independent():
    full = init_weight_rows(0, 200_000, 4, seed=3)  # spans several init blocks
    for start, n in [(0, 7), (65_530, 20), (131_000, 69_000)]:
        torch.testing.assert_close(
            init_weight_rows(start, n, 4, seed=3), full[start : start + n], rtol=0, atol=0
        )
    assert not torch.equal(init_weight_rows(0, 5, 4, seed=4), full[:5])


# ----------------------------------------------------------------------------- sampling


def test_sampling_keeps_positives_and_remaps():
    g = torch.Generator().manual_seed(0)
    target = torch.tensor([3, -1, 17, 3, -1, 40, 0])
    index, remapped = sample_classes(target, num_local=50, sample_rate=0.2, generator=g)
    assert index.numel() == 10  # int(0.2 * 50)
    assert torch.all(index[1:] > index[:-1])
    for pos in (0, 3, 17, 40):
        assert pos in index.tolist()
    here = target >= 0
    assert torch.equal(index[remapped[here]], target[here])
    assert torch.equal(remapped[~here], torch.full_like(remapped[~here], -1))


def test_sampling_more_positives_than_slots_keeps_exactly_positives():
    target = torch.tensor([1, 2, 5, 7, 9])
    index, remapped = sample_classes(target, num_local=10, sample_rate=0.2)
    assert index.tolist() == [1, 2, 5, 7, 9]
    assert remapped.tolist() == [0, 1, 2, 3, 4]


def test_partial_fc_sampling_zero_grad_on_unsampled_rows():
    torch.manual_seed(0)
    head = PartialFCHead(8, 100, margin="arcface", sample_rate=0.3, seed=1)
    x = torch.randn(12, 8, requires_grad=True)
    y = torch.randint(0, 100, (12,))
    head(x, y).backward()
    idx = head.weight_index
    assert idx.numel() == 30
    assert set(y.tolist()) <= set(idx.tolist())
    unsampled = torch.ones(100, dtype=torch.bool)
    unsampled[idx] = False
    assert torch.count_nonzero(head.weight.grad[unsampled]) == 0
    assert torch.count_nonzero(head.weight.grad[idx]) > 0


def test_partial_fc_sampling_equals_dense_on_the_sampled_classes():
    """With sampling, the loss is the softmax over the positives + sampled negatives only."""
    torch.manual_seed(0)
    head = PartialFCHead(8, 60, margin="cosface", s=16.0, m3=0.3, sample_rate=0.5, seed=2).double()
    x = torch.randn(10, 8, dtype=torch.float64)
    y = torch.randint(0, 60, (10,))
    loss = head(x, y)
    idx = head.weight_index
    sub = head.weight.detach()[idx]
    ylocal = torch.searchsorted(idx, y)
    cos = F.normalize(x) @ F.normalize(sub).t()
    logits = 16.0 * torch.where(F.one_hot(ylocal, idx.numel()).bool(), cos - 0.3, cos)
    torch.testing.assert_close(loss, F.cross_entropy(logits, ylocal))


def test_sample_rate_one_is_plain_model_parallel():
    torch.manual_seed(0)
    x = torch.randn(9, 8, requires_grad=True)
    y = torch.randint(0, 20, (9,))
    a = PartialFCHead(8, 20, sample_rate=1.0, seed=5)
    b = PartialFCHead(8, 20, sample_rate=1.0, seed=5)
    la = a(x, y)
    (gxa,) = torch.autograd.grad(la, x)
    lb = b(x, y)
    (gxb,) = torch.autograd.grad(lb, x)
    assert a.weight_index is None
    torch.testing.assert_close(la, lb, rtol=0, atol=0)
    torch.testing.assert_close(gxa, gxb, rtol=0, atol=0)


def test_sampling_rng_is_seeded():
    y = torch.randint(0, 500, (6,), generator=torch.Generator().manual_seed(1))
    x = torch.randn(6, 4)
    a = PartialFCHead(4, 500, sample_rate=0.1, seed=9)
    b = PartialFCHead(4, 500, sample_rate=0.1, seed=9)
    a(x, y)
    b(x, y)
    assert torch.equal(a.weight_index, b.weight_index)


# ----------------------------------------------------------------------------- dtypes and edges


@pytest.mark.parametrize("cls", [SphereFace2Head, PartialFCHead])
def test_bf16_autocast_and_fp32_paths_run(cls):
    torch.manual_seed(0)
    head = cls(embedding_size=16, num_classes=30)
    x = torch.randn(8, 16, requires_grad=True)
    y = torch.randint(0, 30, (8,))
    loss32 = head(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16 = head(x, y)
    loss16.backward()
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16)
    assert torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()
    torch.testing.assert_close(loss16, loss32, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("margin", ["C", "A", "M"])
@pytest.mark.parametrize("grad", ["detached", "exact"])
def test_sphereface2_finite_at_cos_plus_minus_one(margin, grad):
    cos = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 1.0]], requires_grad=True)
    target = torch.tensor([0, 0])
    loss = sphereface2_partial_loss(
        cos,
        target,
        torch.zeros(1),
        lam=0.7,
        r=40,
        m=0.5,
        t=3,
        lw=50,
        margin=margin,
        grad=grad,
        batch_size=2,
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(cos.grad).all()


@pytest.mark.parametrize("margin", ["arcface", "combined"])
@pytest.mark.parametrize("grad", ["straight_through", "exact"])
def test_softmax_finite_at_cos_plus_minus_one(margin, grad):
    head = PartialFCHead(2, 2, margin=margin, grad=grad, m1=1.2, m2=0.3)
    head.load_full_weight(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], requires_grad=True)  # cosines exactly +1 and -1
    loss = head(x, torch.tensor([0, 0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()


def test_empty_local_shard_partial_loss_is_zero_and_finite():
    cos = torch.zeros(4, 0, requires_grad=True)
    loss = sphereface2_partial_loss(
        cos,
        torch.full((4,), -1),
        torch.zeros(1),
        lam=0.7,
        r=40,
        m=0.4,
        t=3,
        lw=50,
        margin="C",
        grad="detached",
        batch_size=4,
    )
    loss.backward()
    assert loss.item() == 0.0 and cos.grad.shape == (4, 0)


def test_k_equals_one():
    for cls in (SphereFace2Head, PartialFCHead):
        head = cls(embedding_size=4, num_classes=1)
        loss = head(torch.randn(3, 4), torch.zeros(3, dtype=torch.long))
        assert torch.isfinite(loss)


def test_caller_tensors_untouched():
    x = torch.randn(6, 8)
    y = torch.randint(0, 10, (6,))
    x0, y0 = x.clone(), y.clone()
    PartialFCHead(8, 10, sample_rate=0.5)(x, y)
    SphereFace2Head(8, 10)(x, y)
    assert torch.equal(x, x0) and torch.equal(y, y0)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("cls", [SphereFace2Head, PartialFCHead])
def test_bad_inputs_name_the_problem(cls):
    head = cls(embedding_size=8, num_classes=10)
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"label 10 outside \[0, 10\)"):
        head(x, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(ValueError, match=r"label -1 outside"):
        head(x, torch.tensor([0, -1, 1, 2]))
    with pytest.raises(ValueError, match=r"embeddings must be \[batch, 8\].*got \[4, 7\]"):
        head(torch.randn(4, 7), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="labels have 3 entries"):
        head(x, torch.tensor([0, 1, 2]))
    bad = x.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite.*row 2"):
        head(bad, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(TypeError, match="integer"):
        head(x, torch.tensor([0.0, 1.0, 2.0, 3.0]))


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="unknown SphereFace2 margin 'B'"):
        SphereFace2Head(4, 5, margin="B")
    with pytest.raises(ValueError, match="gradient mode"):
        SphereFace2Head(4, 5, grad="straight")
    with pytest.raises(ValueError, match=r"sample_rate must be in \(0, 1\]"):
        PartialFCHead(4, 5, sample_rate=0.0)
    with pytest.raises(ValueError, match=r"sample_rate must be in \(0, 1\]"):
        PartialFCHead(4, 5, sample_rate=1.5)
    with pytest.raises(ValueError, match=r"expected \[5, 4\]"):
        SphereFace2Head(4, 5).load_full_weight(torch.zeros(6, 4))
