"""Optimizer parameter groups and LR schedules (warmup, poly, cosine, step) in optimizer steps."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn as nn

from fr_dist.train.config_load import load_config
from fr_dist.train.optim import (
    build_backbone_optimizer,
    build_head_optimizer,
    build_optimizer,
    param_groups,
)
from fr_dist.train.schedule import (
    build_scheduler,
    epochs_to_steps,
    lr_factor,
    optimizer_steps_per_epoch,
    resolve_schedule,
)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.PReLU(4)
        self.fc = nn.Linear(4, 2)
        self.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)


class TinyHead(nn.Module):
    """Shaped like a SphereFace2 shard: proxies [K_local, D] and a scalar bias b."""

    def __init__(self, k=5, d=4):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(k, d))
        self.bias = nn.Parameter(torch.tensor(-3.0))


def _ids(params):
    return {id(p) for p in params}


# ----------------------------------------------------------------------------- groups


def test_param_groups_no_decay_for_ndim_le_1():
    net = TinyNet()
    groups = param_groups(net, lr=0.1, weight_decay=5e-4)
    by_name = {g["name"]: g for g in groups}
    assert _ids(by_name["decay"]["params"]) == _ids([net.conv.weight, net.fc.weight])
    assert _ids(by_name["no_decay"]["params"]) == _ids(
        [net.bn.weight, net.bn.bias, net.act.weight, net.fc.bias]
    )
    assert by_name["decay"]["weight_decay"] == 5e-4 and by_name["no_decay"]["weight_decay"] == 0.0
    assert all(g["lr"] == 0.1 for g in groups)
    assert id(net.frozen) not in _ids(p for g in groups for p in g["params"])


def test_param_groups_all_decay_when_disabled():
    groups = param_groups(TinyNet(), 0.1, 1e-4, no_decay_bn_bias=False)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 1e-4 and len(groups[0]["params"]) == 6


def test_param_groups_shared_param_once():
    lin = nn.Linear(2, 2)
    seq = nn.Sequential(lin, lin)
    n = sum(len(g["params"]) for g in param_groups(seq, 0.1, 0.0))
    assert n == 2


def test_build_optimizer_sgd_and_adamw():
    net = TinyNet()
    sgd = build_optimizer(
        "sgd", param_groups(net, 0.1, 5e-4), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    assert [g["weight_decay"] for g in sgd.param_groups] == [5e-4, 0.0]
    adam = build_optimizer(
        "adamw", param_groups(net, 1e-3, 0.05), lr=1e-3, weight_decay=0.05, betas=[0.8, 0.99]
    )
    assert isinstance(adam, torch.optim.AdamW) and adam.defaults["betas"] == (0.8, 0.99)
    assert [g["weight_decay"] for g in adam.param_groups] == [0.05, 0.0]
    with pytest.raises(ValueError, match="known: sgd, adamw"):
        build_optimizer("lamb", param_groups(net, 0.1, 0.0), lr=0.1)


def test_caller_groups_not_modified():
    groups = param_groups(TinyNet(), 0.1, 5e-4)
    before = [dict(g) for g in groups]
    build_optimizer("sgd", groups, lr=0.1, weight_decay=5e-4)
    assert [set(g) for g in groups] == [set(b) for b in before]


def test_no_decay_group_really_not_decayed():
    """One SGD step with zero gradient: decayed params shrink, BN/bias params stay."""
    net = TinyNet()
    opt = build_optimizer("sgd", param_groups(net, 1.0, 0.1), lr=1.0, momentum=0.0, weight_decay=0.1)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    w, b = net.conv.weight.detach().clone(), net.fc.bias.detach().clone()
    opt.step()
    assert torch.allclose(net.conv.weight, w * 0.9)
    assert torch.equal(net.fc.bias, b)


def group_summary(optimizer) -> list[dict]:
    """Per group: name, elements, lr, weight_decay (was fr_dist.train.optim.group_summary, test-only)."""
    return [
        dict(
            name=g["name"],
            numel=sum(p.numel() for p in g["params"]),
            lr=g["lr"],
            weight_decay=g["weight_decay"],
        )
        for g in optimizer.param_groups
    ]


def test_backbone_and_head_optimizers_from_config():
    t = load_config(None, ["train.head_lr=0.5", "train.head_weight_decay=1e-3"]).train
    head = TinyHead()
    hopt = build_head_optimizer(head, t)
    s = {g["name"]: g for g in group_summary(hopt)}
    assert s["decay"]["lr"] == 0.5 and s["decay"]["weight_decay"] == 1e-3 and s["decay"]["numel"] == 20
    assert s["no_decay"]["weight_decay"] == 0.0 and s["no_decay"]["numel"] == 1  # bias b
    bopt = build_backbone_optimizer(TinyNet(), t)
    assert {g["lr"] for g in bopt.param_groups} == {t.lr}
    # None -> the backbone's values
    t2 = load_config(None, []).train
    s2 = group_summary(build_head_optimizer(TinyHead(), t2))
    assert {g["lr"] for g in s2} == {t2.lr} and s2[0]["weight_decay"] == t2.weight_decay


def test_head_shard_with_zero_classes():
    head = TinyHead(k=0)
    opt = build_head_optimizer(head, load_config(None, []).train)
    head.weight.grad = torch.zeros_like(head.weight)
    head.bias.grad = torch.zeros_like(head.bias)
    opt.step()  # an empty shard steps without error


# ----------------------------------------------------------------------------- schedule values


def _opt(lr=0.1, n=1):
    return torch.optim.SGD([nn.Parameter(torch.zeros(1)) for _ in range(n)], lr=lr, momentum=0.9)


def _lrs(opt, sched, steps):
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_is_linear_from_zero():
    opt = _opt(0.4)
    sched = build_scheduler(opt, "poly", total_steps=100, warmup_steps=4)
    lrs = _lrs(opt, sched, 5)
    assert lrs[:4] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert lrs[4] == pytest.approx(0.4)  # the peak right after the warmup


def test_poly_values_and_end_at_min_lr():
    T, W, peak, min_lr = 20, 5, 0.1, 0.1
    opt = _opt(peak)
    sched = build_scheduler(opt, "poly", total_steps=T, warmup_steps=W, poly_power=2.0, min_lr=min_lr)
    lrs = _lrs(opt, sched, T + 3)
    for s in range(W, T):
        f = (1 - (s - W) / (T - W)) ** 2
        assert lrs[s] == pytest.approx(peak * (min_lr + (1 - min_lr) * f))
    assert lrs[T] == pytest.approx(peak * min_lr)  # step T reaches min_lr exactly ...
    assert lrs[T + 2] == pytest.approx(peak * min_lr)  # ... and stays there
    assert all(a >= b for a, b in zip(lrs[W:], lrs[W + 1 :]))  # monotone after the warmup


def test_poly_without_warmup_insightface():
    # insightface PolyScheduler without warmup: lr = base * (1 - step / total) ** 2
    opt = _opt(0.1)
    sched = build_scheduler(opt, "poly", total_steps=10)
    lrs = _lrs(opt, sched, 10)
    assert lrs == pytest.approx([0.1 * (1 - s / 10) ** 2 for s in range(10)])


def test_cosine_values():
    opt = _opt(1.0)
    sched = build_scheduler(opt, "cosine", total_steps=12, warmup_steps=2, min_lr=0.0)
    lrs = _lrs(opt, sched, 13)
    assert lrs[2] == pytest.approx(1.0)
    assert lrs[7] == pytest.approx(0.5)  # half way through the decay
    assert lrs[12] == pytest.approx(0.0, abs=1e-12)


def test_step_milestones():
    opt = _opt(0.1)
    sched = build_scheduler(opt, "step", total_steps=30, milestones_steps=[10, 20], gamma=0.1)
    lrs = _lrs(opt, sched, 30)
    assert lrs[9] == pytest.approx(0.1) and lrs[10] == pytest.approx(0.01)
    assert lrs[19] == pytest.approx(0.01) and lrs[20] == pytest.approx(0.001)
    # with warmup: milestones still count from step 0
    f = [lr_factor(s, "step", 30, 3, milestones_steps=[10], gamma=0.5) for s in (0, 1, 3, 9, 10)]
    assert f == pytest.approx([0.0, 1 / 3, 1.0, 1.0, 0.5])


def test_per_group_lrs_scale_together():
    p1, p2 = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p1], "lr": 0.1}, {"params": [p2], "lr": 1.0}], lr=0.1)
    sched = build_scheduler(opt, "poly", total_steps=10, warmup_steps=2, min_lr=0.2)
    for _ in range(6):
        opt.step()
        sched.step()
    a, b = (g["lr"] for g in opt.param_groups)
    assert b == pytest.approx(10 * a)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="known: poly, cosine, step"):
        build_scheduler(_opt(), "linear", total_steps=10)
    with pytest.raises(ValueError, match="total_steps"):
        build_scheduler(_opt(), "poly", total_steps=0)
    with pytest.raises(ValueError, match="increasing"):
        build_scheduler(_opt(), "step", total_steps=10, milestones_steps=[5, 2])


# ----------------------------------------------------------------------------- steps from epochs


def test_optimizer_steps_from_epochs():
    # MS1MV3 on 8 GPUs x 128: 5,179,510 // 1024 = 5058 steps per epoch
    assert optimizer_steps_per_epoch(5179510, 1024) == 5058
    assert epochs_to_steps(20, optimizer_steps_per_epoch(5179510, 1024)) == 101160
    # accumulation: 2 micro-steps per optimizer step
    assert optimizer_steps_per_epoch(1000, 100, grad_accum=2) == 5
    assert optimizer_steps_per_epoch(1050, 100, grad_accum=1, drop_last=False) == 11
    assert optimizer_steps_per_epoch(1050, 100, grad_accum=2, drop_last=False) == 5
    assert epochs_to_steps(0.5, optimizer_steps_per_epoch(1000, 100)) == 5
    assert optimizer_steps_per_epoch(10, 100) == 1  # never 0
    assert epochs_to_steps(2.5, 100) == 250
    with pytest.raises(ValueError):
        optimizer_steps_per_epoch(100, 0)


def test_resolve_schedule_from_config():
    t = load_config(
        None,
        [
            "train.epochs=10",
            "train.warmup_epochs=0.5",
            "train.milestones=[4, 8.5]",
            "train.schedule=step",
        ],
    ).train
    plan = resolve_schedule(t, steps_per_epoch=100)
    assert plan["total_steps"] == 1000 and plan["warmup_steps"] == 50
    assert plan["milestones_steps"] == [400, 850]
    t2 = load_config(None, ["train.max_steps=77", "train.warmup_steps=7", "train.warmup_epochs=3"]).train
    plan2 = resolve_schedule(t2, steps_per_epoch=100)
    assert plan2["total_steps"] == 77 and plan2["warmup_steps"] == 7  # steps win over epochs
    sched = build_scheduler(_opt(), t2.schedule, **plan2)
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)


# ----------------------------------------------------------------------------- resume


def test_scheduler_state_roundtrip_resumes_exactly():
    kw = dict(total_steps=40, warmup_steps=5, poly_power=2.0, min_lr=0.05)

    def make():
        torch.manual_seed(0)
        p = nn.Parameter(torch.randn(3))
        opt = torch.optim.SGD([p], lr=0.2, momentum=0.9)
        return p, opt, build_scheduler(opt, "poly", **kw)

    def step(p, opt, sched):
        opt.zero_grad()
        (p**2).sum().backward()
        opt.step()
        sched.step()
        return opt.param_groups[0]["lr"]

    # uninterrupted reference
    p, opt, sched = make()
    ref = [step(p, opt, sched) for _ in range(25)]
    ref_p = p.detach().clone()

    # 12 steps, save (through torch.save, as a checkpoint would), rebuild, load, 13 more
    p, opt, sched = make()
    first = [step(p, opt, sched) for _ in range(12)]
    buf = io.BytesIO()
    torch.save({"p": p.detach(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    p2, opt2, sched2 = make()
    with torch.no_grad():
        p2.copy_(state["p"])
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    assert sched2.last_epoch == 12
    assert opt2.param_groups[0]["lr"] == pytest.approx(ref[11])
    rest = [step(p2, opt2, sched2) for _ in range(13)]
    assert first + rest == ref
    assert torch.equal(p2.detach(), ref_p)


def test_scheduler_is_deepcopyable():
    sched = build_scheduler(_opt(), "cosine", total_steps=10)
    copy.deepcopy(sched.state_dict())
    assert math.isfinite(sched.get_last_lr()[0])
