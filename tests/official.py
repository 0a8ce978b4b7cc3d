"""The official-code vectors of tests/golden/<loss>_official.npz (tools/make_loss_vectors.py) replayed by
fr_dist's sharded heads: the same global batches, on W gloo ranks, one head per (loss, case).

Used by tests/dist/test_official_losses.py (W = 1..4, uneven shards, an empty shard, two consecutive
batches for stateful losses) and by the losses' own tests (:func:`load`, :func:`build_head`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from fr_dist import comm
from fr_dist.heads import create_head

GOLDEN = Path(__file__).resolve().parent / "golden"


def available() -> list[str]:
    """Losses with an official archive, sorted."""
    return sorted(p.name[: -len("_official.npz")] for p in GOLDEN.glob("*_official.npz"))


def load(name: str) -> tuple[dict, dict]:
    """(arrays as float64 / int64 tensors, meta) of ``<name>_official.npz``."""
    with np.load(GOLDEN / f"{name}_official.npz") as z:
        meta = json.loads(str(z["meta"]))
        arrays = {k: torch.from_numpy(np.array(z[k])) for k in z.files if k != "meta"}
    return arrays, meta


def build_head(name: str, meta: dict, arrays: dict, case: str, process_group=None):
    """The fr_dist head of ``name`` with the archive's hyper-parameters and case ``case``'s weight (and bias)."""
    K, Dm = arrays[f"{case}/W"].shape
    head = create_head(name, embedding_size=Dm, num_classes=K, process_group=process_group, **meta["hp"])
    head = head.double()
    head.load_full_weight(arrays[f"{case}/W"])
    if f"{case}/b" in arrays:
        with torch.no_grad():
            head.bias.copy_(arrays[f"{case}/b"].reshape(head.bias.shape))
    return head


def replay(rank: int, world: int, name: str, case: str, arrays: dict, meta: dict, group=None) -> list[dict]:
    """Every batch of ``case`` through one head on this rank: per batch the loss, this rank's dL/dx and
    dL/dW rows, dL/db, the state buffers and the collectives counted (comm_stats)."""
    head = build_head(name, meta, arrays, case, group)
    N = arrays[f"{case}/x0"].shape[0]
    B = N // world
    out = []
    for t in range(batches(meta, case)):
        x_all, y_all = arrays[f"{case}/x{t}"], arrays[f"{case}/y{t}"]  # [N, D], [N]
        x = x_all[rank * B : (rank + 1) * B].clone().requires_grad_(True)  # [B, D] this rank's rows
        comm.reset_comm_stats()
        loss = head(x, y_all[rank * B : (rank + 1) * B])
        loss.backward()
        stats = comm.comm_stats()
        bias = getattr(head, "bias", None)
        out.append(
            dict(
                loss=loss.detach().clone(),
                dx=x.grad.clone(),
                dW=head.weight.grad.clone() if head.weight.grad is not None else torch.zeros(0, x.shape[1]),
                db=bias.grad.clone() if bias is not None and bias.grad is not None else None,
                state={k: v.clone() for k, v in head.state_buffers().items()},
                stats=stats,
                class_start=head.class_start,
                num_local=head.num_local,
            )
        )
        head.zero_grad(set_to_none=True)
    out[-1]["shard"] = head.shard_state()  # after the last batch: what a checkpoint keeps
    return out


def close(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float = 1e-6) -> None:
    """Within ``rtol`` relative to the reference array's scale (max |want|), elementwise."""
    want = want.to(got.dtype)
    scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * max(scale, 1e-300), msg=what)


def cases(meta: dict) -> dict[str, dict]:
    """Every case of an archive -> the hyper-parameters it differs by (its ``variants``' ``hp``; {} else)."""
    out = {c: {} for c in meta["cases"]}
    out.update({c: v.get("hp", {}) for c, v in meta.get("variants", {}).items()})
    return out


def batches(meta: dict, case: str) -> int:
    return (meta["cases"].get(case) or meta["variants"][case])["batches"]


def check_replay(per_rank: list[list[dict]], arrays: dict, meta: dict, case: str, tag: str) -> None:
    """The replays of every rank (:func:`replay`, rank order) against case ``case`` of the archive: the loss
    on every rank, dL/dx and dL/dW concatenated over the ranks, dL/db and the state buffers on every rank."""
    for t in range(batches(meta, case)):
        bt = f"{tag} batch {t}"
        for r, rep in enumerate(per_rank):
            close(rep[t]["loss"], arrays[f"{case}/loss{t}"], f"{bt} loss (rank {r})")
        close(torch.cat([p[t]["dx"] for p in per_rank]), arrays[f"{case}/dx{t}"], f"{bt} dL/dx")
        close(torch.cat([p[t]["dW"] for p in per_rank]), arrays[f"{case}/dW{t}"], f"{bt} dL/dW")
        if f"{case}/db{t}" in arrays:
            for r, rep in enumerate(per_rank):
                close(rep[t]["db"].reshape(()), arrays[f"{case}/db{t}"].reshape(()), f"{bt} dL/db (rank {r})")
        prefix = f"{case}/state{t}/"
        names = {k[len(prefix) :] for k in arrays if k.startswith(prefix)}
        for r, rep in enumerate(per_rank):
            assert set(rep[t]["state"]) == names, f"{bt}: state buffers (rank {r})"
            for s in names:
                close(
                    rep[t]["state"][s].reshape(-1),
                    arrays[prefix + s].reshape(-1),
                    f"{bt} state {s} (rank {r})",
                )
