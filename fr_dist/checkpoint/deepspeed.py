"""The DeepSpeed engine's part of a checkpoint: its own ``deepspeed/`` folder + a world-size free copy.

    files = save_deepspeed(engine, module, folder, rank)       # collective; rank 0 gets its files
    load_deepspeed(engine, module, folder, meta, world_size, rank)

fr_dist's own world-size independent copy of a DeepSpeed ZeRO-1/2 backbone: the fp32 master weights
and the fp32 optimizer state per parameter name, gathered from the ranks' partitions at save time
(``backbone.pt`` / ``backbone_optim.pt`` beside DeepSpeed's ``deepspeed/`` folder). A resume on the
same world size uses DeepSpeed's own files (their ``torch.load`` forced to ``weights_only=True``); on
another world size it scatters these into the new partitions (weights, master weights and momentum /
Adam moments: the update continues exactly). ``train/engines.py`` calls these; the ``deepspeed``
package itself is imported only inside the functions that need it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn as nn

from fr_dist import comm
from fr_dist.checkpoint.layout import safe_load
from fr_dist.errors import CheckpointError

__all__ = [
    "DS_FULL_FORMAT",
    "save_deepspeed",
    "load_deepspeed",
    "ds_full_state",
    "ds_load_full_state",
    "ds_weights_only_loads",
]

DS_FULL_FORMAT = "fr_dist-ds-full-v1"
"""``backbone_optim.pt``'s ``format`` when it holds :func:`ds_full_state`'s optimizer state."""


def save_deepspeed(engine, module: nn.Module, folder: Path, rank: int) -> dict:
    """Every rank writes its ZeRO partition into ``folder/deepspeed/``; returns the ``{file name: object}``
    this rank adds: rank 0 fr_dist's world-size independent copy (``backbone.pt`` with the fp32 master
    weights, ``backbone_optim.pt`` with the optimizer state by parameter name), the others nothing.
    Collective: every rank calls it."""
    full, optim = ds_full_state(engine, module)  # collective: before any write can fail
    engine.save_checkpoint(str(Path(folder) / "deepspeed"), tag="engine", save_latest=False)
    if rank != 0:
        return {}
    full = {k: v.float() if v.is_floating_point() else v for k, v in full.items()}  # fp32 masters
    return {"backbone.pt": full, "backbone_optim.pt": dict(format=DS_FULL_FORMAT, state=optim)}


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
    zopt = _ds_zero_optimizer(engine)
    state = module.state_dict()  # buffers (BN statistics) as the module holds them
    optim: dict = {n: {} for n, _ in module.named_parameters()}
    for i, flat, members, total in _zero_groups(zopt, module):
        st = zopt.optimizer.state.get(flat, {})
        kinds = {"__weight__": flat}
        kinds.update({k: v for k, v in sorted(st.items()) if torch.is_tensor(v) and v.shape == flat.shape})
        group = zopt.real_dp_process_group[i]
        for kind, src in kinds.items():
            # [numel of the whole group], fp32, on the group's device (the partition may be offloaded)
            buf = torch.zeros(total, dtype=torch.float32, device=comm.device_of(group))
            for _, p, _, off in members:
                m = getattr(p, "_hp_mapping", None)
                if m is not None:  # this rank's fragment of p: [lp.start, +numel) of p's flat view
                    lp, hp = m.lp_fragment_address, m.hp_fragment_address
                    buf.narrow(0, off + lp.start, lp.numel).copy_(src.detach().narrow(0, hp.start, hp.numel))
            full = comm.all_reduce(buf, group=group, name=f"deepspeed_consolidate_{kind.strip('_')}")
            full = full.cpu()  # the consolidated copy is saved as CPU tensors: it loads on any machine
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


def load_deepspeed(engine, module: nn.Module, path, meta: dict, world_size: int, rank: int) -> None:
    """Restore DeepSpeed ``engine`` (its bare backbone: ``module``) from checkpoint folder ``path``.

    Same world size: DeepSpeed's own files (its loads forced to ``weights_only=True``). Another
    world size: fr_dist's consolidated ``backbone.pt`` / ``backbone_optim.pt`` re-sharded by
    :func:`ds_load_full_state` (weights, fp32 master weights and optimizer state all restored).
    """
    path = Path(path)
    saved_world = meta.get("world_size")
    if saved_world == world_size:
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
    ds_load_full_state(engine, module, safe_load(path / "backbone.pt"), optim["state"])
    engine.global_steps = int(meta.get("step", 0))
    engine.micro_steps = engine.global_steps * engine.gradient_accumulation_steps()
    if rank == 0:
        kinds = sorted({k for v in optim["state"].values() for k in v})
        print(
            f"deepspeed: re-sharded {path} from {saved_world} to {world_size} ranks (fp32 master "
            f"weights and optimizer state {kinds})",
            flush=True,
        )
