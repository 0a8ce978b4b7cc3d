"""CurricularFace on the softmax family: registry / config, hyper-parameter validation, the state t (initial
value, EMA updated before use, training only), the negatives stage, chunked == dense (float64, W = 1 and 2) and
the official vectors on the chunked path; the one extra [N] all-reduce (curricular_target)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from loss_cases import rows_and_labels, run_batches

from fr_dist.errors import ConfigError
from fr_dist.heads import create_head
from fr_dist.heads.losses.curricularface import CurricularFace, CurricularFaceHead
from fr_dist.heads.softmax import negatives_stage
from fr_dist.testing import spawn_gloo
from fr_dist.train.config_load import load_config

B, D, K = 6, 8, 23


def _batch(world: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    W, y = rows_and_labels(world, B, K, D, g)
    x = 2.0 * F.normalize(W, dim=1)[y] + torch.randn(world * B, D, generator=g, dtype=torch.float64)
    x[1] = -3.0 * F.normalize(W, dim=1)[y[1]]  # nearly antipodal: the fallback target c - sin(pi - m) m
    return x, y, W


def _run(head, batches, rank=0, world=1):
    return run_batches(head, batches, B, rank, world)


def test_registry_config_and_validation():
    cfg = load_config(
        "configs/demo_cpu.yaml",
        ["head.name=curricularface", "head.curricularface.m=0.4", "head.curricularface.s=30", "head.curricularface.chunk_size=7"],
        check_paths=False,
    )  # fmt: skip
    head = create_head(cfg.head.name, embedding_size=D, num_classes=K, **cfg.head.head_kwargs())
    assert isinstance(head, CurricularFaceHead) and isinstance(head.loss, CurricularFace)
    assert (head.loss.m, head.loss.s, head.chunk_size) == (0.4, 30.0, 7)
    assert (
        CurricularFace.extra_collectives == ("curricular_target",)
        and CurricularFace.all_targets == "curricular_target"
    )
    for bad, key in (
        ("m=-0.1", "head.curricularface.m"),
        ("m=3.2", "head.curricularface.m"),
        ("s=0", "head.curricularface.s"),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(
                "configs/demo_cpu.yaml",
                ["head.name=curricularface", f"head.curricularface.{bad}"],
                check_paths=False,
            )
    for kw, msg in ((dict(m=-0.1), "margin m"), (dict(s=0.0), "scale s"), (dict(m=float("nan")), "finite")):
        with pytest.raises(ValueError, match=msg):
            CurricularFace(**kw)
    with pytest.raises(TypeError, match="unexpected keyword"):
        CurricularFaceHead(D, K, t_alpha=0.1)  # fmt: skip


def test_state_t_initial_value_update_before_use_and_eval():
    torch.set_default_dtype(torch.float64)
    try:
        x, y, W = _batch(1, seed=3)
        head = CurricularFaceHead(D, K).double()
        head.load_full_weight(W)
        assert set(head.state_buffers()) == {"t"} and torch.equal(head.t, torch.zeros(1, dtype=torch.float64))
        c_y = (F.normalize(x, dim=1) @ F.normalize(W, dim=1).t()).clamp(-1, 1)[torch.arange(B), y]  # [B]
        head.eval()
        head(x, y)
        assert torch.equal(head.t, torch.zeros(1, dtype=torch.float64))  # eval: t not updated
        head.train()
        loss = head(x, y)
        want_t = 0.01 * c_y.mean()
        torch.testing.assert_close(head.t, want_t.reshape(1), rtol=1e-12, atol=0)
        # the loss used the UPDATED t: the official formula with t = want_t
        ctm = c_y * math.cos(0.5) - torch.sqrt(1 - c_y**2) * math.sin(0.5)
        cos = (F.normalize(x, dim=1) @ F.normalize(W, dim=1).t()).clamp(-1, 1)
        hard = cos > ctm[:, None]
        logits = torch.where(hard, cos * (want_t + cos), cos)
        fin = torch.where(c_y > math.cos(math.pi - 0.5), ctm, c_y - math.sin(math.pi - 0.5) * 0.5)
        logits[torch.arange(B), y] = fin
        torch.testing.assert_close(loss.detach(), F.cross_entropy(64.0 * logits, y), rtol=1e-12, atol=0)
        assert bool((fin < ctm).any())  # the antipodal row took the fallback branch
        head(x, y)
        torch.testing.assert_close(head.t, (0.01 * c_y.mean() + 0.99 * want_t).reshape(1), rtol=1e-12, atol=0)
        assert head.log_scalars() == {"curricular_t": float(head.t)}
    finally:
        torch.set_default_dtype(torch.float32)


def test_negatives_stage_value_and_slope():
    loss = CurricularFace(m=0.5)
    cos = torch.tensor([[0.9, 0.2, -0.5], [0.1, 0.6, 0.3]], dtype=torch.float64, requires_grad=True)
    loss.thresholds = torch.tensor([0.1, 0.25], dtype=torch.float64)
    loss.t = torch.tensor([0.3], dtype=torch.float64)
    r, c = torch.tensor([0, 1]), torch.tensor([0, 1])  # target entries (hard, but the target's own)
    value, slope = negatives_stage(cos.detach(), loss, r, c, True)
    hard = cos.detach() > loss.thresholds[:, None]
    want = torch.where(hard, cos * (0.3 + cos), cos)
    torch.testing.assert_close(value, want.detach())
    (auto,) = torch.autograd.grad(want.sum(), cos)
    auto[r, c] = 1.0
    torch.testing.assert_close(slope, auto)
    assert hard.sum() == 4 and slope[1, 2] == 2 * 0.3 + 0.3  # a hard non-target entry: t + 2 cos
    assert negatives_stage(cos.detach(), loss, r, c, False)[1] is None


def test_chunked_equals_dense_single_process():
    torch.set_default_dtype(torch.float64)
    try:
        batches = [_batch(1, seed=s)[:2] for s in (5, 6)]
        W = _batch(1, seed=5)[2]
        runs = {}
        for chunk in (None, 1, 4, 1000):
            head = CurricularFaceHead(D, K, m=0.5, s=30.0, chunk_size=chunk).double()
            head.load_full_weight(W)
            runs[chunk] = _run(head, batches)
        for chunk in (1, 4, 1000):
            for a, b in zip(runs[None], runs[chunk]):
                for k in ("loss", "dx", "dW", "t"):
                    torch.testing.assert_close(b[k], a[k], rtol=1e-10, atol=1e-12, msg=f"chunk={chunk} {k}")
        assert not torch.equal(runs[None][0]["t"], runs[None][1]["t"])  # t evolves
    finally:
        torch.set_default_dtype(torch.float32)


def _rank_w2(rank, world):
    torch.set_default_dtype(torch.float64)
    x0, y0, W = _batch(world, seed=8)
    x1, y1, _ = _batch(world, seed=9)
    out = {}
    for chunk in (None, 1, 5):
        head = CurricularFaceHead(D, K, s=30.0, chunk_size=chunk).double()
        head.load_full_weight(W)
        out[chunk] = _run(head, [(x0, y0), (x1, y1)], rank, world)
    return out


@pytest.mark.dist
def test_chunked_equals_dense_two_ranks_and_the_extra_all_reduce():
    torch.set_default_dtype(torch.float64)
    try:
        res = spawn_gloo(_rank_w2, 2)
        x0, y0, W = _batch(2, seed=8)
        x1, y1, _ = _batch(2, seed=9)
        single = CurricularFaceHead(D, K, s=30.0).double()
        single.load_full_weight(W)
        ref = run_batches(single, [(x0, y0), (x1, y1)], 2 * B)  # the global batch on one process
    finally:
        torch.set_default_dtype(torch.float32)
    for chunk in (None, 1, 5):
        for t in range(2):
            tag = f"chunk={chunk} batch {t}"
            for r in range(2):
                torch.testing.assert_close(
                    res[r][chunk][t]["loss"], ref[t]["loss"], rtol=1e-10, atol=1e-12, msg=tag
                )
                torch.testing.assert_close(res[r][chunk][t]["t"], ref[t]["t"], rtol=1e-12, atol=0, msg=tag)
            dx = torch.cat([res[r][chunk][t]["dx"] for r in range(2)])
            torch.testing.assert_close(dx, ref[t]["dx"], rtol=1e-10, atol=1e-12, msg=tag)
            dW = torch.cat([res[r][chunk][t]["dW"] for r in range(2)])
            torch.testing.assert_close(dW, ref[t]["dW"], rtol=1e-10, atol=1e-12, msg=tag)
            st = res[0][chunk][t]["stats"]
            assert st["all_reduce"]["calls"] == 4, tag  # max, sum, target + the target cosines
            extra = st["all_reduce/curricular_target"]
            assert extra["calls"] == 1 and extra["bytes"] == 2 * B * 8, tag  # one [N] float64 vector
