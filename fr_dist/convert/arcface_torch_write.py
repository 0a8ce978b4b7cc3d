"""fr_dist runs out to insightface ``recognition/arcface_torch``: ``fr-dist export RUN --arcface-torch OUT_DIR``.

    export_arcface_torch(RUN, OUT, world_size=N)     an fr_dist run / checkpoint folder -> OUT (its config's
                                                     LR, momentum, weight decay and schedule)
    write_arcface_torch(imported, OUT, world_size=N)  an ImportedRun -> model.pt + checkpoint_gpu_{r}.pt
    arcface_export_settings(cfg, folder, N)          train_v2's optimizer / schedule values for a run of cfg

The files are train_v2's (``save_all_states``) layout, described in :mod:`fr_dist.convert.arcface_torch`
(the readers); rank ``r`` holds classes ``[start_r, start_r + n_r)`` by
:func:`fr_dist.sharding.class_range`, for any ``world_size``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from fr_dist.checkpoint.atomic import atomic_save
from fr_dist.checkpoint.layout import safe_load
from fr_dist.convert import ImportedRun
from fr_dist.convert.arcface_torch import parameter_names
from fr_dist.convert.run import adapt_notes_kept, read_run
from fr_dist.errors import CheckpointError
from fr_dist.models import create_backbone
from fr_dist.sharding import class_range
from fr_dist.train.optim import head_lr_wd
from fr_dist.train.schedule import optimizer_steps_per_epoch, resolve_schedule

__all__ = ["export_arcface_torch", "write_arcface_torch", "arcface_export_settings", "arcface_lr_schedule"]


def export_arcface_torch(
    run, out_dir, world_size: int = 1, step: Optional[int] = None
) -> tuple[Path, list[str]]:
    """Write fr_dist run / checkpoint folder ``run`` (newest checkpoint, or ``step``) as arcface_torch's
    train_v2 files for ``world_size`` GPUs in ``out_dir`` (:func:`write_arcface_torch`, with the LR, momentum,
    weight decay and schedule of the run's config). Returns (the checkpoint folder read, the notes)."""
    imported, cfg, folder = read_run(run, step)
    settings = arcface_export_settings(cfg, folder, world_size)
    imported.notes.extend(settings.pop("notes"))
    write_arcface_torch(imported, out_dir, world_size, **settings)
    return folder, imported.notes


def arcface_export_settings(cfg, folder: Path, world_size: int) -> dict:
    """train_v2's optimizer / schedule values for a run of ``cfg`` continued on ``world_size`` GPUs: LR,
    head LR, momentum, weight decay, poly total / warmup steps and power, the backbone (for its parameter
    order), and notes on what arcface_torch cannot follow."""
    t, notes = cfg.train, []
    head_lr, _ = head_lr_wd(t)
    sampler = (
        (safe_load(folder / "trainer.pt").get("sampler") or {}) if (folder / "trainer.pt").is_file() else {}
    )
    num = sampler.get("num_samples")
    if t.max_steps > 0 or num:
        spe = optimizer_steps_per_epoch(int(num or 0), cfg.data.batch_size * world_size, t.grad_accum)
        plan = resolve_schedule(t, spe)
        total, warmup = plan["total_steps"], plan["warmup_steps"]
    else:
        total, warmup = None, 0
        notes.append("LR schedule: the dataset size is unknown; the written poly schedule ends at the step")
    if t.schedule != "poly" or t.min_lr:
        notes.append(
            f"LR schedule: fr_dist's {t.schedule} (min_lr {t.min_lr}) written as arcface_torch's polynomial "
            "schedule (its only one): the LR after the resume differs"
        )
    if t.optimizer != "sgd":
        notes.append(
            f"optimizer: the run used {t.optimizer}; arcface_torch's train_v2 state is SGD (momentum 0.9)"
        )
    return dict(
        lr=t.lr,
        head_lr=head_lr,
        momentum=t.momentum if t.optimizer == "sgd" else 0.9,
        weight_decay=t.weight_decay,
        total_steps=total,
        warmup_steps=warmup,
        power=t.poly_power if t.schedule == "poly" else 1.0,
        notes=notes,
        model=create_backbone(cfg.model),
    )


def arcface_lr_schedule(step: int, peak: float, total: int, warmup: int, power: float) -> float:
    """The LR arcface_torch's ``PolynomialLRWarmup`` (closed form) gives optimizer step ``step``."""
    if warmup > 0 and step <= warmup:
        return peak * step / warmup
    span = max(1, total - warmup)
    return peak * max(0.0, 1.0 - (min(total, step) - warmup) / span) ** power


def _scheduler_state(
    step: int, base_lrs: list, last_lrs: list, total: int, warmup: int, power: float
) -> dict:
    """A state dict that both of arcface_torch's schedulers load (``_LRScheduler.load_state_dict`` is a
    ``__dict__`` update): PolynomialLRWarmup's fields (train_v2 today) and PolyScheduler's (2022)."""
    return dict(
        # PolynomialLRWarmup
        total_iters=int(total),
        power=float(power),
        warmup_iters=int(warmup),
        # PolyScheduler (train.py, 2022; power 2 there)
        base_lr=float(base_lrs[0]),
        warmup_lr_init=0.0001,
        max_steps=int(total),
        warmup_steps=int(warmup),
        # torch _LRScheduler
        base_lrs=[float(x) for x in base_lrs],
        last_epoch=int(step),
        verbose=False,
        _step_count=int(step) + 1,
        _get_lr_called_within_step=False,
        _last_lr=[float(x) for x in last_lrs],
    )


def write_arcface_torch(
    imported: ImportedRun,
    out_dir,
    world_size: int,
    lr: float = 0.1,
    head_lr: Optional[float] = None,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    total_steps: Optional[int] = None,
    warmup_steps: int = 0,
    power: float = 2.0,
    model: Optional[torch.nn.Module] = None,
) -> list[Path]:
    """Write ``model.pt`` and ``checkpoint_gpu_{r}.pt`` (r < ``world_size``) that arcface_torch's train_v2
    resumes from (``cfg.resume=True`` with ``cfg.output=out_dir`` on ``world_size`` GPUs).

    ``imported``: the run (:func:`export_arcface_torch` reads an fr_dist run folder into one, with the
    keyword values from its config). A binary head's rows (SphereFace2, UniFace) are turned into softmax rows
    first (:func:`fr_dist.convert.across.adapt_to_head`).
    The optimizer state is SGD's with train_v2's two param groups; its LR is the closed-form poly LR at the
    step. ``model``: the backbone module (its parameter order; default: the state dict's). Returns the files
    written; what was and was not carried is appended to ``imported.notes``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if imported.head_kind != "softmax":
        imported = adapt_notes_kept(imported, "partial_fc")
    head_lr = lr if head_lr is None else head_lr
    total_steps = total_steps or max(imported.step + 1, 1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backbone = {k: v.detach().cpu().contiguous() for k, v in imported.backbone.items()}
    names = parameter_names(backbone, model)
    unknown = [n for n in names if n not in backbone]
    if unknown:
        raise CheckpointError(f"backbone parameters {unknown[:4]} are not in the backbone state dict")
    step_now = int(imported.step)
    cur = [arcface_lr_schedule(step_now, x, total_steps, warmup_steps, power) for x in (lr, head_lr)]
    written = []
    path = out / "model.pt"
    atomic_save(backbone, path)
    written.append(path)
    bb_params = [backbone[n].clone() for n in names]  # leaf tensors: the optimizer only indexes them
    K = imported.num_classes
    for r in range(world_size):
        start, n = class_range(K, r, world_size)
        rows = imported.weight[start : start + n].float().contiguous().clone()
        opt = torch.optim.SGD(
            [{"params": bb_params}, {"params": [rows]}], lr=lr, momentum=momentum, weight_decay=weight_decay
        )
        for g, (peak, now) in zip(opt.param_groups, zip((lr, head_lr), cur)):
            g["initial_lr"], g["lr"] = peak, now
        if imported.backbone_momentum:
            for n_, p in zip(names, bb_params):
                if n_ in imported.backbone_momentum:
                    opt.state[p]["momentum_buffer"] = imported.backbone_momentum[n_].float().contiguous()
        if imported.weight_momentum is not None:
            opt.state[rows]["momentum_buffer"] = (
                imported.weight_momentum[start : start + n].float().contiguous()
            )
        blob = dict(
            epoch=int(imported.epoch),
            global_step=step_now,
            state_dict_backbone=backbone,
            state_dict_softmax_fc={"weight": rows},
            state_optimizer=opt.state_dict(),
            state_lr_scheduler=_scheduler_state(
                step_now, [lr, head_lr], cur, total_steps, warmup_steps, power
            ),
        )
        path = out / f"checkpoint_gpu_{r}.pt"
        atomic_save(blob, path)
        written.append(path)
    imported.notes.append(
        f"wrote model.pt + checkpoint_gpu_0..{world_size - 1}.pt (step {step_now}, epoch {imported.epoch}, "
        f"{K} classes over {world_size} ranks); backbone momentum "
        f"{'carried' if imported.backbone_momentum else 'absent (starts at zero)'}, row momentum "
        f"{'carried' if imported.weight_momentum is not None else 'absent (starts at zero)'}; arcface_torch "
        "restarts the epoch from its first batch (its loader has no mid-epoch position)"
    )
    return written
