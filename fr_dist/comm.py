"""Named collectives with an explicit process group, autograd pairs, and per-kind call/byte counters.

Every collective fr_dist issues goes through this module, so benchmarks and tests can read
exactly what one training step sends (:func:`comm_stats`). Counters record, per kind
(``all_gather``, ``reduce_scatter``, ``all_reduce``, ``broadcast``) and per name:

* ``calls``      number of collective launches,
* ``bytes``      size of the logical tensor (the gathered output / the scattered input /
                 the reduced tensor), in bytes,
* ``wire_bytes`` what one rank sends with a ring algorithm: ``(W-1)/W * bytes`` for gather
                 and scatter, ``2 (W-1)/W * bytes`` for all-reduce (the NCCL-tests "bus" volume).

``group=None`` means the default group when one is initialised, else a single process; with
a single process every collective is the identity and nothing is counted.

Tensors made only to be sent (flags, the resume step, the shape handshake) are created on
:func:`device_of` the group: NCCL refuses CPU tensors ("No backend type associated with device
type cpu"), gloo takes CPU tensors.

Autograd pairs (Megatron's mapping names):

=========================  =====================  ==========================
function                   forward                backward
=========================  =====================  ==========================
``gather_batch_with_labels`` all_gather (dim 0)   reduce_scatter (sum) * s
``reduce_from_shards``     all_reduce (sum)       identity
``copy_to_shards``         identity               all_reduce (sum)
=========================  =====================  ==========================
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections import defaultdict
from typing import Optional

import torch
import torch.distributed as dist

from fr_dist.errors import CollectiveError, CollectiveTimeout

__all__ = [
    "resolve_group",
    "world_info",
    "device_of",
    "comm_stats",
    "reset_comm_stats",
    "all_gather",
    "reduce_scatter",
    "all_reduce",
    "broadcast",
    "reduce_from_shards",
    "copy_to_shards",
    "gather_batch_with_labels",
    "check_batch_consistency",
    "barrier",
    "CollectiveError",
    "CollectiveTimeout",
    "set_timeout_info",
    "translate_failure",
]

KINDS = ("all_gather", "reduce_scatter", "all_reduce", "broadcast")

_lock = threading.Lock()
_stats: dict = defaultdict(lambda: {"calls": 0, "bytes": 0, "wire_bytes": 0})


def resolve_group(group: Optional[dist.ProcessGroup]) -> Optional[dist.ProcessGroup]:
    """``None`` -> the default group if initialised, else ``None`` (single process)."""
    if group is not None:
        return group
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


def world_info(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    """(rank, world_size) in ``group``; (0, 1) without a process group."""
    group = resolve_group(group)
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def device_of(group: Optional[dist.ProcessGroup] = None) -> torch.device:
    """The device a collective's tensors must live on in ``group``: this rank's CUDA device under
    NCCL (the one the runtime chose with ``torch.cuda.set_device``), else (gloo, no group) the CPU.

    Create every tensor that exists only to travel through a collective with
    ``device=comm.device_of(group)``; a tensor made without ``device=`` is on the CPU.
    """
    group = resolve_group(group)
    if group is None or "nccl" not in str(dist.get_backend(group)).lower():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _record(kind: str, name: str, nbytes: int, world: int) -> None:
    factor = {"all_reduce": 2.0 * (world - 1) / world}.get(kind, (world - 1) / world)
    with _lock:
        for key in (kind, f"{kind}/{name}"):
            s = _stats[key]
            s["calls"] += 1
            s["bytes"] += int(nbytes)
            s["wire_bytes"] += int(round(nbytes * factor))


def comm_stats() -> dict:
    """Snapshot ``{kind or kind/name: {calls, bytes, wire_bytes}}`` (all four kinds always present)."""
    with _lock:
        out = {k: dict(v) for k, v in _stats.items()}
    for kind in KINDS:
        out.setdefault(kind, {"calls": 0, "bytes": 0, "wire_bytes": 0})
    return out


def reset_comm_stats() -> None:
    with _lock:
        _stats.clear()


# torch >= 2.10 renamed the tensor-in/tensor-out collectives; older releases only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", getattr(dist, "all_gather_into_tensor", None))
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", getattr(dist, "reduce_scatter_tensor", None))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ----------------------------------------------------------------------------- failures


_timeout_info = {"seconds": None, "key": "dist.timeout_s"}


def set_timeout_info(seconds: Optional[float], key: str = "dist.timeout_s") -> None:
    """Record the process-group timeout and its config key for error messages (runtime calls this)."""
    _timeout_info.update(seconds=seconds, key=key)


def translate_failure(e: BaseException, kind: str, name: str, group=None) -> CollectiveError:
    """Public form of :func:`_failure` for collectives issued outside this module (DDP, DeepSpeed)."""
    return _failure(e, kind, name, resolve_group(group))


# what gloo and NCCL say when a collective ran past the process-group timeout: gloo "Timed out
# waiting 3000ms for recv", NCCL's watchdog "Watchdog caught collective operation timeout: WorkNCCL(
# ...) ran for N milliseconds before timing out", NCCL's blocking wait "... timed out in blocking wait"
_TIMEOUT_WORDS = ("timed out", "timeout", "timing out")
_NCCL_WORK_TIMEOUT = re.compile(r"timeout\(ms\)=\d+")  # in every WorkNCCL(...) description, failed or not


def _error_text(e: BaseException) -> tuple[str, str]:
    """(whole message without c10's C++ backtrace, its last line) of a gloo / NCCL error."""
    # c10 appends its C++ backtrace: "Exception raised from <function> at <file>", "frame #0: ..."
    full = str(e).split("Exception raised from")[0].strip()
    lines = [line.strip() for line in full.splitlines() if line.strip()]
    return full, (lines[-1] if lines else type(e).__name__)


def _failure(e: BaseException, kind: str, name: str, group) -> CollectiveError:
    """Translate gloo/NCCL's error into one that names the collective, the group and the timeout key."""
    rank, world = world_info(group)
    others = [r for r in range(world) if r != rank]
    who = f"rank {others[0]}" if len(others) == 1 else f"one of ranks {others}"
    full, text = _error_text(e)
    secs, key = _timeout_info["seconds"], _timeout_info["key"]
    where = f"collective {kind} '{name}' (group of {world} ranks, this is rank {rank})"
    low = _NCCL_WORK_TIMEOUT.sub("", full.lower())
    if any(w in low for w in _TIMEOUT_WORDS):
        limit = f"{secs:g} s" if secs else "the process-group timeout"
        return CollectiveTimeout(
            f"{where} timed out after {limit}: {who} did not answer (hung, stopped or unreachable; "
            f"see its log). The limit is the config key {key}. [{text}]"
        )
    if any(w in low for w in ("connection", "closed", "reset", "broken pipe", "peer")):
        return CollectiveError(
            f"{where} failed: {who} closed the connection (it died or exited; see its log for the "
            f"cause). [{text}]"
        )
    return CollectiveError(f"{where} failed: {text}")


@contextlib.contextmanager
def _guard(kind: str, name: str, group):
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as e:  # DistBackendError / DistNetworkError are RuntimeErrors
        raise _failure(e, kind, name, group) from e


def barrier(group=None, name: str = "barrier") -> None:
    """``dist.barrier`` with failures translated (:class:`CollectiveTimeout`); no-op without a group."""
    group = resolve_group(group)
    if group is None:
        return
    with _guard("barrier", name, group):
        dist.barrier(group=group)


# ----------------------------------------------------------------------------- raw collectives


def all_gather(x: torch.Tensor, group=None, name: str = "tensor") -> torch.Tensor:
    """Concatenate ``x`` [B, ...] of every rank in rank order -> [W*B, ...]. Equal B required."""
    group = resolve_group(group)
    if group is None:
        return x
    world = dist.get_world_size(group)
    x = x.contiguous()
    out = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    with _guard("all_gather", name, group):
        _all_gather_single(out, x, group=group)
    _record("all_gather", name, _nbytes(out), world)
    return out


def reduce_scatter(x: torch.Tensor, group=None, name: str = "tensor") -> torch.Tensor:
    """Sum ``x`` [W*B, ...] over ranks and return this rank's rows [B, ...] (rank-ordered blocks)."""
    group = resolve_group(group)
    if group is None:
        return x
    world = dist.get_world_size(group)
    if x.shape[0] % world:
        raise ValueError(f"reduce_scatter: dim 0 ({x.shape[0]}) not divisible by world size {world}")
    x = x.contiguous()
    out = torch.empty((x.shape[0] // world,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    with _guard("reduce_scatter", name, group):
        _reduce_scatter_single(out, x, op=dist.ReduceOp.SUM, group=group)
    _record("reduce_scatter", name, _nbytes(x), world)
    return out


_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def all_reduce(x: torch.Tensor, op: str = "sum", group=None, name: str = "tensor") -> torch.Tensor:
    """All-reduce a copy of ``x`` (the caller's tensor is never modified)."""
    group = resolve_group(group)
    out = x.detach().clone()
    if group is None:
        return out
    world = dist.get_world_size(group)
    with _guard("all_reduce", name, group):
        dist.all_reduce(out, op=getattr(dist.ReduceOp, _OPS[op]), group=group)
    _record("all_reduce", name, _nbytes(out), world)
    return out


def broadcast(x: torch.Tensor, src: int = 0, group=None, name: str = "tensor") -> torch.Tensor:
    """Return rank ``src``'s ``x`` on every rank (a copy; the caller's tensor is untouched)."""
    group = resolve_group(group)
    if group is None:
        return x
    out = x.detach().clone().contiguous()
    with _guard("broadcast", name, group):
        dist.broadcast(out, src=dist.get_global_rank(group, src), group=group)
    _record("broadcast", name, _nbytes(out), dist.get_world_size(group))
    return out


# ----------------------------------------------------------------------------- autograd pairs


class _ReduceFromShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, name):
        return all_reduce(x, "sum", group, name=name)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def reduce_from_shards(x: torch.Tensor, group=None, name: str = "loss") -> torch.Tensor:
    """Sum of per-shard partial values (forward all-reduce); backward identity."""
    group = resolve_group(group)
    if group is None:
        return x
    return _ReduceFromShards.apply(x, group, name)


class _CopyToShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, name):
        ctx.group, ctx.name = group, name
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad, "sum", ctx.group, name=f"grad_{ctx.name}"), None, None


def copy_to_shards(x: torch.Tensor, group=None, name: str = "param") -> torch.Tensor:
    """Use a replicated tensor in per-shard math: forward identity, backward all-reduce (sum)."""
    group = resolve_group(group)
    if group is None:
        return x
    return _CopyToShards.apply(x, group, name)


def _label_cols(dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    if 8 % size:
        raise TypeError(f"cannot pack int64 labels into {dtype} columns")
    return 8 // size


class _GatherBatchWithLabels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, labels, group, grad_scale, name):
        ctx.group, ctx.grad_scale, ctx.name = group, grad_scale, name
        B, D = x.shape
        k = _label_cols(x.dtype)
        # int64 labels travel bit-exactly as k extra columns of x's dtype: [B] -> [B, k]
        lab = labels.to(torch.int64).contiguous().view(x.dtype).reshape(B, k)
        packed = torch.cat([x, lab], dim=1)  # [B, D + k]
        out = all_gather(packed, group, name=name)  # [W*B, D + k]
        x_all = out[:, :D].contiguous()  # [W*B, D]
        labels_all = out[:, D:].contiguous().view(torch.int64).reshape(-1)  # [W*B]
        ctx.mark_non_differentiable(labels_all)
        return x_all, labels_all

    @staticmethod
    def backward(ctx, grad_x, _grad_labels):
        g = reduce_scatter(grad_x, ctx.group, name=f"grad_{ctx.name}")  # [W*B, D] -> [B, D]
        if ctx.grad_scale != 1.0:
            g = g * ctx.grad_scale
        return g, None, None, None, None


def gather_batch_with_labels(
    x: torch.Tensor,
    labels: torch.Tensor,
    group=None,
    grad_scale: float = 1.0,
    name: str = "embeddings",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One all-gather of embeddings [B, D] and int64 labels [B] -> ([W*B, D], [W*B]).

    Backward reduce-scatters (sums) only the embedding gradient and multiplies it by
    ``grad_scale``: 1 gives exactly dL/dx of the global loss; the world size pre-compensates a
    data-parallel wrapper that averages gradients (DDP).
    """
    group = resolve_group(group)
    if group is None:
        x_out = x * grad_scale if grad_scale != 1.0 and x.requires_grad else x
        return x_out, labels.to(torch.int64)
    return _GatherBatchWithLabels.apply(x, labels, group, float(grad_scale), name)


_DTYPE_CODES = {
    torch.float32: 0,
    torch.float64: 1,
    torch.bfloat16: 2,
    torch.float16: 3,
}


def check_batch_consistency(x: torch.Tensor, group=None) -> None:
    """Tiny all-gather of (B, D, dtype) so mismatched batches raise instead of hanging/aborting.

    A mismatched ``all_gather_into_tensor`` aborts gloo with an enforce failure and hangs NCCL;
    this handshake (3 int64 per rank) names the offending ranks first.
    """
    group = resolve_group(group)
    if group is None:
        return
    code = _DTYPE_CODES.get(x.dtype, 9)
    shape = [x.shape[0], x.shape[1] if x.dim() > 1 else -1, code]
    meta = torch.tensor(shape, dtype=torch.int64, device=device_of(group))  # [3]
    allm = all_gather(meta.unsqueeze(0), group, name="meta").cpu()  # [W, 3]
    if (allm == allm[0]).all():
        return
    names = {v: str(k).replace("torch.", "") for k, v in _DTYPE_CODES.items()}
    desc = ", ".join(
        f"rank {r}: batch {int(b)}, dim {int(d)}, {names.get(int(c), 'other')}"
        for r, (b, d, c) in enumerate(allm.tolist())
    )
    raise ValueError(
        "embedding batches differ between ranks (every rank must pass the same local batch size, "
        f"embedding dimension and dtype; use drop_last or pad the last batch): {desc}"
    )
