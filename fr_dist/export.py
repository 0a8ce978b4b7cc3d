"""Export a trained backbone: ``fr-dist export RUN --torch OUT.pt --onnx OUT.onnx``.

The ``.pt`` file holds ``{"state_dict", "model": {name, embedding_size, input_size, kwargs}}`` and
is loadable with :func:`load_exported`. The ONNX model takes ``input`` [N, 3, H, W] float in
[-1, 1] (RGB, the training normalisation) with a dynamic batch and returns ``embedding`` [N, D].
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import yaml

from fr_dist.checkpoint import layout as ckpt
from fr_dist.models import create_backbone

__all__ = [
    "resolve_checkpoint",
    "load_backbone_from_checkpoint",
    "load_exported",
    "export",
    "export_onnx",
]


def resolve_checkpoint(path, step: Optional[int] = None) -> Path:
    """A run dir (newest or ``step``), or a checkpoint folder itself."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    if step is not None:
        p = path / "checkpoints" / str(step)
        ckpt.read_meta(p)
        return p
    latest = ckpt.latest_checkpoint(path)
    if latest is None:
        raise ckpt.CheckpointError(f"{path}: no complete checkpoint under {path / 'checkpoints'}")
    return latest


def _model_spec(cfg: dict) -> dict:
    m = cfg["model"]
    return dict(
        name=m["name"],
        embedding_size=m["embedding_size"],
        input_size=m["input_size"],
        dropout=m.get("dropout", 0.0),
        kwargs=dict(m.get("kwargs") or {}),
    )


def _backbone_state(folder: Path) -> dict:
    if (folder / "backbone.pt").is_file():
        return ckpt.safe_load(folder / "backbone.pt")
    ds = folder / "deepspeed"
    if ds.is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # module states (every key, buffers and frozen params included, in the training dtype),
        # overlaid with the fp32 master weights reassembled from the ZeRO partitions
        states = sorted((ds / "engine").glob("mp_rank_*_model_states.pt"))
        sd = dict(ckpt.safe_load(states[0])["module"]) if states else {}
        sd.update(get_fp32_state_dict_from_zero_checkpoint(str(ds), tag="engine"))
        return {k: v.float() if torch.is_floating_point(v) else v for k, v in sd.items()}
    raise ckpt.CheckpointError(f"{folder}: neither backbone.pt nor a deepspeed/ checkpoint")


def load_backbone_from_checkpoint(path, step: Optional[int] = None):
    """(backbone in eval mode, spec) from a run dir, checkpoint folder or exported .pt."""
    path = Path(path)
    if path.is_file():
        return load_exported(path)
    folder = resolve_checkpoint(path, step)
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    spec = _model_spec(cfg)
    model = create_backbone(spec)  # the spec is a model config section
    model.load_state_dict(_backbone_state(folder))
    return model.eval(), spec


def load_exported(path):
    blob = ckpt.safe_load(path)  # weights_only: an exported file cannot run code
    if not (isinstance(blob, dict) and {"state_dict", "model"} <= set(blob)):
        raise ckpt.CheckpointError(f"{path}: not an fr_dist export (expected keys state_dict, model)")
    model = create_backbone(blob["model"])
    model.load_state_dict(blob["state_dict"])
    return model.eval(), blob["model"]


def export_onnx(model, spec: dict, out, opset: int = 17) -> None:
    size = spec["input_size"]
    dummy = torch.zeros(2, 3, size, size)
    torch.onnx.export(
        model.eval(),
        (dummy,),
        str(out),
        input_names=["input"],
        output_names=["embedding"],
        dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}},
        opset_version=opset,
        dynamo=False,
    )


def export(run, torch_out=None, onnx_out=None, step: Optional[int] = None) -> None:
    model, spec = load_backbone_from_checkpoint(run, step)
    if torch_out is None and onnx_out is None:
        raise ValueError("nothing to do: give --torch OUT.pt and/or --onnx OUT.onnx")
    if torch_out:
        Path(torch_out).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": model.state_dict(), "model": spec}, torch_out)
        print(f"wrote {torch_out}")
    if onnx_out:
        Path(onnx_out).parent.mkdir(parents=True, exist_ok=True)
        export_onnx(model, spec, onnx_out)
        print(f"wrote {onnx_out}")
