"""The sharded classifier every head is: this rank's class rows, their world-size independent init, the
batch gather (and, through it, the embedding gradient's reduce-scatter), the re-sharding checkpoint state,
and what a head tells the trainer (:class:`OptimizerContract`, :meth:`ShardedClassifier.log_scalars`).

A head is this class plus a loss (heads/losses/): the binary family runs heads/binary.py's fused pass
(:class:`~fr_dist.heads.binary_head.BinaryHead`), the softmax family heads/softmax.py's Partial-FC path
(:class:`~fr_dist.heads.softmax.SoftmaxHead`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn

from fr_dist import comm
from fr_dist.errors import CheckpointError
from fr_dist.sharding import class_range, copy_rows

__all__ = [
    "OptimizerContract",
    "ShardedClassifier",
    "autocast_gemm_dtype",
    "bound_signature",
    "init_weight_rows",
    "resolve_loss",
]

# Rows are generated in fixed blocks, each from its own seed, so a rank can draw exactly its
# slice without materialising [K, D] (K may be 10^8), and every world size sees the same rows.
_INIT_BLOCK = 1 << 16


def init_weight_rows(
    start: int, count: int, dim: int, seed: int, std: float = 0.01, dtype=torch.float32
) -> torch.Tensor:
    """Rows [start, start + count) of the full N(0, std^2) weight defined by ``seed``."""
    out = torch.empty(count, dim, dtype=dtype)
    end = start + count
    block = start // _INIT_BLOCK
    while block * _INIT_BLOCK < end:
        b0 = block * _INIT_BLOCK
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + block)
        rows = torch.randn(_INIT_BLOCK, dim, generator=gen).mul_(std)  # [block, D]
        lo, hi = max(start, b0), min(end, b0 + _INIT_BLOCK)
        out[lo - start : hi - start] = rows[lo - b0 : hi - b0].to(dtype)
        block += 1
    return out


def autocast_gemm_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast gives a GEMM's operands on ``device`` here, or None when autocast is off: the
    heads' fused passes disable autocast inside and apply it to their GEMMs themselves."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def bound_signature(family_init, loss_cls: type) -> inspect.Signature:
    """The signature of a family head bound to ``loss_cls``: ``(embedding_size, num_classes, *, <the loss's
    hyper-parameters>, <the family's keywords>)``, the loss's defaults its own. What ``inspect.signature``,
    the config sections' defaults and the docs read of a registered head (which has no ``__init__`` of its
    own: the family's builds the loss from the keywords, :func:`resolve_loss`)."""
    fam = list(inspect.signature(family_init).parameters.values())[1:]  # without self
    lead, rest = fam[:2], [q for q in fam[2:] if q.name != "loss" and q.kind is not q.VAR_KEYWORD]
    hyper = [q.replace(kind=q.KEYWORD_ONLY) for q in inspect.signature(loss_cls).parameters.values()]
    return inspect.Signature(lead + hyper + [q.replace(kind=q.KEYWORD_ONLY) for q in rest])


def resolve_loss(head_cls: type, loss, loss_kwargs: dict):
    """The loss a family head runs: ``loss`` as given, or ``head_cls.loss_cls`` built from the keywords the
    head's own signature did not take (its hyper-parameters); a keyword neither takes is a TypeError."""
    if loss is not None:
        if loss_kwargs:
            raise TypeError(f"give the loss or its hyper-parameters, not both: {sorted(loss_kwargs)}")
        return loss
    names = set(inspect.signature(head_cls.loss_cls).parameters)
    unknown = sorted(k for k in loss_kwargs if k not in names)
    if unknown:
        raise TypeError(f"{head_cls.__name__} got unexpected keyword arguments {unknown}")
    return head_cls.loss_cls(**loss_kwargs)


@dataclass(frozen=True)
class OptimizerContract:
    """What a head asks of the trainer besides a ``torch.optim`` optimizer over its trainable parameters
    (always built, by ``build_head_optimizer``: all rows of an ordinary head, only SphereFace2's bias when the
    head updates its rows itself).

    ``row_optimizer``: the head updates rows inside its own pass; the trainer configures that update once
    (:meth:`ShardedClassifier.configure_row_optimizer`, from ``train.optimizer`` and the head's LR / WD) and
    sets its LR before every step (:meth:`ShardedClassifier.set_row_lr`). Such an update takes the loss as
    back-propagated once per optimizer step, unscaled: ``train.grad_accum=1``, no fp16 GradScaler.
    ``option``: the config key that asked for it (named in errors).
    """

    row_optimizer: bool = False
    option: str = ""


class ShardedClassifier(nn.Module):
    """Holds this rank's contiguous class shard ``[class_start, class_start + num_local)``.

    ``process_group=None`` means the default group if one is initialised when the head is
    built, else a single process. Subclasses implement ``forward(embeddings, labels)``.
    """

    loss_name = ""
    """The registry name of the head's loss (set by :func:`fr_dist.heads.registry.register_loss`)."""

    def __init_subclass__(cls, **kwargs):
        """A head that only binds a family to its ``loss_cls`` (no ``__init__`` of its own) gets the bound
        signature (:func:`bound_signature`)."""
        super().__init_subclass__(**kwargs)
        if "loss_cls" in cls.__dict__ and "__init__" not in cls.__dict__:
            cls.__signature__ = bound_signature(cls.__init__, cls.loss_cls)

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        process_group=None,
        seed: int = 0,
        init_std: float = 0.01,
        param_dtype: torch.dtype = torch.float32,
        embedding_grad_scale: float = 1.0,
        check_inputs: bool = True,
        check_finite: bool = True,
    ):
        super().__init__()
        if embedding_size < 1:
            raise ValueError(f"embedding_size must be >= 1, got {embedding_size}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.process_group = comm.resolve_group(process_group)
        self.rank, self.world_size = comm.world_info(self.process_group)
        self.embedding_size = int(embedding_size)
        self.num_classes = int(num_classes)
        self.class_start, self.num_local = class_range(num_classes, self.rank, self.world_size)
        self.embedding_grad_scale = float(embedding_grad_scale)
        """Multiplies the reduce-scattered embedding gradient. 1 gives the true dL/dx; pass the
        world size when a data-parallel wrapper averages backbone gradients (DDP, DeepSpeed)."""
        self.check_inputs = check_inputs
        """Validate shapes across ranks (one 3-int all-gather) and the label range."""
        self.check_finite = check_inputs and check_finite
        """Raise on NaN/inf embeddings. A trainer with its own non-finite-step guard turns this
        off so the step is skipped (and counted) instead of aborting."""
        self.weight = nn.Parameter(
            init_weight_rows(self.class_start, self.num_local, embedding_size, seed, init_std, param_dtype)
        )  # [n_r, D]
        self._state_buffers: set[str] = set()

    # ------------------------------------------------------------------ what the trainer asks
    def optimizer_contract(self) -> OptimizerContract:
        """What the trainer must build for this head (see :class:`OptimizerContract`)."""
        return OptimizerContract()

    def configure_row_optimizer(self, kind: str, **hparams) -> None:
        """Build the in-pass row optimizer of ``kind`` (``train.optimizer``: sgd | adamw) with ``hparams``
        (lr, momentum, nesterov, weight_decay, betas, eps; each kind takes its own)."""
        raise ValueError(
            f"{type(self).__name__} has no row optimizer: its optimizer_contract() asks for none"
        )

    def set_row_lr(self, lr: float) -> None:
        """The in-pass row optimizer's LR for the next step (the head schedule's); no-op without one."""

    def log_scalars(self) -> dict[str, float]:
        """Scalars of the head worth logging every log step (e.g. SphereFace2's bias)."""
        return {}

    def attach_loss(self, loss) -> None:
        """Hold ``loss`` and register its state (:meth:`register_state_buffer` for each of ``loss.state()``)."""
        self.loss = loss
        for name, value in loss.state().items():
            self.register_state_buffer(name, value)

    def register_state_buffer(self, name: str, tensor: torch.Tensor) -> None:
        """A replicated buffer (identical on every rank, e.g. a loss's EMA statistic updated from all-reduced
        sums): saved with the shard, restored from saved rank 0 on any world size, never split into rows."""
        self.register_buffer(name, tensor)
        self._state_buffers.add(name)

    def state_buffers(self) -> dict[str, torch.Tensor]:
        """The replicated state buffers by name (see :meth:`register_state_buffer`)."""
        return {n: b for n, b in self.named_buffers() if n in self._state_buffers}

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
            f"class_start={self.class_start}, num_local={self.num_local}, "
            f"rank={self.rank}/{self.world_size}"
        )

    @torch.no_grad()
    def load_full_weight(self, weight: torch.Tensor) -> None:
        """Load the full [K, D] class matrix and keep this rank's rows."""
        if tuple(weight.shape) != (self.num_classes, self.embedding_size):
            raise ValueError(
                f"load_full_weight: expected [{self.num_classes}, {self.embedding_size}] "
                f"(num_classes, embedding_size), got {list(weight.shape)}"
            )
        copy_rows(self.weight, self.class_start, weight, 0)

    # ------------------------------------------------------------------ checkpoint state
    def shard_state(self, optimizer=None) -> dict:
        """This shard as a world-size independent record: its class range, parameters (weight rows,
        replicated ones such as SphereFace2's bias), per-row buffers [num_local, ...] (fused-update
        momentum, fp32 master rows), replicated state buffers (a loss's statistics), ``optimizer``'s
        state for these parameters, sampling generator."""
        names = {id(p): n for n, p in self.named_parameters()}
        opt_state = {}
        for group in optimizer.param_groups if optimizer is not None else ():
            for p in group["params"]:
                if id(p) in names and p in optimizer.state:
                    opt_state[names[id(p)]] = {
                        k: (v.detach().cpu() if torch.is_tensor(v) else v)
                        for k, v in optimizer.state[p].items()
                    }
        return dict(
            class_start=self.class_start,
            num_local=self.num_local,
            num_classes=self.num_classes,
            embedding_size=self.embedding_size,
            world_size=self.world_size,
            params={n: p.detach().cpu() for n, p in self.named_parameters()},
            row_buffers={
                n: b.detach().cpu() for n, b in self.named_buffers() if n not in self._state_buffers
            },
            state_buffers={n: b.detach().cpu() for n, b in self.state_buffers().items()},
            optimizer_state=opt_state,
            generator=self.generator.get_state() if hasattr(self, "generator") else None,
        )

    @torch.no_grad()
    def load_resharded(self, shards, optimizer=None, source: str = "checkpoint") -> set:
        """Fill this rank's rows from :meth:`shard_state` records of any world size, in saved-rank order
        (an iterable: each is read once). Row-wise tensors go through :func:`sharding.copy_rows`;
        replicated parameters, state buffers and the replicated parameters' optimizer state come from
        saved rank 0; the sampling generator continues only on an unchanged world size. Returns the names
        of the loaded buffers.
        """
        params, loaded_buffers = dict(self.named_parameters()), set()
        buffers = {n: b for n, b in self.named_buffers() if n not in self._state_buffers}  # row-wise
        state = self.state_buffers()  # replicated
        loaded_state: dict = {}
        covered = 0
        for i, shard in enumerate(shards):
            for field, mine in (("num_classes", self.num_classes), ("embedding_size", self.embedding_size)):
                if shard[field] != mine:
                    raise CheckpointError(
                        f"{source} has {field}={shard[field]} but the config/model has {mine}; refusing "
                        f"to load (fr_dist never re-initialises silently): fix `{field}` or start a new run"
                    )
            start, n = shard["class_start"], shard["num_local"]
            if i == 0:  # replicated parameters (bias), state buffers and the parameters' optimizer state
                for name, v in shard["params"].items():
                    if name != "weight":
                        params[name].copy_(v)
                for name, v in shard.get("state_buffers", {}).items():
                    if name in state:
                        state[name].copy_(v)
                        loaded_buffers.add(name)
                for name, st in shard["optimizer_state"].items():
                    if name != "weight":
                        loaded_state[name] = {
                            k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()
                        }
            if i == self.rank and shard.get("world_size") == self.world_size:
                if shard.get("generator") is not None and hasattr(self, "generator"):
                    self.generator.set_state(shard["generator"])
            rows = copy_rows(self.weight, self.class_start, shard["params"]["weight"], start)
            if rows == 0:
                continue
            covered += rows
            for name, v in shard.get("row_buffers", {}).items():
                if name in buffers:
                    copy_rows(buffers[name], self.class_start, v, start)
                    loaded_buffers.add(name)
            tgt = loaded_state.setdefault("weight", {})
            for k, v in shard["optimizer_state"].get("weight", {}).items():
                if torch.is_tensor(v) and v.dim() == 2 and v.shape[0] == n:  # row-wise: [n, D]
                    buf = tgt.setdefault(
                        k, torch.zeros((self.num_local,) + tuple(v.shape[1:]), dtype=v.dtype)
                    )
                    copy_rows(buf, self.class_start, v, start)
                else:
                    tgt.setdefault(k, v.clone() if torch.is_tensor(v) else v)
        if covered != self.num_local:
            raise CheckpointError(
                f"{source}: saved shards cover {covered} of this rank's {self.num_local} classes"
            )
        if optimizer is not None:
            for name, st in loaded_state.items():
                if st:
                    p = params[name]
                    optimizer.state[p] = {
                        k: (v.to(p.device) if torch.is_tensor(v) and v.dim() > 0 else v)
                        for k, v in st.items()
                    }
        return loaded_buffers if self.num_local else set(buffers) | loaded_buffers

    def gather(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate the local batch and all-gather it: [B, D], [B] -> [W*B, D], [W*B] (int64)."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings must be [batch, {self.embedding_size}] (embedding_size), "
                f"got {list(embeddings.shape)}"
            )
        labels = labels.reshape(-1)
        if labels.shape[0] != embeddings.shape[0]:
            raise ValueError(
                f"labels have {labels.shape[0]} entries but embeddings have {embeddings.shape[0]} rows"
            )
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        if self.check_inputs:
            comm.check_batch_consistency(embeddings, self.process_group)
        x_all, labels_all = comm.gather_batch_with_labels(
            embeddings, labels, self.process_group, self.embedding_grad_scale
        )  # [W*B, D], [W*B]
        if self.check_inputs:
            bad = (labels_all < 0) | (labels_all >= self.num_classes)
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"label {int(labels_all[i])} outside [0, {self.num_classes}) (num_classes) "
                    f"at global batch row {i} (rank {i // embeddings.shape[0]})"
                )
        if self.check_finite:
            finite = torch.isfinite(x_all.detach()).all(dim=1)
            if not bool(finite.all()):
                i = int((~finite).nonzero()[0, 0])
                raise FloatingPointError(
                    f"non-finite (NaN/inf) embedding at global batch row {i} "
                    f"(rank {i // embeddings.shape[0]}): check the backbone/learning rate"
                )
        return x_all, labels_all

    def local_targets(self, labels_all: torch.Tensor) -> torch.Tensor:
        """Global labels [N] -> column of the target in this shard, -1 where not here."""
        local = labels_all - self.class_start
        here = (local >= 0) & (local < self.num_local)
        return torch.where(here, local, torch.full_like(local, -1))
