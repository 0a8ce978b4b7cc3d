"""AdaFace vectors from mk-minchul/AdaFace's own ``head.py`` (``AdaFace``) and the loss of ``train_val.py``, for
tools/make_loss_vectors.py.

head.py imports only torch / math, so it is imported whole, unmodified. The official head takes what net.py's
``Backbone.forward`` returns: ``norm = torch.norm(x, 2, 1, True); output = torch.div(x, norm)`` of the raw
output x (net.py, the backbones, is not imported: those two lines are applied to the raw x directly; head.py's
``l2_norm`` is the same division). The loss is
train_val.py's ``CrossEntropyLoss()(cos_thetas, labels)`` (AdaFace returns no ``bad_grad`` tuple).

Per case one official ``AdaFace(embedding_size=D, classnum=K, m, h, s, t_alpha)`` cast to float64 (its
buffers too) and given the driver's weight: the official ``kernel`` is [D, K] (normalised over dim 0), so
``kernel = W^T`` and ``dW<t> = kernel.grad^T``. Two batches one after another on that module (its
batch_mean / batch_std carry over; zero grads between, no step); ``state<t>/batch_mean``, ``batch_std`` are
its buffers after batch t (the unused buffer ``t`` is not kept by fr_dist).

Hyper-parameters: the official m 0.4, h 0.333, s 64 and t_alpha 0.95 (the trainer's 0.01 would keep the
statistics near their initial 20 / 100, where no scaler reaches the clip on a 24-row batch; 0.95 still mixes
the previous value in, so the EMA is checked). Inputs (:func:`make_loss_vectors.inputs`, then rows placed on
purpose): batch 0 with norms log-uniform in [1e-4, 3] (below the 0.001 norm clip) and row 13 at norm 300, 0.2
rad from its class centre (above the 100 clip, scaler above +1, angle clip at eps binds on an unclamped
cosine), row 15 exactly on its class centre (a target cosine beyond the 1 - eps clamp: zero gradient); batch 1
the same directions (same seed: same W and labels) with norms in [100, 300] (all clipped to 100) except the
nearly antipodal row 4 at norm 1e-4 (scaler below -1, angle clip at pi - eps binds), and row 14 exactly on
another class's centre (a non-target cosine beyond the clamp). The generator checks that every clip is hit,
that the unclipped parts are too, and that the statistics evolve.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/: the driver's inputs()

REPOSITORY = "mk-minchul/AdaFace"
REV = "c60eaa786a42c03444f3df7096dbaf9d57ae010d"
FILES = ["head.py"]

HP = dict(m=0.4, h=0.333, s=64.0, t_alpha=0.95)
NORM_RANGES = ((1e-4, 3.0), (100.0, 300.0))  # batch 0, batch 1
SEEDS = {"k29": 18_101, "k3": 18_102}
EPS = 1e-3


def _inputs(drv, K: int, seed: int) -> dict:
    """Batch 0 from norm range NORM_RANGES[0], batch 1 (same rng stream: same W, labels, directions) from
    NORM_RANGES[1], then the rows placed on purpose (see the module docstring)."""
    first = drv.inputs(K, seed, batches=2, norm_range=NORM_RANGES[0])
    second = drv.inputs(K, seed, batches=2, norm_range=NORM_RANGES[1])
    assert np.array_equal(first["W"], second["W"]) and np.array_equal(first["y1"], second["y1"])
    out = dict(W=first["W"], x0=first["x0"].copy(), y0=first["y0"], x1=second["x1"].copy(), y1=second["y1"])
    Wn = out["W"] / np.linalg.norm(out["W"], axis=1, keepdims=True)
    out["x1"][4] *= 1e-4 / np.linalg.norm(out["x1"][4])  # antipodal row, tiny norm
    w13 = Wn[out["y0"][13]]
    u = out["x0"][13] - (out["x0"][13] @ w13) * w13
    u /= np.linalg.norm(u)  # unit, orthogonal to the class centre
    out["x0"][13] = (math.cos(0.2) * w13 + math.sin(0.2) * u) * 300.0  # 0.2 rad from its centre, norm 300
    out["x0"][15] = Wn[out["y0"][15]] * np.linalg.norm(out["x0"][15])  # on its own class centre
    out["x1"][14] = Wn[(out["y1"][14] + 1) % K] * np.linalg.norm(out["x1"][14])  # on another class's
    return out


def _branches(x, W, y, mean, std, hp) -> dict:
    """Counts of the official code's clips on batch (x, y) with weight W [K, D] and the updated statistics."""
    n = x.norm(dim=1)  # [N]
    a = n.clamp(0.001, 100)
    g = hp["h"] * (a - mean) / (std + EPS)  # [N] before the clip
    cos = (x / n[:, None]) @ (W / W.norm(dim=1, keepdim=True)).t()  # [N, K]
    on = torch.zeros_like(cos, dtype=torch.bool)
    on[torch.arange(len(y)), y] = True
    c = cos.clamp(-1 + EPS, 1 - EPS)[on]  # [N] target cosines
    angle = torch.acos(c) - hp["m"] * g.clamp(-1, 1)
    return dict(
        norm_low=int((n < 0.001).sum()),
        norm_high=int((n > 100).sum()),
        scaler_low=int((g < -1).sum()),
        scaler_high=int((g > 1).sum()),
        scaler_inside=int((g.abs() < 1).sum()),
        angle_low=int((angle < EPS).sum()),
        angle_high=int((angle > math.pi - EPS).sum()),
        angle_inside=int(((angle > EPS) & (angle < math.pi - EPS)).sum()),
        cos_target_clamped=int((cos[on].abs() > 1 - EPS).sum()),
        cos_other_clamped=int((cos[~on].abs() > 1 - EPS).sum()),
    )


def generate(modules):
    import make_loss_vectors as drv  # the driver (tools/ is on sys.path)

    head = modules["head.py"]
    criterion = torch.nn.CrossEntropyLoss()  # train_val.py's self.cross_entropy_loss
    arrays, cases = {}, {}
    for case, K in drv.CASES.items():
        inp = _inputs(drv, K, SEEDS[case])
        mod = head.AdaFace(embedding_size=drv.D, classnum=K, **HP).double()
        mod.train()
        W = torch.from_numpy(inp["W"])  # [K, D]
        with torch.no_grad():
            mod.kernel.copy_(W.t())  # official layout [D, K]
        arrays[f"{case}/W"] = W.clone().numpy()
        hits, stats = [], [(float(mod.batch_mean), float(mod.batch_std))]
        for t in range(2):
            x = torch.from_numpy(inp[f"x{t}"]).clone().requires_grad_(True)  # [N, D] raw embeddings
            y = torch.from_numpy(inp[f"y{t}"])  # [N]
            mod.zero_grad(set_to_none=True)
            norm = torch.norm(x, 2, 1, True)  # net.py Backbone.forward: [N, 1]
            output = torch.div(x, norm)  # [N, D]
            cos_thetas = mod(output, norm, y)  # the official forward (updates the statistics first)
            loss = criterion(cos_thetas, y)
            loss.backward()
            hits.append(_branches(x.detach(), W, y, mod.batch_mean.detach(), mod.batch_std.detach(), HP))
            stats.append((float(mod.batch_mean), float(mod.batch_std)))
            arrays[f"{case}/x{t}"] = x.detach().numpy()
            arrays[f"{case}/y{t}"] = y.numpy()
            arrays[f"{case}/loss{t}"] = loss.detach().numpy()
            arrays[f"{case}/dx{t}"] = x.grad.numpy()
            arrays[f"{case}/dW{t}"] = mod.kernel.grad.t().contiguous().clone().numpy()  # [K, D]
            arrays[f"{case}/state{t}/batch_mean"] = mod.batch_mean.detach().reshape(1).clone().numpy()
            arrays[f"{case}/state{t}/batch_std"] = mod.batch_std.detach().reshape(1).clone().numpy()
        for kind in hits[0]:
            if not sum(h[kind] for h in hits):
                raise AssertionError(f"{case}: {kind} is never hit: pick another seed ({hits})")
        if len(set(stats)) != 3:
            raise AssertionError(f"{case}: the statistics do not evolve over the batches: {stats}")
        cases[case] = dict(K=K, N=drv.N, D=drv.D, batches=2, branches=hits, stats=stats)
    meta = dict(
        hp=HP,
        cases=cases,
        notes=(
            "official head.py imported unmodified, float64; norm / output as net.py's Backbone.forward; loss "
            "nn.CrossEntropyLoss (train_val.py); kernel = W^T, dW = kernel.grad^T; batch_mean / batch_std "
            "carried over the two batches (t_alpha 0.9 so that the scaler clips are reached)"
        ),
    )
    return arrays, meta
