"""How a resume goes on when the run's settings or its world size differ from the checkpoint's.

head_build_kwargs(cfg)      the head's keywords; the unfused fp32 update where the lean one cannot run
saved_head_update(path)     the head update a checkpoint was written by (a resume keeps it)
resize_plan(cfg, meta, W)   train.on_resize on another world size: global batch, grad_accum, LR scale
resize_line(plan, ...)      the one line rank 0 prints about it
"""

from __future__ import annotations

from pathlib import Path

import yaml

from fr_dist.checkpoint.layout import read_meta
from fr_dist.errors import ConfigError
from fr_dist.heads.row_optim import ROW_OPTIMIZERS
from fr_dist.sharding import class_range
from fr_dist.train.config import Config

__all__ = ["UNFUSED", "head_build_kwargs", "resize_line", "resize_plan", "saved_head_update"]

# What the head is built with when the settings cannot use the in-pass update it was configured for.
UNFUSED = dict(fused_update=False, proxy_dtype="fp32", master_weights=False)


def head_build_kwargs(cfg: Config) -> tuple[dict, str | None]:
    """The configured head's constructor keywords (``cfg.head.head_kwargs()``) and, when its
    ``fused_update`` (the config default) cannot run with these settings, why: then the keywords are
    those of the unfused update with fp32 proxies (:data:`UNFUSED`). The one place that decides it.

    The in-pass update takes the loss as back-propagated once per optimizer step, so it needs
    ``train.grad_accum=1``, and it runs a row optimizer, so ``train.optimizer`` must be one of
    :data:`fr_dist.heads.row_optim.ROW_OPTIMIZERS`. Loss scaling (``train.amp=fp16``) does not matter: the
    update is computed in the forward, on unscaled gradients. An explicit ``fused_update=true`` falls back
    the same way as the default.
    """
    kwargs = cfg.head.head_kwargs()
    if not kwargs.get("fused_update"):
        return kwargs, None
    t, key = cfg.train, f"head.{cfg.head.name}.fused_update=true"
    needs = []
    if t.grad_accum != 1:
        needs.append(f"train.grad_accum=1 (got {t.grad_accum})")
    if t.optimizer.lower() not in ROW_OPTIMIZERS:
        needs.append(f"train.optimizer in {' | '.join(ROW_OPTIMIZERS)} (got {t.optimizer})")
    if not needs:
        return kwargs, None
    dtype = "fp32 proxies" if kwargs.get("proxy_dtype", "fp32") == "fp32" else "fp32 proxies instead of bf16"
    why = (
        f"{key} needs {' and '.join(needs)}: using the unfused update with {dtype} "
        "(more memory per step: see README, Speed and memory of the heads)"
    )
    return {**kwargs, **UNFUSED}, why


def saved_head_update(path: Path, head_name: str) -> dict | None:
    """The head update a checkpoint was written by: its meta.json's ``head_update``, or for a checkpoint
    from before it, its config.yaml's ``head.<name>`` keys with the defaults of that time (the head
    constructor's: unfused, fp32; such a config could not fall back). None when neither says."""
    saved = read_meta(path).get("head_update")
    if saved is not None:
        return {k: saved[k] for k in UNFUSED}
    if not (path / "config.yaml").is_file():
        return None
    section = ((yaml.safe_load((path / "config.yaml").read_text()) or {}).get("head") or {}).get(
        head_name
    ) or {}
    return {k: section.get(k, v) for k, v in UNFUSED.items()}


def resize_plan(cfg: Config, meta: dict, world_size: int) -> dict | None:
    """How a resume on ``world_size`` ranks goes on from a checkpoint with meta.json ``meta``, per
    ``train.on_resize``; None when nothing changes (the same world size: resumed exactly as saved).

    The global batch (per optimizer step) is ``data.batch_size x world size x grad_accum``.
    keep_per_rank_batch_scale_lr: batch_size and grad_accum as configured, the LRs scaled linearly with
    the global batch, relative to the run's first one (``lr_global_batch`` in meta.json).
    keep_global_batch: grad_accum = old global batch / (batch_size x world_size), the LRs as they were;
    a ConfigError when that is not a whole number >= 1.
    """
    t, b = cfg.train, cfg.data.batch_size
    old_w = int(meta.get("world_size", world_size))
    old_global = int(meta.get("global_batch", b * old_w * t.grad_accum))  # older checkpoints: as configured
    old_scale = float(meta.get("lr_scale", 1.0))
    first = int(meta.get("lr_global_batch", round(old_global / old_scale)))
    keep = t.on_resize == "keep_global_batch"
    if old_w == world_size and not (keep and old_global != b * world_size * t.grad_accum):
        return None
    accum, scale = t.grad_accum, old_scale
    if keep:
        accum, rest = divmod(old_global, b * world_size)
        if rest or accum < 1:
            raise ConfigError(
                f"train.on_resize=keep_global_batch: the global batch {old_global} of the checkpoint "
                f"(world size {old_w}) is not data.batch_size={b} x {world_size} ranks x a whole grad_accum; "
                "use train.on_resize=keep_per_rank_batch_scale_lr, or a data.batch_size that divides it"
            )
    else:
        scale = b * world_size * accum / first
    return dict(
        old_world=old_w,
        world=world_size,
        old_global=old_global,
        global_batch=b * world_size * accum,
        old_accum=int(meta.get("grad_accum", t.grad_accum)),
        grad_accum=accum,
        old_lr_scale=old_scale,
        lr_scale=scale,
        lr_global_batch=first,
    )


def resize_line(p: dict, num_classes: int, lr0: float, policy: str) -> str:
    """The one line rank 0 prints when a resume finds another world size (``p``: :func:`resize_plan`'s),
    ``lr0`` the configured peak LR of the backbone."""
    k = num_classes

    def rows(w: int) -> str:
        n = [class_range(k, r, w)[1] for r in range(w)]
        return "/".join(map(str, n)) if w <= 8 else f"{w} x {min(n)}..{max(n)}"

    accum = (
        "" if p["old_accum"] == p["grad_accum"] else f" (grad_accum {p['old_accum']} -> {p['grad_accum']})"
    )
    what = f"world size changed {p['old_world']} -> {p['world']}: classifier re-sharded "
    what += f"(rows {rows(p['old_world'])} -> {rows(p['world'])})"
    if p["old_world"] == p["world"]:  # keep_global_batch after a data.batch_size change
        what = f"world size {p['world']} as saved, data.batch_size changed"
    return (
        f"{what}, global batch {p['old_global']} -> "
        f"{p['global_batch']}{accum}, lr {lr0 * p['old_lr_scale']:.4g} -> {lr0 * p['lr_scale']:.4g} "
        f"(train.on_resize={policy})"
    )
