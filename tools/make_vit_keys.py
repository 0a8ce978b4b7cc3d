"""Write tests/fixtures/insightface_keys/: the state-dict (key, shape) lists of insightface's backbones.

    python tools/make_vit_keys.py [--insightface /work/.mirror/deepinsight+insightface/repo] [--out DIR]

DIR is a git repository (a clone, or a bare git directory) of github.com/deepinsight/insightface. The
files of ``recognition/arcface_torch/backbones/`` are read from the pinned commit at run time, written to
a temporary package and imported from there (nothing of them is stored in this repository); each
backbone is built by insightface's own ``get_model(name, num_features=512)`` on the meta device. When
``timm`` is not installed, a stand-in for the three names ``vit.py`` imports from ``timm.models.layers``
(``DropPath``, ``to_2tuple``, ``trunc_normal_``; none holds a parameter) is put in ``sys.modules`` while
the package imports.

Written: ``<fr_dist name>.json`` with every (key, shape) in state-dict order for the models of
:data:`FULL`, and ``digests.json``: for every model of :data:`NAMES` the key count, the parameter +
buffer element count and the SHA-256 of its ``key:shape`` lines (r2060 alone has ~16,000 keys).
``tests/unit/test_vit.py`` compares fr_dist's backbones with these files, and with insightface's
modules themselves when the repository is there.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
INSIGHTFACE_REV = "7fadd420c2351d0ffa8cac403421c1a3ed733365"
DEFAULT_REPO = Path("/work/.mirror/deepinsight+insightface/repo")
BACKBONES_DIR = "recognition/arcface_torch/backbones"
BACKBONE_FILES = ["__init__.py", "iresnet.py", "iresnet2060.py", "mobilefacenet.py", "vit.py"]
# fr_dist registry name -> insightface get_model name
NAMES = {
    "vit_t": "vit_t",
    "vit_t_dp005_mask0": "vit_t_dp005_mask0",
    "vit_s": "vit_s",
    "vit_s_dp005_mask_0": "vit_s_dp005_mask_0",
    "vit_b": "vit_b",
    "vit_b_dp005_mask_005": "vit_b_dp005_mask_005",
    "vit_l": "vit_l_dp005_mask_005",  # insightface has no plain vit_l
    "vit_l_dp005_mask_005": "vit_l_dp005_mask_005",
    "vit_h": "vit_h",
    "iresnet2060": "r2060",
}
FULL = ["vit_t", "vit_s"]


def _git_show(repo: Path, rev: str, path: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "show", f"{rev}:{path}"], check=True, capture_output=True, text=True
    ).stdout


def _drop_path(x, p: float, training: bool):
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    return x * x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep) / keep


class _DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return _drop_path(x, self.drop_prob, self.training)


@contextlib.contextmanager
def _timm_stand_in():
    """``timm.models.layers`` in sys.modules for the import, if timm itself is not installed."""
    try:
        import timm.models.layers  # noqa: F401

        yield
        return
    except ImportError:
        pass
    layers = types.ModuleType("timm.models.layers")
    vars(layers).update(  # the names vit.py imports
        DropPath=_DropPath,
        to_2tuple=lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v),
        trunc_normal_=torch.nn.init.trunc_normal_,  # timm's algorithm, copied into torch
    )
    stand_ins = {"timm": types.ModuleType("timm"), "timm.models": types.ModuleType("timm.models")}
    stand_ins["timm.models.layers"] = layers
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        for k in stand_ins:
            sys.modules.pop(k, None)


def load_insightface_backbones(repo: Path, rev: str = INSIGHTFACE_REV):
    """insightface's ``backbones`` package at ``rev``, imported from a temporary copy (its ``get_model``)."""
    tmp = Path(tempfile.mkdtemp(prefix="insightface_backbones_"))
    pkg = f"_insightface_backbones_{rev[:8]}"
    (tmp / pkg).mkdir()
    for f in BACKBONE_FILES:
        (tmp / pkg / f).write_text(_git_show(repo, rev, f"{BACKBONES_DIR}/{f}"))
    sys.path.insert(0, str(tmp))
    try:
        with _timm_stand_in():
            mod = importlib.import_module(pkg)
            importlib.import_module(f"{pkg}.vit")  # get_model imports it lazily: import it with the stand-in
            importlib.import_module(f"{pkg}.iresnet2060")
    finally:
        sys.path.remove(str(tmp))
    return mod


def key_shapes(model: nn.Module) -> list[list]:
    """[[key, [shape...]], ...] of ``model.state_dict()`` in its order."""
    return [[k, list(v.shape)] for k, v in model.state_dict().items()]


def digest(keys: list[list]) -> dict:
    lines = "".join(f"{k}:{','.join(map(str, s))}\n" for k, s in keys)
    numel = sum(int(torch.Size(s).numel()) for _, s in keys)
    return dict(n_keys=len(keys), numel=numel, sha256=hashlib.sha256(lines.encode()).hexdigest())


def insightface_model(backbones, fr_dist_name: str, device: str = "cpu") -> nn.Module:
    """insightface's module of an fr_dist name (512-d). Its ViT reads its drop-path rates with
    ``.item()``, so only the iresnets build on the meta device."""
    with torch.device(device):
        return backbones.get_model(NAMES[fr_dist_name], dropout=0.0, fp16=False, num_features=512)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--insightface", type=Path, default=DEFAULT_REPO, help="insightface git repository")
    ap.add_argument("--rev", default=INSIGHTFACE_REV)
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "insightface_keys")
    args = ap.parse_args(argv)
    backbones = load_insightface_backbones(args.insightface, args.rev)
    args.out.mkdir(parents=True, exist_ok=True)
    source = dict(repository="deepinsight/insightface", rev=args.rev, path=BACKBONES_DIR)
    digests = {}
    for name in NAMES:
        keys = key_shapes(insightface_model(backbones, name, "cpu" if name.startswith("vit") else "meta"))
        digests[name] = dict(insightface_name=NAMES[name], **digest(keys))
        if name in FULL:
            head = json.dumps(dict(source, insightface_name=NAMES[name], num_features=512), indent=1)
            rows = ",\n  ".join(json.dumps(k) for k in keys)  # one [key, shape] per line
            (args.out / f"{name}.json").write_text(f'{head[:-2]},\n "keys": [\n  {rows}\n ]\n}}\n')
        print(f"{name:22s} {digests[name]['n_keys']:6d} keys {digests[name]['numel']:,} elements")
    (args.out / "digests.json").write_text(json.dumps(dict(source, models=digests), indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
