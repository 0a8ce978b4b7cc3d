"""An :class:`~fr_dist.convert.ImportedRun` into an fr_dist run folder, and an fr_dist checkpoint back out.

    write_run(imported, cfg, OUT_RUN)      -> OUT_RUN/checkpoints/<step>/ that ``fr-dist train --config CFG
                                              output_dir=OUT_RUN checkpoint.resume=auto`` resumes on any W
    read_run(RUN or checkpoint folder)     -> (ImportedRun, its Config, the checkpoint folder)
    target_shape(cfg)                      -> (num_classes, embedding_size) the config trains

``write_run`` builds the config's own trainer for one rank on the CPU, loads the imported weights into it
(backbone, rows through the head's re-sharding loader, SGD momentum into the backbone optimizer and the
head's row state, step / epoch / LR schedule position) and saves a checkpoint with the trainer's normal
save path: the files are exactly what a 1-rank fr_dist run writes, so every resume path (any W, re-sharded
head shards) and ``fr-dist eval`` / ``fr-dist export`` read them (convert sits with train, layer 3: it
builds a trainer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import yaml

from fr_dist.checkpoint.layout import safe_load
from fr_dist.checkpoint.states import _head_files
from fr_dist.convert import ImportedRun
from fr_dist.convert.across import adapt_to_head, head_kind_of
from fr_dist.errors import CheckpointError, ConfigError
from fr_dist.export import _backbone_state, resolve_checkpoint
from fr_dist.models import create_backbone
from fr_dist.runtime import DistEnv
from fr_dist.train.config_load import config_from_dict, save_config
from fr_dist.train.optim import build_backbone_optimizer
from fr_dist.train.run import build_trainer, dataset_num_classes

__all__ = ["write_run", "read_run", "target_shape", "adapt_notes_kept"]


def adapt_notes_kept(imported: ImportedRun, head_name: str, hparams=None) -> ImportedRun:
    """:func:`~fr_dist.convert.across.adapt_to_head` (``hparams``: the config's ``head.<head_name>``
    section), with the result's notes list kept the caller's ``imported.notes`` (``fr-dist convert`` prints
    that list after the conversion appended to it)."""
    out = adapt_to_head(imported, head_name, hparams)
    imported.notes[:] = out.notes
    out.notes = imported.notes
    return out


def _with(cfg, **changes):
    """A copy of Config ``cfg`` with nested ``changes`` ({"train": {"tensorboard": False}, ...})."""
    data = cfg.to_dict()
    for key, value in changes.items():
        if isinstance(value, dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return config_from_dict(data)


def target_shape(cfg) -> tuple[int, int]:
    """(num_classes, embedding_size) that ``cfg`` trains: data.num_classes, else the dataset's class count."""
    k = cfg.data.num_classes
    if not k:
        k, _ = dataset_num_classes(cfg.data.rec)
    return int(k), int(cfg.model.embedding_size)


# ----------------------------------------------------------------------------- ImportedRun -> run folder


def _load_backbone(trainer, imported: ImportedRun, cfg) -> None:
    model = trainer.bb.bare
    try:
        model.load_state_dict(imported.backbone, strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()][1:4]
        raise CheckpointError(
            f"{imported.source}: its backbone ({imported.backbone_arch or 'unknown network'}) does not fit "
            f"model.name={cfg.model.name} "
            f"(model.kwargs={cfg.model.kwargs}, embedding_size={cfg.model.embedding_size}): "
            + "; ".join(lines)[:600]
            + " -- set the model the source was trained with (insightface r50 = iresnet50, r100 = iresnet100, "
            "mbf = mobilefacenet, vit_t / vit_s / vit_b / vit_l = the same names)"
        ) from None
    mom = imported.backbone_momentum
    t = cfg.train
    if not mom:
        return
    if t.optimizer != "sgd" or t.momentum == 0:
        imported.notes.append(
            f"backbone momentum NOT carried: the config trains with {t.optimizer} (momentum {t.momentum})"
        )
        return
    opt = trainer.bb.optimizer
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    n = 0
    for name, p in model.named_parameters():
        if name in mom and id(p) in in_opt:
            if tuple(mom[name].shape) != tuple(p.shape):
                raise CheckpointError(
                    f"{imported.source}: momentum of {name} is {list(mom[name].shape)}, the parameter {list(p.shape)}"
                )
            opt.state[p]["momentum_buffer"] = mom[name].to(p.dtype).clone()
            n += 1
    imported.notes.append(f"backbone SGD momentum carried for {n} parameters")


def _load_head(trainer, imported: ImportedRun, cfg) -> None:
    head, opt = trainer.head, trainer.opt_head
    rec = head.shard_state(opt)  # one rank: the whole [K, D] shard in the head's own record format
    rec["params"]["weight"] = imported.weight
    if "weight_master" in rec["row_buffers"]:
        rec["row_buffers"]["weight_master"] = imported.weight.float()
    if imported.bias is not None and "bias" in rec["params"]:
        rec["params"]["bias"] = imported.bias.float().reshape(rec["params"]["bias"].shape)
    mom, t = imported.weight_momentum, cfg.train
    if mom is not None:
        if t.optimizer != "sgd" or t.momentum == 0:
            imported.notes.append(
                f"row momentum NOT carried: the config trains with {t.optimizer} (momentum {t.momentum})"
            )
        elif "weight_momentum" in rec["row_buffers"]:  # the head's in-pass row update owns its momentum
            rec["row_buffers"]["weight_momentum"] = mom
            imported.notes.append("row SGD momentum carried (the head's in-pass row update)")
        else:
            rec["optimizer_state"]["weight"] = {"momentum_buffer": mom}
            imported.notes.append("row SGD momentum carried")
    head.load_resharded([rec], opt, source=imported.source)


def _set_progress(trainer, imported: ImportedRun) -> None:
    p, step = trainer.progress, int(imported.step)
    p.step, p.epoch, p.consumed = step, int(imported.epoch), 0
    for s in (trainer.sched_bb, trainer.sched_head):  # LambdaLR at ``step`` steps taken
        lrs = [base * fn(step) for base, fn in zip(s.base_lrs, s.lr_lambdas)]
        for group, lr in zip(s.optimizer.param_groups, lrs):
            group["lr"] = lr
        s.load_state_dict({**s.state_dict(), "last_epoch": step, "_step_count": step + 1, "_last_lr": lrs})


def write_run(imported: ImportedRun, cfg, out_dir=None) -> Path:
    """Write ``imported`` as checkpoint ``<out_dir>/checkpoints/<step>/`` of a run of ``cfg`` (a validated
    :class:`fr_dist.train.config.Config`; ``out_dir`` default ``cfg.output_dir``). Its config.yaml is ``cfg``
    with that output_dir; ``converted.json`` records the source and the notes. Returns the checkpoint folder.
    Refuses (CheckpointError) rows of another class count or width, a backbone that does not fit."""
    if dist.is_available() and dist.is_initialized():
        raise RuntimeError("write_run builds a 1-rank trainer: call it outside a process group")
    if cfg.engine != "ddp":
        raise ConfigError(
            f"engine={cfg.engine}: convert writes a DDP checkpoint; convert with engine=ddp (a DeepSpeed run "
            "cannot resume it: start a new DeepSpeed run from the exported backbone instead)"
        )
    out = Path(out_dir or cfg.output_dir)
    k, d = target_shape(cfg)
    if (imported.num_classes, imported.embedding_size) != (k, d):
        what = "num_classes" if imported.num_classes != k else "model.embedding_size"
        raise CheckpointError(
            f"{imported.source}: {imported.num_classes} classes x {imported.embedding_size}-d rows, the config "
            f"trains {k} classes x {d}-d: refusing ({what} differs); set the config to the source's values"
        )
    imported = adapt_notes_kept(imported, cfg.head.name, getattr(cfg.head, cfg.head.name, None))
    user = _with(cfg, output_dir=str(out))
    work = _with(
        user,
        device="cpu",
        eval={"bins": []},
        train={"tensorboard": False},
        checkpoint={"resume": "none"},
    )
    trainer = build_trainer(work, DistEnv(), torch.device("cpu"))
    _load_backbone(trainer, imported, cfg)
    _load_head(trainer, imported, cfg)
    _set_progress(trainer, imported)
    if imported.world_size:
        # the run's first global batch is the source's (train.on_resize scales the LR from it on another W)
        first = cfg.data.batch_size * imported.world_size * cfg.train.grad_accum
        trainer.set_first_global_batch(first)
        imported.notes.append(
            f"global batch counted from the source's W={imported.world_size} x data.batch_size="
            f"{cfg.data.batch_size} = {first}: on another world size the LR scales per train.on_resize"
        )
    trainer.cfg = user  # the checkpoint's config.yaml is the user's, not the CPU conversion settings
    out.mkdir(parents=True, exist_ok=True)
    save_config(user, out / "config.yaml")
    folder = trainer.save_checkpoint()
    trainer.log.close()
    record = dict(source=imported.source, step=imported.step, epoch=imported.epoch, notes=imported.notes)
    (out / "converted.json").write_text(json.dumps(record, indent=1))
    return folder


# ----------------------------------------------------------------------------- run folder -> ImportedRun


def read_run(path, step: Optional[int] = None):
    """(ImportedRun, Config, checkpoint folder) of an fr_dist run dir (newest or ``step``) or checkpoint folder."""
    folder = resolve_checkpoint(path, step)
    cfg = config_from_dict(yaml.safe_load((folder / "config.yaml").read_text()))
    backbone = _backbone_state(folder)
    notes: list[str] = []
    sgd = cfg.train.optimizer == "sgd" and cfg.train.momentum > 0
    bb_mom = None
    if sgd and (folder / "backbone_optim.pt").is_file():
        blob = safe_load(folder / "backbone_optim.pt")
        if isinstance(blob, dict) and "format" in blob:  # DeepSpeed's copy: by parameter name
            bb_mom = {n: s["momentum_buffer"] for n, s in blob["state"].items() if "momentum_buffer" in s}
        else:
            model = create_backbone(cfg.model)
            opt = build_backbone_optimizer(model, cfg.train)
            opt.load_state_dict(blob)
            bb_mom = {
                n: opt.state[p]["momentum_buffer"].detach().float()
                for n, p in model.named_parameters()
                if "momentum_buffer" in opt.state.get(p, {})
            }
    shards = sorted((safe_load(f) for f in _head_files(folder)), key=lambda s: s["class_start"])
    rows = [s["row_buffers"].get("weight_master", s["params"]["weight"]).float() for s in shards]
    weight = torch.cat(rows)  # [K, D]
    mom = None
    if sgd:
        parts = []
        for s, w in zip(shards, rows):
            m = s["row_buffers"].get("weight_momentum")
            if m is None:
                m = s["optimizer_state"].get("weight", {}).get("momentum_buffer")
            parts.append(m.float() if m is not None else (torch.zeros_like(w) if w.shape[0] == 0 else None))
        if all(p is not None for p in parts):
            mom = torch.cat(parts)
    if not sgd:
        notes.append(f"{cfg.train.optimizer} moments NOT exported (arcface_torch resumes SGD momentum)")
    bias = shards[0]["params"].get("bias")
    trainer_pt = safe_load(folder / "trainer.pt")
    epoch, smp = int(trainer_pt.get("epoch", 0)), trainer_pt.get("sampler") or {}
    consumed, total = int(smp.get("consumed_global", 0)), int(smp.get("num_samples", 0))
    batch = int(smp.get("world_size", 1)) * int(smp.get("batch_size", 1))
    if total and consumed >= (total // batch) * batch:  # its epoch is used up: the next one comes
        epoch += 1
    elif consumed:
        notes.append(
            f"epoch {epoch} was {consumed} of {total} samples in: an epoch-level format restarts it from its start"
        )
    imported = ImportedRun(
        source=f"fr_dist checkpoint {folder}",
        backbone=backbone,
        weight=weight,
        head_kind=head_kind_of(cfg.head.name),
        bias=bias,
        backbone_momentum=bb_mom,
        weight_momentum=mom,
        step=int(trainer_pt["step"]),
        epoch=epoch,
        world_size=int(trainer_pt.get("world_size") or 1),
        notes=notes,
    )
    return imported, cfg, folder
