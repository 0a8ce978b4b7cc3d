"""CurricularFace vectors from HuangYG123/CurricularFace's own ``head/metrics.py`` (``CurricularFace``), for
tools/make_loss_vectors.py.

head/metrics.py imports only torch / math, so it is imported whole, unmodified. Per case one official module
``CurricularFace(D, K, m=0.5, s=64.)`` (the defaults; train.py builds it with in/out features alone) is built,
cast to float64 and given the driver's weight: the official ``kernel`` is [D, K] (in_features x
out_features, normalised over dim 0), so ``kernel = W^T`` and ``dW<t> = kernel.grad^T``. Two batches run one
after another on the same module (its buffer ``t`` carries over; zero grads between, no step); the loss is
the official train.py's: ``LOSS_NAME = 'Softmax'`` (config.py) -> ``nn.CrossEntropyLoss()(outputs, labels)``
on the head's first output. ``state<t>/t`` is the module's ``t`` after batch t.

The generator checks that every branch is hit: the fallback target (c_y <= cos(pi - m), the driver's nearly
antipodal row), the margin target, hard negatives (cos_ij > cos(theta_y + m)), and that t changes.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/: the driver's inputs()

REPOSITORY = "HuangYG123/CurricularFace"
REV = "68c8727fb7cd2243ecbfd7e09c35efc87c6e2de4"
FILES = ["head/metrics.py"]

HP = dict(m=0.5, s=64.0)  # CurricularFace's defaults (train.py passes only in/out features)
SEEDS = {"k29": 18_301, "k3": 18_302}


def _branches(x, W, y, m):
    """Counts of the official code's branches on batch (x, y) with weight W [K, D]."""
    xn = x / x.norm(dim=1, keepdim=True)
    wn = W / W.norm(dim=1, keepdim=True)
    cos = (xn @ wn.t()).clamp(-1, 1)  # [N, K]
    c_y = cos[torch.arange(len(y)), y]  # [N]
    ctm = c_y * math.cos(m) - torch.sqrt(1 - c_y**2) * math.sin(m)
    hard = cos > ctm[:, None]
    hard[torch.arange(len(y)), y] = False
    fallback = c_y <= math.cos(math.pi - m)
    return dict(fallback=int(fallback.sum()), margin=int((~fallback).sum()), hard=int(hard.sum()))


def generate(modules):
    import make_loss_vectors as drv  # the driver (tools/ is on sys.path)

    metrics = modules["metrics.py"]
    criterion = torch.nn.CrossEntropyLoss()  # train.py's LOSS_DICT['Softmax']
    arrays, cases = {}, {}
    for case, K in drv.CASES.items():
        inp = drv.inputs(K, SEEDS[case], batches=2)
        mod = metrics.CurricularFace(drv.D, K, **HP).double()
        mod.train()
        W = torch.from_numpy(inp["W"])  # [K, D]
        with torch.no_grad():
            mod.kernel.copy_(W.t())  # official layout [D, K]
        arrays[f"{case}/W"] = W.clone().numpy()
        hits, ts = [], [float(mod.t.reshape(-1)[0])]
        for t in range(2):
            x = torch.from_numpy(inp[f"x{t}"]).clone().requires_grad_(True)  # [N, D] raw embeddings
            y = torch.from_numpy(inp[f"y{t}"])  # [N]
            mod.zero_grad(set_to_none=True)
            output, _origin = mod(x, y)  # the official forward
            loss = criterion(output, y)
            loss.backward()
            hits.append(_branches(x.detach(), W, y, HP["m"]))
            ts.append(float(mod.t.reshape(-1)[0]))
            arrays[f"{case}/x{t}"] = x.detach().numpy()
            arrays[f"{case}/y{t}"] = y.numpy()
            arrays[f"{case}/loss{t}"] = loss.detach().numpy()
            arrays[f"{case}/dx{t}"] = x.grad.numpy()
            arrays[f"{case}/dW{t}"] = mod.kernel.grad.t().contiguous().clone().numpy()  # [K, D]
            arrays[f"{case}/state{t}/t"] = mod.t.detach().reshape(1).clone().numpy()
        for kind in ("fallback", "margin", "hard"):
            if not sum(h[kind] for h in hits):
                raise AssertionError(f"{case}: the {kind} branch is never hit: pick another seed")
        if len(set(ts)) != 3:
            raise AssertionError(f"{case}: t does not evolve over the batches: {ts}")
        cases[case] = dict(K=K, N=drv.N, D=drv.D, batches=2, branches=hits, t=ts)
    meta = dict(
        hp=HP,
        cases=cases,
        notes=(
            "official head/metrics.py imported unmodified, float64; loss nn.CrossEntropyLoss (train.py's "
            "LOSS_NAME 'Softmax'); kernel = W^T, dW = kernel.grad^T; t carried over the two batches"
        ),
    )
    return arrays, meta
