"""Write OpenSphere-layout run folders for a tiny model (fixtures of fr_dist.convert.opensphere's tests).

    python tools/make_opensphere_fixture.py OUT [--layout current|2022|both] [--head SphereFace2|ArcFace|...]
        [--arch iresnet_tiny|iresnet18] [--classes 10] [--dim 8] [--steps 2]

The files follow OpenSphere's save code (ydwen/opensphere; fr_dist's own code, nothing of theirs copied):

* current (``opensphere/base_trainer.py``): ``OUT/current/checkpoint/ckpt_{step}.pth`` = ``{step, epoch:
  epoch + 1, model: {backbone, head}, optimizer, scheduler, scaler}`` and ``model_{step}.pth`` =
  ``{backbone, head}``, saved from the unwrapped modules; ``OUT/current/config.yml`` with ``model.backbone.type``
  / ``embed_dim`` and ``model.head`` (type, hyper-parameters, ``feat_dim``, ``subj_num``). ONE SGD over two
  param groups ``[backbone.parameters(), head.parameters()]`` (``init_optimizer``), MultiStepLR, a GradScaler;
  the head's ``w`` is [K, D] (SoftmaxLoss / CocoLoss: [D, K]) and re-projected onto the sphere before each
  forward; the iresnet's ``features.weight`` is trained (init 0.1), as in OpenSphere's iresnet.py.
* 2022 (``runner.py``, ``builder.py`` at 032c31b): ``OUT/2022/models/backbone_{iter}.pth`` and
  ``head_{iter}.pth``, state dicts of the DDP-wrapped modules (``module.`` prefixes), every head's ``w`` [D, K];
  saved after ``iter`` steps, no optimizer state; ``features.weight`` fixed at 1; ``OUT/2022/config.yml``
  with ``model.<part>.net``.

The backbone is fr_dist's iresnet (OpenSphere's iresnet has the same module names): ``iresnet_tiny`` for
the tests, ``iresnet18`` for checking a file against OpenSphere's own ``IResNet`` by hand.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from fr_dist.heads.losses.sphereface2 import sphereface2_bias_init
from fr_dist.models import create_backbone

SF2 = dict(alpha=0.7, r=40.0, m=0.4, t=3.0, lw=50.0)
SOFTMAX = {"ArcFace": dict(s=64.0, m=0.5), "CosFace": dict(s=64.0, m=0.35), "SphereFace": dict(s=30.0, m=1.7)}
TRANSPOSED = ("SoftmaxLoss", "CocoLoss")


class Head(nn.Module):
    """An OpenSphere proxy head's parameters: ``w`` (then ``b`` for SphereFace2), in that order."""

    def __init__(self, kind: str, num_classes: int, dim: int, rows_dk: bool):
        super().__init__()
        self.kind, self.rows_dk = kind, rows_dk
        self.w = nn.Parameter(torch.empty((dim, num_classes) if rows_dk else (num_classes, dim)))
        nn.init.xavier_normal_(self.w)
        if kind == "SphereFace2":
            b0 = sphereface2_bias_init(num_classes, SF2["alpha"], SF2["r"], SF2["m"], SF2["t"])
            self.b = nn.Parameter(torch.full((1,), b0))

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        axis = 0 if self.rows_dk else 1
        with torch.no_grad():
            self.w.data = F.normalize(self.w.data, dim=axis)  # OpenSphere's in-place re-projection
        w = self.w.t() if self.rows_dk else self.w  # [K, D]
        cos = F.normalize(x, dim=1) @ w.t()  # [B, K]
        one_hot = F.one_hot(y, cos.shape[1]).float()
        if self.kind == "SphereFace2":
            logits = SF2["r"] * (cos - SF2["m"] * (2 * one_hot - 1)) + self.b
            weight = (
                SF2["lw"]
                * cos.shape[1]
                / SF2["r"]
                * (SF2["alpha"] * one_hot + (1 - SF2["alpha"]) * (1 - one_hot))
            )
            return F.binary_cross_entropy_with_logits(logits, one_hot, weight=weight)
        return F.cross_entropy(30.0 * (cos - 0.3 * one_hot), y)


def _train(arch: str, head_kind: str, classes: int, dim: int, steps: int, seed: int, layout: str):
    torch.manual_seed(seed)
    net = create_backbone(arch, embedding_size=dim)
    if layout == "current":  # OpenSphere's iresnet.py (2023): features.weight trained, init 0.1
        nn.init.constant_(net.features.weight, 0.1)
        net.features.weight.requires_grad_(True)
    head = Head(head_kind, classes, dim, rows_dk=layout == "2022" or head_kind in TRANSPOSED)
    groups = [  # OpenSphere's init_optimizer: bkb_lr / head_lr default to lr
        {"params": net.parameters(), "lr": 0.1, "weight_decay": 5e-4},
        {"params": head.parameters(), "lr": 0.1, "weight_decay": 5e-4},
    ]
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[steps + 10, steps + 20], gamma=0.1)
    for _ in range(steps):
        x = torch.randn(4, 3, 112, 112)
        y = torch.randint(0, classes, (4,))
        opt.zero_grad()
        head.loss(net(x), y).backward()
        opt.step()
        sched.step()
    return net, head, opt, sched


def write_current(
    out: Path, arch="iresnet_tiny", head="SphereFace2", classes=10, dim=8, steps=2, seed=0
) -> Path:
    """``out/checkpoint/ckpt_{steps}.pth`` + ``model_{steps}.pth`` + ``out/config.yml``; returns the ckpt path."""
    net, hd, opt, sched = _train(arch, head, classes, dim, steps, seed, "current")
    ckpt_dir = out / "checkpoint"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    model = {"backbone": net.state_dict(), "head": hd.state_dict()}
    scaler = torch.amp.GradScaler("cpu").state_dict()  # the keys of a CUDA GradScaler(enabled=True)'s
    epoch = 0
    state = dict(
        step=steps, epoch=epoch + 1, model=model, optimizer=opt.state_dict(), scheduler=sched.state_dict()
    )
    state["scaler"] = scaler
    torch.save(state, ckpt_dir / f"ckpt_{steps}.pth")
    torch.save(model, ckpt_dir / f"model_{steps}.pth")
    hp = dict(SF2) if head == "SphereFace2" else dict(SOFTMAX.get(head, {}))
    cfg = {
        "model": {
            "backbone": {"type": arch, "embed_dim": dim},
            "head": {"type": head, **hp, "feat_dim": dim, "subj_num": classes},
        },
        "trainer": {
            "type": "ProxyBasedTrainer",
            "optimizer": {"type": "SGD", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
            "scheduler": {"type": "MultiStepLR", "milestones": [steps + 10, steps + 20], "gamma": 0.1},
        },
    }
    (out / "config.yml").write_text(yaml.dump(cfg, sort_keys=False, default_flow_style=None))
    return ckpt_dir / f"ckpt_{steps}.pth"


def write_2022(
    out: Path, arch="iresnet_tiny", head="SphereFace2", classes=10, dim=8, steps=2, seed=0
) -> Path:
    """``out/models/backbone_{steps}.pth`` + ``head_{steps}.pth`` (DDP keys) + ``out/config.yml``."""
    net, hd, _, _ = _train(arch, head, classes, dim, steps, seed, "2022")
    model_dir = out / "models"
    model_dir.mkdir(parents=True, exist_ok=True)
    for part, mod in (("backbone", net), ("head", hd)):
        sd = {f"module.{k}": v for k, v in mod.state_dict().items()}  # DistributedDataParallel.state_dict()
        torch.save(sd, model_dir / f"{part}_{steps}.pth")
    base = {"optimizer": {"type": "SGD", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}}
    hp = dict(SF2, magn_type="C") if head == "SphereFace2" else dict(SOFTMAX.get(head, {}))
    cfg = {
        "project": {"proj_dir": str(out.parent), "model_dir": "models/", "cfg_fname": "config.yml"},
        "model": {
            "backbone": {"net": {"type": arch, "out_channel": dim}, **base},
            "head": {"net": {"type": head, **hp, "feat_dim": dim, "num_class": classes}, **base},
        },
    }
    (out / "config.yml").write_text(yaml.dump(cfg, sort_keys=False, default_flow_style=None))
    return model_dir / f"backbone_{steps}.pth"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--layout", choices=("current", "2022", "both"), default="both")
    ap.add_argument("--head", default="SphereFace2", choices=("SphereFace2", *SOFTMAX, *TRANSPOSED))
    ap.add_argument("--arch", default="iresnet_tiny")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--dim", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    a = ap.parse_args(argv)
    kw = dict(arch=a.arch, head=a.head, classes=a.classes, dim=a.dim, steps=a.steps)
    if a.layout in ("current", "both"):
        print(write_current(a.out / "current", **kw))
    if a.layout in ("2022", "both"):
        print(write_2022(a.out / "2022", **kw))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
