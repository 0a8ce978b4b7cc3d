"""MagFace vectors from IrvingMeng/MagFace's own ``models/magface.py`` (``MagLinear``, ``MagLoss``,
``SoftmaxBuilder._margin``) and the loss of ``run/trainer.py``, for tools/make_loss_vectors.py.

models/magface.py imports ``from models import iresnet`` (the backbone) and ``termcolor`` at module level; neither
is used by the classes read here, so this module puts two empty stand-ins into ``sys.modules`` (``models``,
``models.iresnet``, ``termcolor``, only where absent) before the driver imports the file, which is then imported
whole and unmodified. ``SoftmaxBuilder`` itself builds an iresnet, so only its ``_margin`` method is called, on a
namespace holding (l_margin, u_margin, l_a, u_a), as ``MagLinear.forward`` receives it from the builder.

run/trainer.py parses its arguments and imports torchvision at import time, so it is not imported: it is read
from the same repository at the same commit (``--mirrors`` / ``--repo magface=DIR`` of the driver) and parsed with
``ast``: the defaults of ``--l_a --u_a --l_margin --u_margin --lambda_g --arc-scale`` must equal ``HP`` below,
and the loss line must be ``loss = loss_id + args.lambda_g * loss_g``; its sha256 goes into meta.

Per case one official ``MagLinear(D, K, scale=s)`` (easy_margin=True, its default) and ``MagLoss(l_a, u_a,
l_margin, u_margin)`` (trainer.py's call) in float64; the official weight is [D, K] (normalised over dim 0):
``weight = W^T``, ``dW<t> = weight.grad^T``. Two batches one after another (zero grads between, no step);
the loss is trainer.py's ``loss_id + lambda_g * loss_g``. Norms log-uniform in [3, 300]: below l_a = 10 and
above u_a = 110 (the clamp's zero-gradient parts) and inside. An extra case ``k29_noeasy`` (meta
``variants``: the same inputs as k29, ``easy_margin=False``: MagLinear's other branch) is replayed by
tests/unit/test_loss_magface.py. The generator checks that every branch is hit.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import math
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/: the driver's inputs()

REPOSITORY = "IrvingMeng/MagFace"
REV = "99bae614ac2643b9694bf18e0c5645272ff6acfa"
FILES = ["models/magface.py"]
TRAINER = "run/trainer.py"  # read (not imported): its argparse defaults and its loss line

# trainer.py's argparse defaults (checked against the file in generate()); s is --arc-scale
HP = dict(s=64.0, l_margin=0.45, u_margin=0.8, l_a=10.0, u_a=110.0, lambda_g=20.0)
_ARGS = {"l_a": "l_a", "u_a": "u_a", "l_margin": "l_margin", "u_margin": "u_margin", "lambda_g": "lambda_g",
         "arc-scale": "s"}  # fmt: skip
NORM_RANGE = (3.0, 300.0)
SEEDS = {"k29": 18_401, "k3": 18_402}
VARIANTS = {"k29_noeasy": ("k29", {"easy_margin": False})}


def _stand_in(name: str) -> None:
    if name not in sys.modules:
        sys.modules[name] = types.ModuleType(name)


for _name in ("models", "models.iresnet", "termcolor"):  # unused imports of models/magface.py
    _stand_in(_name)
sys.modules["models"].iresnet = sys.modules["models.iresnet"]
vars(sys.modules["termcolor"]).update(cprint=print)  # the stand-in prints


def _trainer_source() -> tuple[str, str]:
    """(text of run/trainer.py at REV, its sha256), from the repository the driver reads."""
    import make_loss_vectors as drv
    from make_reference_vectors import git_show

    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--mirrors", default="/work/.mirror")
    ap.add_argument("--repo", action="append", default=[])
    args, _ = ap.parse_known_args(sys.argv[1:])
    given = dict(r.split("=", 1) for r in args.repo)
    repo = Path(given.get("magface") or Path(args.mirrors) / REPOSITORY.replace("/", "+") / "repo")
    text, _commit = git_show(repo, REV, TRAINER)
    del drv
    return text, hashlib.sha256(text.encode()).hexdigest()


def _check_trainer(text: str) -> dict:
    """trainer.py's defaults for the MagFace arguments == HP, and its loss formula; returns the defaults."""
    found = {}
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument" and node.args:
            flag = getattr(node.args[0], "value", "")
            key = str(flag).lstrip("-")
            if key in _ARGS:
                default = next(k.value for k in node.keywords if k.arg == "default")
                found[_ARGS[key]] = float(ast.literal_eval(default))
    if found != {k: float(v) for k, v in HP.items()}:
        raise AssertionError(f"{TRAINER} defaults {found} != HP {HP}")
    if "loss = loss_id + args.lambda_g * loss_g" not in text:
        raise AssertionError(f"{TRAINER}: the loss line loss = loss_id + args.lambda_g * loss_g is gone")
    return found


def _branches(x, W, y, hp, easy):
    """Counts of the official code's branches on batch (x, y) with weight W [K, D]."""
    a = x.norm(dim=1)
    ac = a.clamp(hp["l_a"], hp["u_a"])
    m = (hp["u_margin"] - hp["l_margin"]) / (hp["u_a"] - hp["l_a"]) * (ac - hp["l_a"]) + hp["l_margin"]
    c = (x / a[:, None]) @ (W / W.norm(dim=1, keepdim=True)).t()
    c_y = c[torch.arange(len(y)), y].clamp(-1, 1)
    on = c_y > 0 if easy else c_y > torch.cos(math.pi - m)
    return dict(
        norm_low=int((a < hp["l_a"]).sum()),
        norm_high=int((a > hp["u_a"]).sum()),
        norm_inside=int(((a >= hp["l_a"]) & (a <= hp["u_a"])).sum()),
        margin=int(on.sum()),
        no_margin=int((~on).sum()),
    )


def _run(mag, inp, K, case, easy, arrays):
    import make_loss_vectors as drv

    hp = HP
    fc = mag.MagLinear(drv.D, K, scale=hp["s"], easy_margin=easy).double()
    criterion = mag.MagLoss(hp["l_a"], hp["u_a"], hp["l_margin"], hp["u_margin"])  # trainer.py's call
    builder = types.SimpleNamespace(**{k: hp[k] for k in ("l_margin", "u_margin", "l_a", "u_a")})

    def margin(x):  # SoftmaxBuilder._margin bound to the builder's attributes
        return mag.SoftmaxBuilder._margin(builder, x)

    W = torch.from_numpy(inp["W"])  # [K, D]
    with torch.no_grad():
        fc.weight.copy_(W.t())  # official layout [D, K]
    arrays[f"{case}/W"] = W.clone().numpy()
    hits = []
    for t in range(2):
        x = torch.from_numpy(inp[f"x{t}"]).clone().requires_grad_(True)  # [N, D] raw embeddings
        y = torch.from_numpy(inp[f"y{t}"])  # [N]
        fc.zero_grad(set_to_none=True)
        output, x_norm = fc(x, margin, hp["l_a"], hp["u_a"])  # the official forward
        loss_id, loss_g, _one_hot = criterion(output, y, x_norm)
        loss = loss_id + hp["lambda_g"] * loss_g  # trainer.py's loss
        loss.backward()
        hits.append(_branches(x.detach(), W, y, hp, easy))
        arrays[f"{case}/x{t}"] = x.detach().numpy()
        arrays[f"{case}/y{t}"] = y.numpy()
        arrays[f"{case}/loss{t}"] = loss.detach().numpy()
        arrays[f"{case}/dx{t}"] = x.grad.numpy()
        arrays[f"{case}/dW{t}"] = fc.weight.grad.t().contiguous().clone().numpy()  # [K, D]
    for kind in ("norm_low", "norm_high", "norm_inside", "margin", "no_margin"):
        if not sum(h[kind] for h in hits):
            raise AssertionError(f"{case}: the {kind} branch is never hit: pick another seed / norm range")
    return dict(K=K, N=drv.N, D=drv.D, batches=2, branches=hits)


def generate(modules):
    import make_loss_vectors as drv  # the driver (tools/ is on sys.path)

    mag = modules["magface.py"]
    trainer_text, trainer_sha = _trainer_source()
    defaults = _check_trainer(trainer_text)
    arrays, cases, variants = {}, {}, {}
    inputs = {
        case: drv.inputs(K, SEEDS[case], batches=2, norm_range=NORM_RANGE) for case, K in drv.CASES.items()
    }
    for case, K in drv.CASES.items():
        cases[case] = _run(mag, inputs[case], K, case, True, arrays)
    for case, (base, hp) in VARIANTS.items():
        variants[case] = dict(
            _run(mag, inputs[base], drv.CASES[base], case, hp["easy_margin"], arrays), hp=hp
        )
    meta = dict(
        hp=HP,
        cases=cases,
        variants=variants,
        trainer={"path": TRAINER, "sha256": trainer_sha, "defaults": defaults},
        notes=(
            "official models/magface.py imported unmodified with stand-ins for its unused imports (models."
            "iresnet, termcolor); MagLinear(scale=s, easy_margin=True) + MagLoss + SoftmaxBuilder._margin, "
            "float64; loss = loss_id + lambda_g * loss_g (run/trainer.py, read with ast: its argparse defaults "
            "are hp); weight = W^T, dW = weight.grad^T; variants: same inputs with easy_margin=False"
        ),
    )
    return arrays, meta
