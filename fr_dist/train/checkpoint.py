"""Step-level, atomic, world-size independent checkpoints: ``RUN/checkpoints/<step>/``.

Layout of one checkpoint (every file written by ``torch.save``)::

    <step>/backbone.pt           backbone state dict (rank 0; DDP/DeepSpeed wrappers stripped)
    <step>/backbone_optim.pt     backbone optimizer state (rank 0; replicated under DDP)
    <step>/deepspeed/            DeepSpeed engine checkpoint instead of the two above (engine: deepspeed)
    <step>/head_rank<r>.pt       classifier shard of rank r: class_start, num_local, num_classes,
                                 embedding_size, weight rows, replicated params (bias), the shard's
                                 optimizer state (momentum / Adam moments per row), sampler generator
    <step>/rng_rank<r>.pt        torch / numpy / python (/ cuda) RNG states of rank r
    <step>/trainer.pt            step, epoch, schedulers, GradScaler, data sampler, world size (rank 0)
    <step>/config.yaml           the resolved config
    <step>/meta.json             written last: the completeness marker

Atomicity: everything is written into ``checkpoints/.tmp-<step>/``; after a barrier rank 0 writes
``meta.json`` and renames the folder to ``<step>/``. A crash at any point leaves the previous
checkpoints untouched and at worst a ``.tmp-*`` folder, which resume ignores and the next save
removes. ``resume=auto`` picks the newest folder that has ``meta.json``.

Re-sharding: on load each rank reads the row ranges of every saved shard that overlap its own
``[class_start, class_start + num_local)`` and copies those rows (weights and row-wise optimizer
state), so a checkpoint saved on W ranks resumes on any W' (including ranks with zero classes)
without materialising the full [K, D] matrix on one rank.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "list_checkpoints",
    "latest_checkpoint",
    "save_head_shard",
    "load_head_shard",
    "rng_state",
    "set_rng_state",
    "tmp_dir",
    "finalize",
    "prune",
    "read_meta",
]


class CheckpointError(RuntimeError):
    pass


def _ckpt_root(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints (with meta.json), oldest first."""
    root = _ckpt_root(output_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.isdigit() and (p / "meta.json").is_file()]
    return sorted(done, key=lambda p: int(p.name))


def latest_checkpoint(output_dir) -> Optional[Path]:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def resume_path(output_dir, resume: str) -> Optional[Path]:
    """``checkpoint.resume``: none -> None, auto -> newest complete checkpoint (or None), else that folder."""
    if resume == "none":
        return None
    return latest_checkpoint(output_dir) if resume == "auto" else Path(resume)


def read_meta(path) -> dict:
    path = Path(path)
    meta = path / "meta.json"
    if not meta.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no meta.json)")
    return json.loads(meta.read_text())


def tmp_dir(output_dir, step: int) -> Path:
    return _ckpt_root(output_dir) / f".tmp-{step}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj, path: Path) -> None:
    """torch.save to ``path.part`` + fsync + rename."""
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


def finalize(output_dir, step: int, meta: dict) -> Path:
    """Rank 0, after every rank wrote its files into the tmp folder: mark complete and publish."""
    tmp = tmp_dir(output_dir, step)
    meta = dict(meta, step=step, time=time.time(), format="fr_dist-ckpt-v1")
    (tmp / "meta.json.part").write_text(json.dumps(meta, indent=1))
    os.replace(tmp / "meta.json.part", tmp / "meta.json")
    for f in tmp.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(tmp)
    final = _ckpt_root(output_dir) / str(step)
    if final.exists():  # a re-save of the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def prune(output_dir, keep: int, protect: tuple = ()) -> None:
    """Keep the newest ``keep`` complete checkpoints (0 = keep all) and drop stale tmp folders."""
    root = _ckpt_root(output_dir)
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith(".tmp-"):
            shutil.rmtree(p, ignore_errors=True)
    if keep > 0:
        for p in list_checkpoints(output_dir)[:-keep]:
            if p.resolve() not in {Path(x).resolve() for x in protect}:
                shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------- head shards


def _param_names(head) -> dict:
    return {id(p): n for n, p in head.named_parameters()}


def save_head_shard(head, optimizer, folder: Path, rank: int) -> None:
    """This rank's class rows, replicated head params, and the shard's optimizer state."""
    names = _param_names(head)
    opt_state = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in names and p in optimizer.state:
                opt_state[names[id(p)]] = {
                    k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in optimizer.state[p].items()
                }
    shard = dict(
        class_start=head.class_start,
        num_local=head.num_local,
        num_classes=head.num_classes,
        embedding_size=head.embedding_size,
        world_size=head.world_size,
        params={n: p.detach().cpu() for n, p in head.named_parameters()},
        optimizer_state=opt_state,
        generator=head.generator.get_state() if hasattr(head, "generator") else None,
    )
    atomic_save(shard, folder / f"head_rank{rank}.pt")


def _overlap(a0, an, b0, bn):
    lo, hi = max(a0, b0), min(a0 + an, b0 + bn)
    return (lo, hi) if hi > lo else None


@torch.no_grad()
def load_head_shard(head, optimizer, folder: Path) -> None:
    """Fill this rank's rows (and row-wise optimizer state) from the saved shards of any world size."""
    files = sorted(Path(folder).glob("head_rank*.pt"), key=lambda p: int(p.stem.replace("head_rank", "")))
    if not files:
        raise CheckpointError(f"{folder}: no head_rank*.pt files")
    names = dict(head.named_parameters())
    my0, myn = head.class_start, head.num_local
    opt_param = {n: p for n, p in names.items()}
    loaded_state: dict = {}
    covered = 0
    for i, f in enumerate(files):
        shard = torch.load(f, map_location="cpu", weights_only=False)
        for field, mine in (
            ("num_classes", head.num_classes),
            ("embedding_size", head.embedding_size),
        ):
            if shard[field] != mine:
                raise CheckpointError(
                    f"checkpoint {folder} has {field}={shard[field]} but the config/model has {mine}; "
                    f"refusing to load (fr_dist never re-initialises silently): fix `{field}` or start a new run"
                )
        if i == 0:  # replicated parameters (bias) and their optimizer state come from rank 0
            for n, v in shard["params"].items():
                if n != "weight":
                    names[n].copy_(v)
            for n, st in shard["optimizer_state"].items():
                if n != "weight":
                    loaded_state[n] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
        ov = _overlap(my0, myn, shard["class_start"], shard["num_local"])
        if ov is None:
            continue
        lo, hi = ov
        src = slice(lo - shard["class_start"], hi - shard["class_start"])
        dst = slice(lo - my0, hi - my0)
        names["weight"][dst] = shard["params"]["weight"][src].to(names["weight"].dtype)
        covered += hi - lo
        wst = shard["optimizer_state"].get("weight", {})
        tgt = loaded_state.setdefault("weight", {})
        for k, v in wst.items():
            if torch.is_tensor(v) and v.dim() == 2 and v.shape[0] == shard["num_local"]:  # row-wise
                buf = tgt.setdefault(k, torch.zeros((myn,) + tuple(v.shape[1:]), dtype=v.dtype))
                buf[dst] = v[src]
            else:
                tgt.setdefault(k, v.clone() if torch.is_tensor(v) else v)
    if covered != myn:
        raise CheckpointError(f"{folder}: saved shards cover {covered} of this rank's {myn} classes")
    own = folder / f"head_rank{head.rank}.pt"
    # the sampling stream of each rank continues only when the world size is unchanged
    if hasattr(head, "generator") and own.exists():
        shard = torch.load(own, map_location="cpu", weights_only=False)
        if shard.get("world_size") == head.world_size and shard.get("generator") is not None:
            head.generator.set_state(shard["generator"])
    if optimizer is not None:
        for n, st in loaded_state.items():
            if not st:
                continue
            p = opt_param[n]
            optimizer.state[p] = {
                k: (v.to(p.device) if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in st.items()
            }


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    st = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate())
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(st["cuda"])


# ----------------------------------------------------------------------------- whole trainer


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_trainer(tr) -> Path:
    """Write a complete checkpoint of a :class:`~fr_dist.train.trainer.Trainer` (all ranks call this)."""
    from fr_dist.train.config import save_config

    out, rank, step = tr.out, tr.env.rank, tr.step
    tmp = tmp_dir(out, step)
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    if tr.bb.ds is not None:  # every rank writes its ZeRO partition
        tr.bb.ds.save_checkpoint(str(tmp / "deepspeed"), tag="engine", save_latest=False)
    elif rank == 0:
        atomic_save(tr.bb.bare.state_dict(), tmp / "backbone.pt")
        atomic_save(tr.bb.optimizer.state_dict(), tmp / "backbone_optim.pt")
    save_head_shard(tr.head, tr.opt_head, tmp, rank)
    atomic_save(rng_state(), tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        sampler_state = dict(tr.loader.sampler.state_dict())
        sampler_state.update(epoch=tr.epoch, consumed_global=tr.consumed)
        atomic_save(
            dict(
                step=step,
                epoch=tr.epoch,
                world_size=tr.env.world_size,
                global_batch=tr.cfg.data.batch_size * tr.env.world_size,
                sched_bb=tr.sched_bb.state_dict(),
                sched_head=tr.sched_head.state_dict(),
                scaler=tr.scaler.state_dict(),
                sampler=sampler_state,
                best_acc=tr.best_acc,
                nonfinite=tr.nonfinite,
            ),
            tmp / "trainer.pt",
        )
        save_config(tr.cfg, tmp / "config.yaml")
    _barrier()
    final = _ckpt_root(out) / str(step)
    if rank == 0:
        final = finalize(
            out,
            step,
            dict(
                world_size=tr.env.world_size,
                num_classes=tr.head.num_classes,
                embedding_size=tr.head.embedding_size,
                engine=tr.cfg.engine,
            ),
        )
        prune(out, tr.cfg.checkpoint.keep)
        print(f"checkpoint saved: {final}", flush=True)
    _barrier()
    return final


def load_trainer(tr, path) -> None:
    """Restore a Trainer from ``path`` (any world size; DeepSpeed ZeRO >= 1 needs the same world size)."""
    path = Path(path)
    meta = read_meta(path)
    for field, mine in (
        ("num_classes", tr.head.num_classes),
        ("embedding_size", tr.head.embedding_size),
    ):
        if meta.get(field) != mine:
            raise CheckpointError(
                f"checkpoint {path} was trained with {field}={meta.get(field)}, the config gives {mine}: "
                f"refusing to resume (no silent re-initialisation); set the config's {field} to match"
            )
    if meta.get("engine", "ddp") != tr.cfg.engine:
        raise CheckpointError(
            f"checkpoint {path} was written by engine={meta.get('engine')}, config has engine={tr.cfg.engine}"
        )
    if tr.bb.ds is not None:
        tr.bb.ds.load_checkpoint(str(path / "deepspeed"), tag="engine", load_lr_scheduler_states=False)
    else:
        tr.bb.bare.load_state_dict(
            torch.load(path / "backbone.pt", map_location=tr.device, weights_only=False)
        )
        tr.bb.optimizer.load_state_dict(
            torch.load(path / "backbone_optim.pt", map_location=tr.device, weights_only=False)
        )
    load_head_shard(tr.head, tr.opt_head, path)
    st = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
    tr.step, tr.epoch, tr.best_acc, tr.nonfinite = (
        st["step"],
        st["epoch"],
        st["best_acc"],
        st["nonfinite"],
    )
    if tr.evaluator is not None:  # RUN/best is replaced only by a better model than before the stop
        tr.evaluator.best = tr.best_acc
    for sched, key in ((tr.sched_bb, "sched_bb"), (tr.sched_head, "sched_head")):
        sched.load_state_dict(st[key])
        # a scheduler's state does not hold its optimizer's current lr: put it back explicitly
        for group, lr in zip(sched.optimizer.param_groups, sched.get_last_lr()):
            group["lr"] = lr
    tr.scaler.load_state_dict(st["scaler"])
    gb = tr.cfg.data.batch_size * tr.env.world_size
    if st["global_batch"] != gb:
        warnings.warn(
            f"global batch changed from {st['global_batch']} to {gb}: data order resumes at the same sample, "
            "step counts in the schedule are kept as saved",
            stacklevel=1,
        )
    tr.loader.sampler.load_state_dict(st["sampler"])
    tr.consumed = st["sampler"]["consumed_global"]
    rng = path / f"rng_rank{tr.env.rank}.pt"
    if rng.exists() and st["world_size"] == tr.env.world_size:
        set_rng_state(torch.load(rng, weights_only=False))
