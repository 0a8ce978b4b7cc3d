"""insightface ``recognition/arcface_torch`` runs in and out (formats read from its sources; none copied).

    read_arcface_torch(SRC, num_classes=K, embedding_size=D) -> ImportedRun     any layout, any source W
    diagnose_rows(counts, num_classes)                                          why shards do not add up

The writer (fr_dist -> arcface_torch's train_v2 files) is :mod:`fr_dist.convert.arcface_torch_write`.

The layouts, newest first (``r`` = rank, ``W`` = the source's world size; rank ``r`` holds classes
``[start_r, start_r + n_r)`` by :func:`fr_dist.sharding.class_range`, insightface's arithmetic):

* train_v2 (``save_all_states``, May 2022 on): ``checkpoint_gpu_{r}.pt`` = ``{epoch, global_step,
  state_dict_backbone, state_dict_softmax_fc: {weight: [n_r, D]}, state_optimizer, state_lr_scheduler}``,
  and ``model.pt`` (rank 0's backbone state dict). ``state_optimizer`` is the state dict of
  ``SGD([{params: backbone.parameters()}, {params: partial_fc.parameters()}], momentum=0.9)``: group 0
  indexes the backbone's parameters in ``parameters()`` order (frozen ones included), group 1 the shard's
  one parameter; ``state[i]['momentum_buffer']`` is the momentum (absent for a parameter that never had a
  gradient, e.g. iresnet's ``features.weight``). PartialFC v1 (train.py, until April 2023) had a sampled
  ``weight_activated`` parameter whose momentum is not per class: it is not carried then.
* Jan .. May 2022: ``softmax_fc_gpu_{r}.pt`` = PartialFC's state dict ``{weight: [n_r, D]}`` (no momentum),
  the backbone in ``model_epoch_{n}.pt`` (one per epoch) and/or ``model.pt``.
* 2021: ``backbone.pth`` and raw tensors ``rank_{r}_softmax_weight.pt`` / ``rank_{r}_softmax_weight_mom.pt``
  [n_r, D] (``rank:{r}_...`` in the first version).

Every file is read with ``torch.load(weights_only=True)`` (:func:`fr_dist.checkpoint.layout.safe_load`):
a file that carries code (``torch.save(model)``, a pickled object) is refused, never run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch

from fr_dist.checkpoint.layout import safe_load
from fr_dist.convert import ImportedRun
from fr_dist.errors import CheckpointError
from fr_dist.sharding import class_range

__all__ = ["read_arcface_torch", "diagnose_rows", "parameter_names", "momentum_by_name"]

_V2_KEYS = ("epoch", "global_step", "state_dict_backbone", "state_dict_softmax_fc", "state_optimizer")
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
_PATTERNS = {
    "train_v2": re.compile(r"^checkpoint_gpu_(\d+)\.pt$"),
    "2022": re.compile(r"^softmax_fc_gpu_(\d+)\.pt$"),
    "2021": re.compile(r"^rank[_:](\d+)_softmax_weight\.pt$"),
}


# ----------------------------------------------------------------------------- small helpers


def _load(path: Path, what: str):
    """safe_load, with a file that carries code said as such (the message names the refused global)."""
    try:
        return safe_load(path, mmap=True)
    except CheckpointError as e:
        text = str(e)
        if "Unsupported global" in text or "WeightsUnpickler" in text or "weights_only" in text.lower():
            glob = re.search(r"GLOBAL ([\w.]+)", text)
            name = f" (it pickles {glob.group(1)})" if glob else ""
            raise CheckpointError(
                f"{path}: this {what} carries code or Python objects{name}, not only tensors: refused "
                "(torch.load(weights_only=True) fails; fr_dist never unpickles code from a checkpoint). "
                "Typical cause: torch.save(model) instead of torch.save(model.state_dict()); if you trust "
                "the file, re-save its tensors with torch.save(...state_dict()) and convert that"
            ) from None
        raise


def _describe(obj) -> str:
    if torch.is_tensor(obj):
        return f"a tensor {list(obj.shape)}"
    if isinstance(obj, dict):
        keys = list(obj)[:6]
        more = f", ... ({len(obj)} keys)" if len(obj) > 6 else ""
        return f"a dict with keys {', '.join(map(str, keys))}{more}"
    return f"a {type(obj).__name__}"


def _strip_module(sd: dict) -> dict:
    return {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items()}


def _expect_state_dict(obj, path: Path, what: str) -> dict:
    """A backbone state dict {name: tensor}; anything else is 'not what its name says'."""
    if isinstance(obj, dict) and set(_V2_KEYS) <= set(obj):
        raise CheckpointError(
            f"{path}: expected {what} (a backbone state dict), found a train_v2 checkpoint "
            f"({_describe(obj)}): name it checkpoint_gpu_<rank>.pt"
        )
    if not (isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values())):
        raise CheckpointError(
            f"{path}: expected {what} (a backbone state dict of tensors), found {_describe(obj)}"
        )
    if set(obj) == {"weight"} and obj["weight"].dim() == 2:
        raise CheckpointError(
            f"{path}: expected {what} (a backbone state dict), found a single [{obj['weight'].shape[0]}, "
            f"{obj['weight'].shape[1]}] 'weight': a classifier shard (softmax_fc_gpu_<rank>.pt), not a backbone"
        )
    return _strip_module(obj)


def _expect_rows(obj, path: Path, what: str) -> torch.Tensor:
    if isinstance(obj, dict) and "weight" in obj and torch.is_tensor(obj["weight"]):
        obj = obj["weight"]
    if not (torch.is_tensor(obj) and obj.dim() == 2 and obj.is_floating_point()):
        raise CheckpointError(
            f"{path}: expected {what} (classifier rows [num_local, D]), found {_describe(obj)}"
        )
    return obj


def _rank_files(folder: Path, layout: str) -> dict[int, Path]:
    pat = _PATTERNS[layout]
    out = {}
    for p in folder.iterdir():
        m = pat.match(p.name)
        if m:
            out[int(m.group(1))] = p
    return dict(sorted(out.items()))


def parameter_names(state_dict: dict, model: Optional[torch.nn.Module] = None) -> list[str]:
    """The backbone's parameters in ``parameters()`` order (what an optimizer's param indices count):
    ``model``'s named parameters (frozen ones included) when given, else the state dict's keys less the
    BatchNorm buffers (a state dict lists a module's parameters before its buffers, module by module)."""
    if model is not None:
        return [n for n, _ in model.named_parameters()]
    return [k for k in state_dict if not k.endswith(_BUFFER_SUFFIXES)]


# ----------------------------------------------------------------------------- row accounting


def diagnose_rows(counts: dict[int, int], num_classes: Optional[int], files: str = "shards") -> Optional[str]:
    """Why the shards ``{rank: rows}`` are not insightface's split of ``num_classes`` classes (None: they are;
    without ``num_classes``: whether they are a complete split of their own total)."""
    world = max(counts) + 1
    total = sum(counts.values())
    missing = [r for r in range(world) if r not in counts]
    found = ", ".join(str(r) for r in counts)
    if missing:
        where = ""
        if num_classes:
            spans = [class_range(num_classes, r, world) for r in missing]
            ranges = ", ".join(f"[{s}, {s + n})" for s, n in spans)
            where = f" (with num_classes={num_classes}: classes {ranges})"
        return (
            f"{files}: rank(s) {', '.join(map(str, missing))} of W={world} missing (found ranks {found}, "
            f"{total} rows){where}: their rows are not in the source; copy every rank's file"
        )
    k = num_classes or total
    expect = {r: class_range(k, r, world)[1] for r in range(world)}
    if total == k and counts == expect:
        return None
    if num_classes is None or total == num_classes:
        bad = [
            f"rank {r}: {counts[r]} rows, expected {expect[r]}"
            for r in range(world)
            if counts[r] != expect[r]
        ]
        return (
            f"{files}: {total} rows, but not insightface's split of {k} classes over {world} ranks "
            f"({'; '.join(bad[:4])}): the class order of the rows cannot be recovered"
        )
    own = {r: class_range(total, r, world)[1] for r in range(world)}
    if total < num_classes:  # the last ranks' files missing? (the first ranks hold a W' split of K)
        for w2 in range(world + 1, 4 * world + 65):
            if all(counts[r] == class_range(num_classes, r, w2)[1] for r in range(world)):
                return (
                    f"{files}: {total} rows for {num_classes} classes: the files of ranks {world}..{w2 - 1} "
                    f"of a W={w2} run are missing (classes [{total}, {num_classes})); copy every rank's file"
                )
    if counts == own:
        return (
            f"{files}: {total} rows for num_classes={num_classes}: every one of the {world} shards has the size "
            f"insightface's split gives for {total} classes on {world} ranks, none the size for {num_classes}: no "
            f"rank's file is missing, the classifier was trained with num_classes={total}. Its row i is class i of "
            f"a {total}-class list, not of this {num_classes}-class dataset (this is insightface issue #1758 / "
            f"#2056: the released MS1MV3 shards hold 91,180 rows for the 93,431 classes of MS1MV3), so the rows "
            f"cannot classify this data. Use the dataset the rows were trained on (num_classes={total}), or "
            f"convert the backbone alone (keep only the backbone file in a folder) and train a new head"
        )
    bad = [
        f"rank {r}: {counts[r]} rows, expected {class_range(num_classes, r, world)[1]}" for r in range(world)
    ]
    return (
        f"{files}: {total} rows for num_classes={num_classes} ({'; '.join(bad[:4])}): not a split of "
        f"{num_classes} classes over {world} ranks"
    )


def _check_rows(counts: dict[int, int], dims: dict[int, int], num_classes, embedding_size, files: str):
    if len(set(dims.values())) > 1:
        raise CheckpointError(
            f"{files}: the shards have different embedding sizes {sorted(set(dims.values()))}"
        )
    d = next(iter(dims.values()))
    if embedding_size is not None and d != embedding_size:
        raise CheckpointError(
            f"{files}: rows are {d}-d, the config has model.embedding_size={embedding_size}: refusing "
            f"(the backbone and the head would not fit); set model.embedding_size={d}"
        )
    why = diagnose_rows(counts, num_classes, files)
    if why is not None:
        raise CheckpointError(why)


# ----------------------------------------------------------------------------- readers


def momentum_by_name(state: dict, indices: list, names: list[str], params: dict, notes: list, where: str):
    """{name: momentum} of an optimizer group's ``indices`` mapped onto ``names``; None (with a note) when
    the group does not line up with the backbone's parameters."""
    if len(indices) != len(names):
        notes.append(
            f"backbone momentum NOT carried: {where} indexes {len(indices)} backbone parameters, the backbone "
            f"has {len(names)}"
        )
        return None
    out, kinds = {}, set()
    for i, name in zip(indices, names):
        st = state.get(i, state.get(str(i), {}))
        kinds |= set(st)
        buf = st.get("momentum_buffer")
        if buf is None:
            continue
        if tuple(buf.shape) != tuple(params[name].shape):
            notes.append(
                f"backbone momentum NOT carried: {where}'s buffer {i} is {list(buf.shape)}, parameter "
                f"{name} is {list(params[name].shape)} (the order does not match this backbone)"
            )
            return None
        out[name] = buf.float().clone()
    if not out:
        what = "AdamW moments (fr_dist carries SGD momentum only)" if "exp_avg" in kinds else "no momentum"
        notes.append(f"backbone momentum NOT carried: {where} holds {what}")
        return None
    return out


def _read_train_v2(folder: Path, files: dict, num_classes, embedding_size, param_names, notes) -> ImportedRun:
    counts, dims, rows, moms, meta = {}, {}, {}, {}, {}
    backbone, bb_mom = None, None
    for r, path in files.items():
        blob = _load(path, "train_v2 checkpoint")
        if not (isinstance(blob, dict) and set(_V2_KEYS) <= set(blob)):
            raise CheckpointError(
                f"{path}: not an arcface_torch train_v2 checkpoint (expected a dict with keys "
                f"{', '.join(_V2_KEYS)}, state_lr_scheduler); found {_describe(blob)}"
            )
        w = _expect_rows(blob["state_dict_softmax_fc"], path, "state_dict_softmax_fc")
        counts[r], dims[r], rows[r] = w.shape[0], w.shape[1], w
        meta[r] = (int(blob["epoch"]), int(blob["global_step"]))
        opt = blob["state_optimizer"]
        groups = opt.get("param_groups", []) if isinstance(opt, dict) else []
        if len(groups) == 2 and len(groups[1]["params"]) == 1:
            st = opt["state"].get(groups[1]["params"][0], {})
            buf = st.get("momentum_buffer")
            if buf is not None and tuple(buf.shape) == tuple(w.shape):
                moms[r] = buf
            elif buf is not None:
                notes.append(
                    f"{path.name}: the classifier momentum is {list(buf.shape)} for {list(w.shape)} rows "
                    "(PartialFC v1's sampled rows): row momentum NOT carried"
                )
        if r == min(files):
            backbone = _expect_state_dict(blob["state_dict_backbone"], path, "state_dict_backbone")
            if len(groups) == 2:
                names = param_names or parameter_names(backbone)
                bb_mom = momentum_by_name(
                    opt["state"], groups[0]["params"], names, backbone, notes, f"{path.name} state_optimizer"
                )
            else:
                notes.append(
                    f"{path.name}: state_optimizer has {len(groups)} param groups (train_v2: 2): momentum NOT carried"
                )
            sch = blob.get("state_lr_scheduler")
            if isinstance(sch, dict) and "last_epoch" in sch:
                notes.append(
                    f"LR schedule: arcface_torch's was at step {sch['last_epoch']}; fr_dist continues its own "
                    "config's schedule (train.lr, warmup, poly) from the carried step"
                )
        del blob
    _check_rows(counts, dims, num_classes, embedding_size, f"{folder}/checkpoint_gpu_*.pt")
    if len(set(meta.values())) > 1:
        notes.append(f"ranks disagree on (epoch, global_step): {meta}; using rank 0's")
    epoch, step = meta[min(meta)]
    weight = torch.cat([rows[r] for r in sorted(rows)]).float()
    mom = None
    if len(moms) == len(rows):
        mom = torch.cat([moms[r] for r in sorted(moms)]).float()
    elif not moms:
        notes.append("row momentum: none in the source (it starts at zero)")
    elif not any("row momentum" in n for n in notes):
        notes.append(f"row momentum NOT carried: found for ranks {sorted(moms)} of {sorted(rows)} only")
    return ImportedRun(
        source=f"arcface_torch train_v2 checkpoint (W={len(files)}) {folder}",
        backbone=backbone,
        weight=weight,
        head_kind="softmax",
        backbone_momentum=bb_mom,
        weight_momentum=mom,
        step=step,
        epoch=epoch,
        world_size=max(files) + 1,
        notes=notes,
    )


def _read_shards(folder: Path, files: dict, what: str, num_classes, embedding_size, mom_files=None):
    counts, dims, rows, moms = {}, {}, {}, {}
    for r, path in files.items():
        w = _expect_rows(_load(path, what), path, what)
        counts[r], dims[r], rows[r] = w.shape[0], w.shape[1], w
        m = (mom_files or {}).get(r)
        if m is not None:
            buf = _expect_rows(_load(m, "row momentum"), m, "row momentum")
            if buf.shape != w.shape:
                raise CheckpointError(
                    f"{m}: momentum {list(buf.shape)} for {list(w.shape)} rows in {path.name}"
                )
            moms[r] = buf
    _check_rows(counts, dims, num_classes, embedding_size, f"{folder}/{what}")
    weight = torch.cat([rows[r] for r in sorted(rows)]).float()
    mom = torch.cat([moms[r] for r in sorted(moms)]).float() if moms and len(moms) == len(rows) else None
    return weight, mom, len(moms)


def read_arcface_torch(
    path,
    num_classes: Optional[int] = None,
    embedding_size: Optional[int] = None,
    param_names: Optional[list[str]] = None,
) -> ImportedRun:
    """Read an arcface_torch output folder (any layout, any source world size) into an :class:`ImportedRun`.

    ``num_classes`` / ``embedding_size``: what the target config has (refused when the rows differ);
    ``param_names``: the backbone's parameters in ``parameters()`` order (see :func:`parameter_names`)
    when the state dict's own order is not to be trusted. Raises :class:`CheckpointError`.
    """
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    if not folder.is_dir():
        raise CheckpointError(f"{path}: no such folder (give arcface_torch's output folder, cfg.output)")
    notes: list[str] = []
    found = {name: _rank_files(folder, name) for name in _PATTERNS}
    present = [n for n, f in found.items() if f]
    if len(present) > 1:
        notes.append(
            f"{folder} holds several arcface_torch layouts ({', '.join(present)}): reading the newest, {present[0]}"
        )
    if found["train_v2"]:
        return _read_train_v2(folder, found["train_v2"], num_classes, embedding_size, param_names, notes)
    if found["2022"]:
        epochs = {}
        for p in folder.glob("model_epoch_*.pt"):
            m = re.match(r"^model_epoch_(\d+)\.pt$", p.name)
            if m:
                epochs[int(m.group(1))] = p
        epoch = 0
        if epochs:
            epoch = max(epochs)
            bb_path = epochs[epoch]
        elif (folder / "model.pt").is_file():
            bb_path = folder / "model.pt"
        else:
            raise CheckpointError(
                f"{folder}: softmax_fc_gpu_*.pt without a backbone (model_epoch_<n>.pt or model.pt)"
            )
        backbone = _expect_state_dict(_load(bb_path, "backbone"), bb_path, bb_path.name)
        weight, _, _ = _read_shards(folder, found["2022"], "softmax_fc_gpu_*.pt", num_classes, embedding_size)
        notes.append(
            f"backbone from {bb_path.name}; this layout saved no optimizer state and no step: momentum starts at "
            f"zero, the step at 0" + (f", the epoch at {epoch}" if epoch else "")
        )
        return ImportedRun(
            source=f"arcface_torch 2022 softmax_fc_gpu (W={len(found['2022'])}) {folder}",
            backbone=backbone,
            weight=weight,
            head_kind="softmax",
            epoch=epoch,
            world_size=max(found["2022"]) + 1,
            notes=notes,
        )
    if found["2021"]:
        bb_path = folder / "backbone.pth"
        if not bb_path.is_file():
            raise CheckpointError(f"{folder}: rank_<r>_softmax_weight.pt without backbone.pth")
        backbone = _expect_state_dict(_load(bb_path, "backbone"), bb_path, "backbone.pth")
        moms = {}
        for r, p in found["2021"].items():
            m = p.with_name(p.name.replace("_softmax_weight.pt", "_softmax_weight_mom.pt"))
            if m.is_file():
                moms[r] = m
        weight, mom, n_mom = _read_shards(
            folder, found["2021"], "rank_*_softmax_weight.pt", num_classes, embedding_size, moms
        )
        if mom is None:
            notes.append(
                f"row momentum NOT carried: rank_<r>_softmax_weight_mom.pt found for {n_mom} of {len(found['2021'])} ranks"
            )
        notes.append("this layout saved no backbone momentum and no step: both start at zero")
        return ImportedRun(
            source=f"arcface_torch 2021 rank_<r>_softmax_weight (W={len(found['2021'])}) {folder}",
            backbone=backbone,
            weight=weight,
            head_kind="softmax",
            weight_momentum=mom,
            world_size=max(found["2021"]) + 1,
            notes=notes,
        )
    listing = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "nothing"
    raise CheckpointError(
        f"{folder}: no arcface_torch classifier files (checkpoint_gpu_<r>.pt, softmax_fc_gpu_<r>.pt or "
        f"rank_<r>_softmax_weight.pt); it holds {listing}"
    )
