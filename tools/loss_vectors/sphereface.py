"""SphereFace (A-Softmax) vectors from ydwen/opensphere's own ``opensphere/module/head/sphereface.py``
(``SphereFace``, with ``common.py``: wrapping / fusing / scoring), for tools/make_loss_vectors.py.

Both files import only torch / math (sphereface.py: ``from .common import ...``, resolved inside the driver's
temporary package), so they are imported whole, unmodified. Per case one official ``SphereFace(D, K, s, m)``
cast to float64 and given the driver's weight: the official ``w`` is already [K, D] (rows), so ``w = W`` and
``dW<t> = w.grad``. Its forward re-projects ``w`` onto the sphere in place (``w.data = F.normalize(w.data)``)
and returns ``F.cross_entropy(logits, y)``: that is the loss. Two batches one after another on the same
module (zero grads between, no step; the second batch sees the re-projected rows). State: none.

Hyper-parameters: OpenSphere's defaults s = 30, m = 1.7. Inputs: :func:`make_loss_vectors.inputs` with the
default norms (the loss ignores them), then row 13 of batch 0 exactly on its class centre (a target cosine
beyond the 1 - 1e-5 clamp, value clamped, gradient straight through) and row 14 of batch 1 exactly on
another class's centre (a non-target beyond the clamp). The generator checks that both k = 0 and k = 1
targets (m theta < pi and >= pi) and both clamps are hit.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/: the driver's inputs()

REPOSITORY = "ydwen/opensphere"
REV = "a679e82032455941932e23e3d3cbab6b8c07e3d4"
FILES = ["opensphere/module/head/common.py", "opensphere/module/head/sphereface.py"]

HP = dict(s=30.0, m=1.7)  # SphereFace(feat_dim, subj_num, s=30., m=1.7)
SEEDS = {"k29": 18_001, "k3": 18_002}
CLIP = 1e-5


def _inputs(drv, K: int, seed: int) -> dict:
    inp = drv.inputs(K, seed, batches=2)
    Wn = inp["W"] / np.linalg.norm(inp["W"], axis=1, keepdims=True)
    inp["x0"][13] = Wn[inp["y0"][13]] * np.linalg.norm(inp["x0"][13])  # on its own class centre
    inp["x1"][14] = Wn[(inp["y1"][14] + 1) % K] * np.linalg.norm(inp["x1"][14])  # on another class's
    return inp


def _branches(x, W, y, m) -> dict:
    """Counts of the official code's branches on batch (x, y) with weight W [K, D]."""
    cos = (x / x.norm(dim=1, keepdim=True)) @ (W / W.norm(dim=1, keepdim=True)).t()  # [N, K]
    on = torch.zeros_like(cos, dtype=torch.bool)
    on[torch.arange(len(y)), y] = True
    k = (m * torch.acos(cos[on].clamp(-1 + CLIP, 1 - CLIP)) / math.pi).floor()  # [N]
    return dict(
        k0=int((k == 0).sum()),
        k1=int((k == 1).sum()),
        cos_target_clamped=int((cos[on].abs() > 1 - CLIP).sum()),
        cos_other_clamped=int((cos[~on].abs() > 1 - CLIP).sum()),
    )


def generate(modules):
    import make_loss_vectors as drv  # the driver (tools/ is on sys.path)

    sphereface = modules["sphereface.py"]
    arrays, cases = {}, {}
    for case, K in drv.CASES.items():
        inp = _inputs(drv, K, SEEDS[case])
        mod = sphereface.SphereFace(drv.D, K, **HP).double()
        mod.train()
        W = torch.from_numpy(inp["W"])  # [K, D]
        with torch.no_grad():
            mod.w.copy_(W)  # official layout [K, D]
        arrays[f"{case}/W"] = W.clone().numpy()
        hits = []
        for t in range(2):
            x = torch.from_numpy(inp[f"x{t}"]).clone().requires_grad_(True)  # [N, D] raw embeddings
            y = torch.from_numpy(inp[f"y{t}"])  # [N]
            mod.zero_grad(set_to_none=True)
            hits.append(_branches(x.detach(), mod.w.detach(), y, HP["m"]))
            loss = mod(x, y)  # the official forward: re-projection, logits, F.cross_entropy
            loss.backward()
            arrays[f"{case}/x{t}"] = x.detach().numpy()
            arrays[f"{case}/y{t}"] = y.numpy()
            arrays[f"{case}/loss{t}"] = loss.detach().numpy()
            arrays[f"{case}/dx{t}"] = x.grad.numpy()
            arrays[f"{case}/dW{t}"] = mod.w.grad.clone().numpy()  # [K, D] w.r.t. the re-projected rows
        for kind in hits[0]:
            if not sum(h[kind] for h in hits):
                raise AssertionError(f"{case}: {kind} is never hit: pick another seed ({hits})")
        cases[case] = dict(K=K, N=drv.N, D=drv.D, batches=2, branches=hits)
    meta = dict(
        hp=HP,
        cases=cases,
        notes=(
            "official sphereface.py + common.py imported unmodified, float64; loss: the module's own "
            "F.cross_entropy; w = W ([K, D]), re-projected in place by the official forward; dW = w.grad"
        ),
    )
    return arrays, meta
