"""OpenSphere (ydwen/opensphere) runs in: :func:`read_opensphere` -> :class:`~fr_dist.convert.ImportedRun`.

Layouts (read from OpenSphere's save code, never imported):

    current (Oct 2023 on)  <proj>/checkpoint/ckpt_{step}.pth  {step, epoch, model: {backbone, head},
                                                                optimizer, scheduler, scaler}
                           <proj>/checkpoint/model_{step}.pth {backbone, head}
                           <proj>/config.yml                  model.backbone.type, model.head.{type, ...}
    2022 (until May 2022)  <proj>/models/backbone_{iter}.pth   saved from DDP: ``module.`` prefixes
                           <proj>/models/head_{iter}.pth       ``module.w`` [D, K] (transposed), ``module.b``
                           <proj>/config.yml                  model.{backbone, head}.net.{type, ...}

Heads: SphereFace2 (``w``, scalar ``b``) -> head_kind ``"sphereface2"`` with its bias and hyper-parameters
(``alpha`` -> lam, r, m, t, lw, ``magn_type`` -> margin); the softmax-family heads (SphereFace, CosFace,
ArcFace, CocoLoss, SoftmaxLoss, SphereFace-R / -Plus, GA-Softmax: ``w`` only) -> ``"softmax"``. ``w`` is
[K, D] in the current heads and [D, K] in every 2022 head and in the current SoftmaxLoss / CocoLoss.
SimPLE (proxy-free, no rows) is refused.

Backbones: OpenSphere's ``iresnet.py`` names its modules as insightface's (conv1, bn1, prelu, layer1-4 of
IBasicBlocks bn1 / conv1 / bn2 / prelu / conv2 / bn3 / downsample.0-1, bn2, fc, features), so its keys are
fr_dist's iresnet keys unchanged (:data:`IRESNET_KEY_MAP` is empty on purpose): iresnet18/34/50/100 ->
fr_dist's iresnet18/34/50/100. One difference: the current OpenSphere trains ``features.weight`` (init
0.1), fr_dist keeps it fixed as insightface does; its value is carried. SFNet (sfnet4..64, ``*_deprecated``)
has no fr_dist counterpart and is refused, naming it.

Optimizer (current ckpt only; 2022 saved none): OpenSphere's ``init_optimizer`` builds ONE torch.optim
optimizer with two param groups, ``[backbone.parameters(), head.parameters()]``; its state is keyed by the
running index over both groups. Group 0's indices map to the backbone's parameter names in
``named_parameters`` order (= its state-dict keys without the BatchNorm buffers), group 1's to the head's
(w, then b). SGD ``momentum_buffer`` s are carried (w's transposed with w); other optimizers' states,
the bias's momentum, the MultiStepLR scheduler and the GradScaler are not (said in ``notes``).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from fr_dist.checkpoint.layout import safe_load
from fr_dist.convert import ImportedRun
from fr_dist.convert.arcface_torch import _strip_module, momentum_by_name, parameter_names
from fr_dist.errors import CheckpointError
from fr_dist.models.iresnet import IRESNET_LAYERS

__all__ = ["read_opensphere", "OPENSPHERE_IRESNETS", "IRESNET_KEY_MAP"]

OPENSPHERE_IRESNETS = {f"iresnet{d}": f"iresnet{d}" for d in (18, 34, 50, 100)}
"""OpenSphere backbone type -> fr_dist backbone name (``model.name``)."""
IRESNET_KEY_MAP: dict[str, str] = {}
"""OpenSphere iresnet key -> fr_dist key, for the keys that differ: none (both are insightface's names)."""

_SOFTMAX_HEADS = (
    "SphereFace",
    "CosFace",
    "ArcFace",
    "CocoLoss",
    "SoftmaxLoss",
    "SphereFacePlus",
    "GAsoftmax",
)
_TRANSPOSED_HEADS = ("SoftmaxLoss", "CocoLoss")  # [D, K] in the current layout too
_SF2_NAMES = {"alpha": "lam", "r": "r", "m": "m", "t": "t", "lw": "lw", "magn_type": "margin"}
_PATTERNS = {
    "ckpt": r"ckpt_(\d+)\.pth",
    "model": r"model_(\d+)\.pth",
    "2022": r"(?:backbone|head)_(\d+)\.pth",
}
_WHAT = {
    "ckpt": "an OpenSphere ckpt_{step}.pth holds step, epoch, model {backbone, head}, optimizer, scheduler, scaler",
    "model": "an OpenSphere model_{step}.pth holds {backbone, head}",
    "2022": "a 2022 OpenSphere backbone_ / head_{iter}.pth holds one DDP state dict (module.* tensors)",
}


def read_opensphere(path) -> ImportedRun:
    """Read an OpenSphere run: a ``ckpt_{step}.pth``, ``model_{step}.pth``, ``backbone_{iter}.pth`` or
    ``head_{iter}.pth`` file, or a project / checkpoint / models folder (its newest ckpt, else its newest
    model file, else its newest 2022 pair).

    Every tensor is loaded with ``torch.load(weights_only=True)``: a file that carries code is refused.
    """
    layout, file, step = _locate(Path(path))
    notes: list[str] = []
    cfg = _read_config(file, notes)
    bb_cfg, head_cfg = _cfg_section(cfg, "backbone"), _cfg_section(cfg, "head")
    if layout == "2022":
        head_file = file.with_name(f"head_{step}.pth")
        bb_sd = _load(file.with_name(f"backbone_{step}.pth"), layout)
        head_sd = _load(head_file, layout)
        ckpt: dict = {}
        notes.append(f"2022 layout at iteration {step}: no optimizer state was saved (momentum starts at 0)")
    else:
        ckpt = _load(file, layout)
        model = ckpt.get("model") if layout == "ckpt" else ckpt
        expect = {"ckpt": {"step", "model"}, "model": {"backbone", "head"}}[layout]
        if not expect <= set(ckpt) or not isinstance(model, dict) or not {"backbone", "head"} <= set(model):
            raise CheckpointError(f"{file}: holds keys {sorted(map(str, ckpt))}; {_WHAT[layout]}")
        if layout == "ckpt" and int(ckpt["step"]) != step:
            raise CheckpointError(f"{file}: its step is {int(ckpt['step'])}, its name says {step}")
        bb_sd, head_sd, head_file = model["backbone"], model["head"], file
    backbone, arch = _backbone(
        bb_sd, file if layout != "2022" else file.with_name(f"backbone_{step}.pth"), bb_cfg
    )
    emb = int(backbone["fc.weight"].shape[0])
    head = _strip(head_sd, head_file)
    weight, transposed, head_type = _rows(head, head_file, head_cfg, emb, layout, notes)
    bias, kind, hparams = None, "softmax", {}
    if "b" in head:
        if head["b"].numel() != 1:
            raise CheckpointError(f"{head_file}: b has {head['b'].numel()} values; SphereFace2's b is 1")
        bias, kind = head["b"].detach().reshape(1).float().clone(), "sphereface2"
        hparams = {_SF2_NAMES[k]: head_cfg[k] for k in _SF2_NAMES if k in head_cfg}
        if hparams and "margin" not in hparams:
            hparams["margin"] = "C"  # the current SphereFace2 is SphereFace2-C only (no magn_type)
        if not hparams:
            notes.append(
                f"{head_file.name}: no config.yml: SphereFace2's lam, r, m, t, lw unknown (the config's apply)"
            )
    elif head_type == "SphereFace2":
        raise CheckpointError(f"{head_file}: config.yml names SphereFace2 but the head has no b")
    run = ImportedRun(
        source=f"OpenSphere {'2022 ' if layout == '2022' else ''}{file.name} ({head_type or kind}, {arch})",
        backbone=backbone,
        weight=weight,
        head_kind=kind,
        bias=bias,
        step=step,
        epoch=int(ckpt.get("epoch", 0)),
        notes=notes,
        head_hparams=hparams,
        backbone_arch=arch,
    )
    if layout == "ckpt":
        notes.append(
            f"epoch {run.epoch} as saved (OpenSphere saves epoch + 1: its own resume starts a new epoch there)"
        )
        _momentum(run, ckpt.get("optimizer"), file, head, transposed)
        notes.append(
            "not carried: the lr scheduler and GradScaler states (fr_dist's config schedules the lr from the step)"
        )
    elif layout == "model":
        notes.append(
            f"{file.name} holds weights only: step {step} from its name, epoch 0, momentum starts at 0"
        )
    return run


# ----------------------------------------------------------------------------- files


def _locate(path: Path) -> tuple[str, Path, int]:
    """(layout, file, step) of ``path``, a file or a folder (its newest ckpt, model file or 2022 pair)."""
    if path.is_dir():
        for layout in ("ckpt", "model", "2022"):
            found = []
            for d in (path, path / "checkpoint", path / "models"):
                if d.is_dir():
                    found += [
                        (int(m.group(1)), f)
                        for f in d.iterdir()
                        if (m := re.fullmatch(_PATTERNS[layout], f.name))
                    ]
            if found:
                step, file = max(found)
                return layout, (file.with_name(f"backbone_{step}.pth") if layout == "2022" else file), step
        raise CheckpointError(
            f"{path}: no OpenSphere checkpoint (checkpoint/ckpt_{{step}}.pth, checkpoint/model_{{step}}.pth, "
            "or the 2022 models/backbone_{iter}.pth + head_{iter}.pth)"
        )
    for layout, pattern in _PATTERNS.items():
        m = re.fullmatch(pattern, path.name)
        if m:
            step = int(m.group(1))
            if layout == "2022":
                for part in ("backbone", "head"):
                    if not path.with_name(f"{part}_{step}.pth").is_file():
                        raise CheckpointError(
                            f"{path.with_name(f'{part}_{step}.pth')}: missing; a 2022 OpenSphere run saved "
                            f"backbone_{step}.pth and head_{step}.pth side by side"
                        )
                path = path.with_name(f"backbone_{step}.pth")
            elif not path.is_file():
                raise CheckpointError(f"{path}: no such file")
            return layout, path, step
    raise CheckpointError(
        f"{path}: not an OpenSphere file name (ckpt_{{step}}.pth, model_{{step}}.pth, backbone_{{iter}}.pth, "
        "head_{iter}.pth) nor a folder"
    )


def _load(path: Path, layout: str) -> dict:
    obj = safe_load(path)  # weights_only=True: a CheckpointError naming the file if it carries code
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}; {_WHAT[layout]}")
    return obj


def _read_config(file: Path, notes: list) -> dict:
    """The run's config.yml (next to the file or one folder up), or {} with a note."""
    import yaml

    for cand in (file.parent / "config.yml", file.parent.parent / "config.yml"):
        if cand.is_file():
            try:
                cfg = yaml.safe_load(cand.read_text())
            except (OSError, yaml.YAMLError) as e:
                notes.append(f"{cand}: unreadable ({type(e).__name__}), ignored")
                return {}
            if isinstance(cfg, dict):
                notes.append(f"hyper-parameters and types from {cand}")
                return cfg
    notes.append(f"no config.yml next to {file.name} or one folder up: types inferred from the tensors")
    return {}


def _cfg_section(cfg: dict, part: str) -> dict:
    sec = (cfg.get("model") or {}).get(part) or {}
    sec = sec.get("net", sec) if isinstance(sec, dict) else {}  # 2022: model.<part>.net
    return sec if isinstance(sec, dict) else {}


def _strip(sd, file: Path) -> dict:
    """A state dict without DDP's ``module.`` prefixes; anything but {str: tensor} is refused."""
    if not isinstance(sd, dict):
        raise CheckpointError(f"{file}: a state dict was expected, found a {type(sd).__name__}")
    for k, v in sd.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{file}: entry {k!r} is a {type(v).__name__}, not a tensor")
    return _strip_module(sd)


# ----------------------------------------------------------------------------- backbone and head


def _iresnet_layers(sd: dict) -> list[int]:
    return [len({k.split(".")[1] for k in sd if k.startswith(f"layer{i}.")}) for i in range(1, 5)]


def _backbone(sd, file: Path, bb_cfg: dict) -> tuple[dict, str]:
    """(state dict with fr_dist's keys, fr_dist backbone name); SFNet and unknown networks refused."""
    sd = _strip(sd, file)
    sd = {IRESNET_KEY_MAP.get(k, k): v for k, v in sd.items()}
    given = bb_cfg.get("type")
    is_iresnet = {"conv1.weight", "prelu.weight", "fc.weight", "features.weight"} <= set(sd)
    if (isinstance(given, str) and given.startswith("sfnet")) or (
        not is_iresnet and any(k.startswith("layer1.0.conv1.") for k in sd)
    ):
        name = given or f"an SFNet ({len([k for k in sd if k.endswith('conv1.weight')])} conv blocks)"
        raise CheckpointError(
            f"{file}: backbone {name} is OpenSphere's SFNet (SphereFace's network); fr_dist has no SFNet "
            "backbone (it has iresnet18/34/50/100/200, mobilefacenet, vit_*): convert an iresnet run"
        )
    if not is_iresnet:
        raise CheckpointError(
            f"{file}: backbone {given or '(no config.yml type)'} is neither OpenSphere's iresnet nor its SFNet "
            f"(first keys {sorted(sd)[:4]}); fr_dist reads OpenSphere's iresnet18/34/50/100"
        )
    layers, width = _iresnet_layers(sd), int(sd["conv1.weight"].shape[0])
    known = {f"iresnet{d}": ls for d, ls in IRESNET_LAYERS.items()}
    if given in OPENSPHERE_IRESNETS and (known[given] != layers or width != 64):
        raise CheckpointError(
            f"{file}: config.yml names {given} (layers {known[given]}, width 64) but the tensors have layers "
            f"{layers}, width {width}"
        )
    spatial = math.isqrt(int(sd["fc.weight"].shape[1]) // (8 * width))  # 7 at 112 px: stem stride 1
    stem = {7: 1, 4: 2}.get(spatial, 0)
    arch = next((n for n, ls in known.items() if ls == layers and width == 64 and stem == 1), None)
    if (layers, width, stem) == ([1, 1, 1, 1], 16, 2):
        arch = "iresnet_tiny"
    return sd, arch or f"iresnet(layers={layers}, width={width}, stem_stride={stem or '?'})"


def _rows(head: dict, file: Path, head_cfg: dict, emb: int, layout: str, notes: list):
    """(weight [K, D] in class order, stored transposed?, OpenSphere head type or None)."""
    head_type = head_cfg.get("type") if isinstance(head_cfg.get("type"), str) else None
    if "w" not in head:
        what = " (SimPLE is proxy-free: there are no classifier rows)" if "bias" in head else ""
        raise CheckpointError(f"{file}: the head has no w (keys {sorted(head)}){what}")
    extra = set(head) - {"w", "b"}
    if extra or (head_type and head_type != "SphereFace2" and not head_type.startswith(_SOFTMAX_HEADS)):
        raise CheckpointError(
            f"{file}: head {head_type or ''} with keys {sorted(head)}: fr_dist reads OpenSphere's SphereFace2 "
            f"(w, b) and its softmax heads {', '.join(_SOFTMAX_HEADS)}, SphereFaceR (w)"
        )
    w = head["w"]
    if w.dim() != 2 or not w.is_floating_point():
        raise CheckpointError(
            f"{file}: w is {tuple(w.shape)} {w.dtype}; a 2-D float [K, D] or [D, K] was expected"
        )
    transposed = layout == "2022" or head_type in _TRANSPOSED_HEADS
    if emb not in w.shape:
        raise CheckpointError(f"{file}: w is {list(w.shape)} but the backbone's embedding size is {emb}")
    if w.shape[1 - int(transposed)] != emb:  # the embedding axis is the other one: no config said the type
        transposed = not transposed
        notes.append(
            f"{file.name}: w {list(w.shape)} read as {'[D, K]' if transposed else '[K, D]'} (D = {emb})"
        )
    k = int(w.shape[1] if transposed else w.shape[0])
    for key in ("subj_num", "num_class"):
        if isinstance(head_cfg.get(key), int) and head_cfg[key] > 0 and head_cfg[key] != k:
            raise CheckpointError(f"{file}: w has {k} classes, config.yml's {key} is {head_cfg[key]}")
    weight = (w.t() if transposed else w).detach().float().contiguous().clone()
    if transposed:
        notes.append(f"{file.name}: w stored [D, K] = {list(w.shape)}, transposed to [K, D]")
    return weight, transposed, head_type


def _momentum(run: ImportedRun, opt, file: Path, head: dict, transposed: bool) -> None:
    """SGD momentum of the ckpt's optimizer by parameter name (see the module docstring); a state that does
    not line up with OpenSphere's two groups is not carried (said in the notes)."""
    if not isinstance(opt, dict) or not {"state", "param_groups"} <= set(opt):
        raise CheckpointError(f"{file}: 'optimizer' is not a torch.optim state dict (state, param_groups)")
    groups, state = opt["param_groups"], opt["state"]
    names = parameter_names(run.backbone)  # named_parameters order: what group 0's indices count
    if len(groups) != 2 or len(groups[1]["params"]) != len(head):
        run.notes.append(
            f"momentum NOT carried: {file.name}'s optimizer has groups of {[len(g['params']) for g in groups]} "
            f"parameters; OpenSphere's are the backbone's {len(names)} and the head's {len(head)}"
        )
        return
    run.backbone_momentum = momentum_by_name(
        state, groups[0]["params"], names, run.backbone, run.notes, f"{file.name}'s optimizer group 0"
    )
    for idx, name in zip(groups[1]["params"], head):  # w, then b (the heads' parameter order)
        buf = (state.get(idx) or {}).get("momentum_buffer")
        if name == "w" and buf is not None and buf.shape == head["w"].shape:
            run.weight_momentum = (buf.t() if transposed else buf).detach().float().contiguous().clone()
    if run.backbone_momentum is None and run.weight_momentum is None:
        return
    run.notes.append(
        f"SGD momentum (momentum {groups[0].get('momentum')}): {len(run.backbone_momentum or {})} of "
        f"{len(names)} backbone tensors, rows {'yes' if run.weight_momentum is not None else 'no'}"
        + ("; b's momentum not carried" if "b" in head else "")
        + (
            "; features.weight is trained by OpenSphere, fixed in fr_dist (its value carried, momentum unused)"
            if "features.weight" in (run.backbone_momentum or {})
            else ""
        )
    )
