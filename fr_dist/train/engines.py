"""Parallelism applied as steps to an unchanged backbone (torchtitan style) + the one dims object.

    dims = ParallelDims(world_size, rank, grad_accum, engine)   # validated once
    model = create_backbone(..., channels_last=True)             # an unchanged model
    engine = apply_ddp(model, dims, device, optimizer)           # or apply_deepspeed(model, dims, ...)
    engine.backward(loss, scaler); grad_norm, ok = engine.step(scaler, clip, finite)   # the trainer's calls
    files = engine.save_files(folder, rank); engine.load_files(folder, meta)          # checkpoints

Both ``apply_*`` return a :class:`BackboneEngine`; it owns every DeepSpeed branch (the trainer and
the checkpoint code never ask which engine runs).

The classifier head is never wrapped: its shards are model parallel, its gradients are never
all-reduced, and its optimizer lives with its shard.

Gradient convention: DDP and DeepSpeed *average* backbone gradients over ranks, while the
head's reduce-scatter returns each rank the exact dL/dx of the global loss. The head is
therefore built with ``embedding_grad_scale = dims.dp`` (:attr:`ParallelDims.embedding_grad_scale`),
which compensates the averaging exactly once.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from fr_dist.checkpoint_io import CheckpointError, safe_load
from fr_dist.train.logging import rank0_print

__all__ = [
    "ParallelDims",
    "apply_ddp",
    "apply_deepspeed",
    "BackboneEngine",
    "ds_full_state",
    "ds_load_full_state",
    "ds_weights_only_loads",
]


@dataclass(frozen=True)
class ParallelDims:
    """How the job is split: data parallel for the backbone, class parallel for the head."""

    world_size: int
    """Processes in the job."""
    rank: int
    """This process."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    engine: str = "ddp"
    """Backbone data-parallel engine: ddp | deepspeed."""

    def __post_init__(self):
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world of size {self.world_size}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.engine not in ("ddp", "deepspeed"):
            raise ValueError(f"unknown engine {self.engine!r}; known: ddp, deepspeed")

    @property
    def dp(self) -> int:
        """Data-parallel degree of the backbone (= world size) and class-parallel degree of the head."""
        return self.world_size

    @property
    def embedding_grad_scale(self) -> float:
        """Factor for the head's reduce-scatter that cancels the engine's 1/dp gradient averaging."""
        return float(self.dp)


def apply_ddp(
    model: nn.Module, dims: ParallelDims, device: torch.device, optimizer=None, process_group=None
) -> BackboneEngine:
    """Wrap in DistributedDataParallel when there is more than one rank (else unchanged)."""
    if dims.dp > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            process_group=process_group,
            broadcast_buffers=False,
            bucket_cap_mb=16,
        )
    return BackboneEngine(model, optimizer, dims)


class BackboneEngine:
    """Uniform interface over plain/DDP and DeepSpeed backbones for the trainer loop."""

    def __init__(self, module: nn.Module, optimizer, dims: ParallelDims, ds_engine=None):
        self.module = module
        self.optimizer = optimizer
        self.dims = dims
        self.ds = ds_engine

    @property
    def bare(self) -> nn.Module:
        """The unwrapped backbone (for checkpoints, eval and export)."""
        m = self.ds.module if self.ds is not None else self.module
        return m.module if hasattr(m, "module") and not isinstance(m, nn.Sequential) else m

    def __call__(self, images):
        if self.ds is not None:  # DeepSpeed bf16/fp16 keeps the module in that dtype
            if self.ds.bfloat16_enabled():
                images = images.to(torch.bfloat16)
            elif self.ds.fp16_enabled():
                images = images.half()
            return self.ds(images)
        return self.module(images)

    def no_sync(self, last_micro: bool):
        """DDP: skip the gradient all-reduce on all but the last micro-step."""
        if self.ds is None and not last_micro and hasattr(self.module, "no_sync"):
            return self.module.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, scaler) -> None:
        """One micro-step's backward. DeepSpeed: ``engine.backward`` (it divides by grad_accum) and
        ``engine.step()`` on EVERY micro-step (DeepSpeed applies the update only at the accumulation
        boundary); else ``scaler``'s scaled ``loss / grad_accum``."""
        if self.ds is not None:
            self.ds.backward(loss)
            self.ds.step()
        else:
            scaler.scale(loss / self.dims.grad_accum).backward()

    def step(self, scaler, clip_grad_norm: float, finite: bool) -> tuple[float, bool]:
        """After the last micro-step: (gradient norm, gradients finite). DDP: unscale through ``scaler``,
        clip, step (skipped when not ``finite``, unless the scaler skips non-finite steps itself)."""
        if self.ds is not None:  # DeepSpeed clipped and stepped in backward()
            return float(self.ds.get_global_grad_norm() or 0.0), True
        scaler.unscale_(self.optimizer)
        params = [p for p in self.bare.parameters() if p.grad is not None]
        max_norm = clip_grad_norm if clip_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
        ok = math.isfinite(grad_norm)
        if (finite and ok) or scaler.is_enabled():
            scaler.step(self.optimizer)  # GradScaler skips non-finite steps itself
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, ok

    def save_files(self, folder: Path, rank: int) -> dict:
        """``{file name: object}`` this rank writes into checkpoint ``folder``: rank 0 the backbone
        (``backbone.pt``, ``backbone_optim.pt``). DeepSpeed: every rank also writes its ZeRO partition
        into ``folder/deepspeed/`` here, and rank 0 fr_dist's world-size independent copy (fp32 master
        weights, optimizer state by parameter name). Collective under DeepSpeed."""
        if self.ds is None:
            if rank != 0:
                return {}
            return {"backbone.pt": self.bare.state_dict(), "backbone_optim.pt": self.optimizer.state_dict()}
        full, optim = ds_full_state(self.ds, self.bare)  # collective: before any write can fail
        self.ds.save_checkpoint(str(Path(folder) / "deepspeed"), tag="engine", save_latest=False)
        if rank != 0:
            return {}
        full = {k: v.float() if v.is_floating_point() else v for k, v in full.items()}  # fp32 masters
        return {"backbone.pt": full, "backbone_optim.pt": dict(format=DS_FULL_FORMAT, state=optim)}

    def load_files(self, folder: Path, meta: dict) -> None:
        """Restore from checkpoint ``folder`` (any world size; DeepSpeed ZeRO-1/2: :func:`load_deepspeed`)."""
        if self.ds is not None:
            load_deepspeed(self, folder, meta)
            return
        device = next(self.bare.parameters()).device
        self.bare.load_state_dict(safe_load(Path(folder) / "backbone.pt", map_location=device))
        self.optimizer.load_state_dict(safe_load(Path(folder) / "backbone_optim.pt", map_location=device))

    def train(self, mode: bool = True):
        (self.ds if self.ds is not None else self.module).train(mode)


def apply_deepspeed(
    model: nn.Module, dims: ParallelDims, optimizer, ds_cfg, clip_grad_norm: float, micro_batch: int
) -> BackboneEngine:
    """Wrap the backbone in a DeepSpeed engine (ZeRO stage ``ds_cfg.zero_stage``); the head stays outside.

    DeepSpeed owns the backbone's gradient accumulation boundary (``gradient_accumulation_steps``
    = ``dims.grad_accum``), mixed precision and clipping; fr_dist calls ``engine.backward`` and
    ``engine.step()`` on every micro-step (DeepSpeed updates only at the accumulation boundary),
    and steps the LR schedule itself.
    bf16 works on CPU and GPU; fp16 only on GPU (DeepSpeed refuses it on CPU).
    """
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": dims.grad_accum,
        "train_batch_size": micro_batch * dims.grad_accum * dims.dp,
        "zero_optimization": {"stage": int(ds_cfg.zero_stage)},
        "zero_allow_untested_optimizer": True,  # torch SGD/AdamW with param groups
        "gradient_clipping": float(clip_grad_norm),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds_cfg.bf16:
        config["bf16"] = {"enabled": True}
    elif getattr(ds_cfg, "fp16", False):
        config["fp16"] = {"enabled": True}
    config.update(dict(ds_cfg.config or {}))
    # DeepSpeed casts parameters but not buffers; BatchNorm then mixes bf16 inputs with fp32
    # running statistics and fails on CPU. Cast the whole module (buffers included) up front.
    if "bf16" in config:
        model = model.to(torch.bfloat16)
    elif "fp16" in config:
        model = model.half()
    engine, _ds_opt, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    # the ZeRO wrapper shares the torch optimizer's param_groups: the LR schedule drives those
    return BackboneEngine(engine, optimizer, dims, ds_engine=engine)


# ----------------------------------------------------------------------------- DeepSpeed re-shard
# fr_dist's own world-size independent copy of a DeepSpeed ZeRO-1/2 backbone: the fp32 master weights
# and the fp32 optimizer state per parameter name, gathered from the ranks' partitions at save time
# (``backbone.pt`` / ``backbone_optim.pt`` beside DeepSpeed's ``deepspeed/`` folder). A resume on the
# same world size uses DeepSpeed's own files; on another world size it scatters these into the new
# partitions (weights, master weights and momentum / Adam moments: the update continues exactly).

DS_FULL_FORMAT = "fr_dist-ds-full-v1"


def _ds_zero_optimizer(engine):
    opt = engine.optimizer
    stage = int(engine.zero_optimization_stage())
    if stage not in (1, 2) or not hasattr(opt, "single_partition_of_fp32_groups"):
        raise NotImplementedError(
            f"fr_dist re-shards DeepSpeed ZeRO stage 1/2 checkpoints (this engine: stage {stage}, "
            f"{type(opt).__name__}); resume on the saved world size"
        )
    return opt


def _zero_groups(zopt, module: nn.Module):
    """Per ZeRO param group: (fp32 partition [numel/dp], [(name, param, numel, offset in the group)])."""
    name_of = {id(p): n for n, p in module.named_parameters()}
    for i, flat in enumerate(zopt.single_partition_of_fp32_groups):
        members, off = [], 0
        for p in zopt.bit16_groups[i]:
            if id(p) in name_of:
                members.append((name_of[id(p)], p, p.numel(), off))
            off += p.numel()
        yield i, flat, members, off


def ds_full_state(engine, module: nn.Module) -> tuple[dict, dict]:
    """(state dict with fp32 master weights, {param name: {state key: fp32 tensor}}) of a DeepSpeed
    ZeRO-1/2 backbone. Collective: every rank calls it (one all-reduce per param group and tensor kind):
    each rank writes its partition's fragments into a zero [group numel] buffer, the sum is the whole."""
    from fr_dist import comm

    zopt = _ds_zero_optimizer(engine)
    state = module.state_dict()  # buffers (BN statistics) as the module holds them
    optim: dict = {n: {} for n, _ in module.named_parameters()}
    for i, flat, members, total in _zero_groups(zopt, module):
        st = zopt.optimizer.state.get(flat, {})
        kinds = {"__weight__": flat}
        kinds.update({k: v for k, v in sorted(st.items()) if torch.is_tensor(v) and v.shape == flat.shape})
        group = zopt.real_dp_process_group[i]
        for kind, src in kinds.items():
            buf = torch.zeros(total, dtype=torch.float32)  # [numel of the whole group], fp32
            for _, p, _, off in members:
                m = getattr(p, "_hp_mapping", None)
                if m is not None:  # this rank's fragment of p: [lp.start, +numel) of p's flat view
                    lp, hp = m.lp_fragment_address, m.hp_fragment_address
                    buf.narrow(0, off + lp.start, lp.numel).copy_(src.detach().narrow(0, hp.start, hp.numel))
            full = comm.all_reduce(buf, group=group, name=f"deepspeed_consolidate_{kind.strip('_')}")
            for name, p, n, off in members:
                value = full.narrow(0, off, n).reshape(p.shape).clone()  # [numel] -> p's shape
                if kind == "__weight__":
                    state[name] = value
                else:
                    optim[name][kind] = value
    return state, optim


@torch.no_grad()
def ds_load_full_state(engine, module: nn.Module, state: dict, optim: dict) -> None:
    """Load :func:`ds_full_state`'s output into a DeepSpeed ZeRO-1/2 engine of any world size.

    The module's (bf16) parameters get the master weights rounded to their dtype (what DeepSpeed's
    step writes), each rank's fp32 partition its slice of the master weights, and the inner torch
    optimizer's state (created here if the engine has not stepped yet) its slice of every saved key.
    """
    zopt = _ds_zero_optimizer(engine)
    mine = module.state_dict()
    missing = sorted(set(mine) - set(state))
    if missing:
        raise KeyError(f"the consolidated DeepSpeed state lacks {missing[:5]}")
    module.load_state_dict({k: v.to(mine[k].dtype) for k, v in state.items()})  # bf16: round to nearest
    for _, flat, members, _ in _zero_groups(zopt, module):
        for name, p, _, _ in members:  # this rank's fp32 master fragments
            m = getattr(p, "_hp_mapping", None)
            if m is not None:
                lp, hp = m.lp_fragment_address, m.hp_fragment_address
                src = state[name].reshape(-1).narrow(0, lp.start, lp.numel)  # [numel of p] -> fragment
                flat.data.narrow(0, hp.start, hp.numel).copy_(src.to(flat.dtype))
        keys = {k for name, *_ in members for k in optim.get(name, {})}
        st = zopt.optimizer.state.setdefault(flat, {})
        for key in sorted(keys):
            buf = torch.zeros_like(flat)  # [partition numel], fp32; padding stays 0
            for name, p, _, _ in members:
                m = getattr(p, "_hp_mapping", None)
                if m is None:
                    continue
                lp, hp = m.lp_fragment_address, m.hp_fragment_address
                src = optim[name][key].reshape(-1).narrow(0, lp.start, lp.numel)  # [numel of p] -> fragment
                buf.narrow(0, hp.start, hp.numel).copy_(src.to(buf.dtype))
            st[key] = buf
    zopt._hp_optimizer_states_linked = False  # DeepSpeed re-links the fragments at its next step


@contextlib.contextmanager
def ds_weights_only_loads():
    """DeepSpeed's checkpoint engine calls ``torch.load(weights_only=False)``; inside this block every
    ``torch.load`` runs with ``weights_only=True`` and only the DeepSpeed types its files hold allowed."""
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    real = torch.load
    allowed = [ZeroStageEnum, fragment_address, set]
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        allowed += [LossScaler, DynamicLossScaler]

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed):
            return real(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = real


def load_deepspeed(bb: BackboneEngine, path, meta: dict) -> None:
    """Restore the DeepSpeed backbone engine ``bb`` from checkpoint folder ``path``.

    Same world size: DeepSpeed's own files (its loads forced to ``weights_only=True``). Another
    world size: fr_dist's consolidated ``backbone.pt`` / ``backbone_optim.pt`` re-sharded by
    :func:`ds_load_full_state` (weights, fp32 master weights and optimizer state all restored).
    """
    path, engine = Path(path), bb.ds
    saved_world = meta.get("world_size")
    if saved_world == bb.dims.world_size:
        with ds_weights_only_loads():
            engine.load_checkpoint(str(path / "deepspeed"), tag="engine", load_lr_scheduler_states=False)
        return
    optim = safe_load(path / "backbone_optim.pt") if (path / "backbone_optim.pt").is_file() else {}
    if optim.get("format") != DS_FULL_FORMAT:
        raise CheckpointError(
            f"checkpoint {path} was written by DeepSpeed on {saved_world} ranks without fr_dist's "
            f"consolidated backbone state (written before fr_dist saved it); resume it on {saved_world} "
            "ranks (a checkpoint written from there on resumes on any world size)"
        )
    ds_load_full_state(engine, bb.bare, safe_load(path / "backbone.pt"), optim["state"])
    engine.global_steps = int(meta.get("step", 0))
    engine.micro_steps = engine.global_steps * engine.gradient_accumulation_steps()
    rank0_print(
        bb.dims.rank,
        f"deepspeed: re-sharded {path} from {saved_world} to {bb.dims.world_size} ranks (fp32 master "
        f"weights and optimizer state {sorted({k for v in optim['state'].values() for k in v})})",
    )
