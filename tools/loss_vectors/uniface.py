"""UniFace vectors from CVI-SZU/UniFace's own ``head.py`` (``Unified_Cross_Entropy_Loss``), for
tools/make_loss_vectors.py.

head.py imports only torch / numpy / math / random, so it is imported whole, unmodified. Per case one
official module ``Unified_Cross_Entropy_Loss(D, K, m, s, l, r)`` is built, cast to float64, given the
driver's weight [K, D] (the official layout already: out_features x in_features, no transpose) and a bias
chosen to exercise the clamps (below), and run on two batches one after another with
``partial_index = arange(K)`` (every class: fr_dist's sample_rate 1; the official train script's Partial-FC
drops classes without reweighting, which fr_dist does not reproduce). Its forward returns
``loss.sum(dim=1).mean()``, the loss the training loop optimises (train.py splits the batch into bs_mult
parts and scales each part's mean by 1 / bs_mult: the mean over the whole batch).

Conventions: fr_dist's UniFace bias IS the paper's b (z = s cos - b; the loss's ``bias_sign`` = -1), so
``<case>/b`` and ``db<t>`` are the official module's bias and its gradient unchanged. ``dW<t>`` is the
official weight.grad, dL/dW_raw through the differentiable F.normalize (eps 1e-5).

The clamps of the logits to [-s, s] (zero gradient outside) are the part worth pinning, so the bias is not
the initial log(K r 10) (at K = 29 and s = 64 almost nothing is clipped): ``k29`` runs at b = +40 (the
negatives' and the targets' LOWER clamp: z = s cos - b < -s for cos < b / s - 1), ``k3`` at b = -50 (the
UPPER clamp of both). The generator checks that every clamp is hit and records the official initial bias
of each case in meta (``b_init``), which tests/unit/test_loss_uniface.py compares with the head's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/: the driver's inputs()

REPOSITORY = "CVI-SZU/UniFace"
REV = "00ade47075e26f24a96a1db718046b9af5f068ea"
FILES = ["head.py"]

HP = dict(m=0.4, s=64.0, l=1.0, r=1.0)  # Unified_Cross_Entropy_Loss's defaults (train.py keeps them)
BIAS = {"k29": 40.0, "k3": -50.0}  # see the module docstring
SEEDS = {"k29": 18_501, "k3": 18_502}


def _clamp_hits(cos: torch.Tensor, y: torch.Tensor, b: float) -> dict:
    """How many target / negative logits fall below -s / above s (the official clamp's zero-gradient parts)."""
    s, m = HP["s"], HP["m"]
    is_t = torch.nn.functional.one_hot(y, cos.shape[1]).bool()  # [N, K]
    zp, zn = s * (cos - m) - b, s * cos - b  # [N, K]
    return dict(
        target_low=int(((zp < -s) & is_t).sum()),
        target_high=int(((zp > s) & is_t).sum()),
        negative_low=int(((zn < -s) & ~is_t).sum()),
        negative_high=int(((zn > s) & ~is_t).sum()),
    )


def generate(modules):
    import make_loss_vectors as drv  # the driver (tools/ is on sys.path)

    head = modules["head.py"]
    arrays, cases = {}, {}
    for case, K in drv.CASES.items():
        inp = drv.inputs(K, SEEDS[case], batches=2)
        mod = head.Unified_Cross_Entropy_Loss(drv.D, K, **HP).double()
        b_init = float(mod.bias.detach().reshape(()))
        with torch.no_grad():
            mod.weight.copy_(torch.from_numpy(inp["W"]))  # [K, D]
            mod.bias.fill_(BIAS[case])
        arrays[f"{case}/W"] = mod.weight.detach().clone().numpy()
        arrays[f"{case}/b"] = mod.bias.detach().reshape(()).clone().numpy()
        partial_index = torch.arange(K)  # every class (fr_dist's sample_rate 1)
        hits = []
        for t in range(2):
            x = torch.from_numpy(inp[f"x{t}"]).clone().requires_grad_(True)  # [N, D] raw embeddings
            y = torch.from_numpy(inp[f"y{t}"])  # [N]
            mod.zero_grad(set_to_none=True)
            loss = mod(x, y, partial_index)  # the official forward: loss.sum(dim=1).mean()
            loss.backward()
            with torch.no_grad():
                xn = torch.nn.functional.normalize(x, eps=1e-5)
                cos = xn @ torch.nn.functional.normalize(mod.weight, eps=1e-5).t()  # [N, K]
                hits.append(_clamp_hits(cos, y, BIAS[case]))
            arrays[f"{case}/x{t}"] = x.detach().numpy()
            arrays[f"{case}/y{t}"] = y.numpy()
            arrays[f"{case}/loss{t}"] = loss.detach().numpy()
            arrays[f"{case}/dx{t}"] = x.grad.numpy()
            arrays[f"{case}/dW{t}"] = mod.weight.grad.clone().numpy()
            arrays[f"{case}/db{t}"] = mod.bias.grad.reshape(()).clone().numpy()
        side = "low" if BIAS[case] > 0 else "high"
        for kind in ("target", "negative"):
            if not sum(h[f"{kind}_{side}"] for h in hits):
                raise AssertionError(f"{case}: no {kind} logit beyond the {side} clamp: pick another bias")
        cases[case] = dict(K=K, N=drv.N, D=drv.D, batches=2, b=BIAS[case], b_init=b_init, clamp_hits=hits)
    meta = dict(
        hp=HP,
        cases=cases,
        notes=(
            "official head.py imported unmodified, float64, partial_index = arange(K); bias set per case "
            "to exercise the [-s, s] clamps (b_init: the official log(K r 10)); fr_dist's bias is the "
            "paper's b (bias_sign -1): b / db unchanged; W / dW in the official [K, D] layout"
        ),
    )
    return arrays, meta
