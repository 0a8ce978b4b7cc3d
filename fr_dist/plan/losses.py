"""What the planner reads of a loss, from the registry only (a new loss file needs no edit here).

* its family (``head_class(name).loss_cls.family``): ``binary`` runs the fused chunked pass, ``softmax`` the
  Partial-FC path; the memory and step models of :mod:`~fr_dist.plan.memory` / :mod:`~fr_dist.plan.timing`
  are the family's;
* the collectives one training step of its head sends (:func:`step_collectives`), as ``fr_dist.comm``
  counts them in benchmarks/classifier.py (``check_inputs=False``; training adds the 3-int64 ``meta``
  batch check): the packed all-gather of the embeddings [N, D+1] and the reduce-scatter of their gradient
  [N, D]; softmax: the three [N] fp32 all-reduces of the class-sharded cross-entropy; binary: the loss and
  the bias gradient, one element each; plus the loss's own ``extra_collectives`` (one [N] fp32 all-reduce
  each, e.g. CurricularFace's ``curricular_target``);
* what else it costs (:func:`loss_extra_bytes`, :func:`loss_notes`): its replicated state buffers
  (``loss_cls().state()``, built with the loss's defaults) and, for a norm-aware loss (``norm_aware = True``
  on the loss class: its margin reads the norms of the gathered raw embeddings), the [N] fp32 norm vector.
  Both are negligible beside the [n, D] rows; they are counted and said, not hidden.
"""

from __future__ import annotations

from functools import cache

from fr_dist.heads.registry import head_class, list_losses

__all__ = [
    "FAMILIES",
    "SOFTMAX_ALLREDUCES",
    "BINARY_SCALARS",
    "loss_family",
    "extra_collectives",
    "norm_aware",
    "modulated_negatives",
    "loss_state_bytes",
    "loss_extra_bytes",
    "step_collectives",
    "n_allreduces",
    "loss_notes",
    "describe_losses",
]

FAMILIES = ("binary", "softmax")
# heads/softmax.py's names of the class-sharded cross-entropy's [N] all-reduces (max, sum-exp, target p)
SOFTMAX_ALLREDUCES = ("softmax_max", "softmax_sum", "softmax_target")
# heads/binary_head.py's one-element all-reduces: the loss value and the shared bias' gradient
BINARY_SCALARS = ("loss", "grad_bias")
F32 = 4


def _loss_cls(head: str) -> type:
    return head_class(head).loss_cls  # an unknown name: ValueError listing the known ones


def loss_family(head: str) -> str:
    """``binary`` | ``softmax``: the family of registered loss ``head``."""
    family = getattr(_loss_cls(head), "family", None)
    if family not in FAMILIES:
        raise ValueError(f"head {head!r}: the planner models the loss families {FAMILIES}, not {family!r}")
    return family


def extra_collectives(head: str) -> tuple[str, ...]:
    """The loss's own [N] fp32 all-reduces per step beyond its family's (``loss_cls.extra_collectives``)."""
    return tuple(getattr(_loss_cls(head), "extra_collectives", ()))


def norm_aware(head: str) -> bool:
    """Does the loss read the [N] norms of the gathered raw embeddings (AdaFace, MagFace)? The loss class's
    ``norm_aware`` when it declares one, else whether its margin is differentiable in the norm (it
    overrides the softmax interface's ``target_norm_slope``)."""
    cls = _loss_cls(head)
    declared = getattr(cls, "norm_aware", None)
    if declared is not None:
        return bool(declared)
    owners = [k for k in cls.__mro__ if "target_norm_slope" in vars(k)]  # most derived first
    return len(owners) > 1  # a loss overrides the family base's


def modulated_negatives(head: str) -> bool:
    """Does the loss run the softmax family's negatives stage (``loss_cls.all_targets`` set: every row's
    target cosine on every rank, non-target logits modulated, as CurricularFace's)?"""
    return bool(getattr(_loss_cls(head), "all_targets", None))


def loss_state_bytes(head: str) -> dict[str, int]:
    """Bytes of each replicated state buffer of the loss built with its defaults ({} when it has none or
    cannot be built without arguments)."""
    return dict(_state_bytes(_loss_cls(head)))


@cache
def _state_bytes(loss_cls: type) -> tuple[tuple[str, int], ...]:
    try:
        state = loss_cls().state()
    except (TypeError, ValueError):
        return ()
    return tuple((k, int(v.numel() * v.element_size())) for k, v in state.items())


def loss_extra_bytes(head: str, N: int) -> int:
    """Memory the loss adds to its family's model: state buffers, the [N] norm vector of a norm-aware loss
    and one [N] fp32 buffer per extra all-reduce."""
    return (
        sum(loss_state_bytes(head).values())
        + (N * F32 if norm_aware(head) else 0)
        + N * F32 * len(extra_collectives(head))
    )


def step_collectives(head: str, N: int, D: int) -> list[dict]:
    """The head's collectives of one step (busiest rank), each {kind, name, shape, bytes (logical, fp32),
    per_sample (an [N]-length all-reduce), extra (from the loss's ``extra_collectives``)}."""

    def one(kind, name, shape, elements, per_sample=False, extra=False):
        return dict(
            kind=kind, name=name, shape=shape, bytes=elements * F32, per_sample=per_sample, extra=extra
        )

    out = [
        one("all_gather", "embeddings", f"[{N}, {D + 1}]", N * (D + 1)),  # packed embeddings + labels
        one("reduce_scatter", "grad_embeddings", f"[{N}, {D}]", N * D),
    ]
    if loss_family(head) == "softmax":
        out += [one("all_reduce", n, f"[{N}]", N, per_sample=True) for n in SOFTMAX_ALLREDUCES]
    else:
        out += [one("all_reduce", n, "[1]", 1) for n in BINARY_SCALARS]
    out += [one("all_reduce", n, f"[{N}]", N, per_sample=True, extra=True) for n in extra_collectives(head)]
    return out


def n_allreduces(head: str) -> int:
    """How many [N]-length all-reduces a step sends: the family's (softmax 3, binary 0) + the loss's extras."""
    family = len(SOFTMAX_ALLREDUCES) if loss_family(head) == "softmax" else 0
    return family + len(extra_collectives(head))


def loss_notes(head: str, N: int) -> list[str]:
    """One line per thing the plan of ``head`` assumes about its loss (printed under the table)."""
    fam = loss_family(head)
    if fam == "softmax":
        notes = [
            f"softmax family: {len(SOFTMAX_ALLREDUCES)} [N] fp32 all-reduces per step "
            f"({', '.join(SOFTMAX_ALLREDUCES)}) on the critical path"
        ]
    else:
        notes = ["binary family: no [N] all-reduce (no normaliser); 2 one-element ones (loss, bias gradient)"]
    extras = extra_collectives(head)
    if extras:
        notes.append(
            f"{len(extras)} more [N] fp32 all-reduce(s) per step from the loss ({', '.join(extras)}): "
            f"{len(extras) * N * F32:,} B each step, counted in comm and in the [N] all-reduce share"
        )
    if norm_aware(head):
        notes.append(
            f"norm-aware: the margin reads the [N] norms of the gathered raw embeddings ({N * F32:,} B, "
            "negligible; no collective: the norms travel with the gathered embeddings)"
        )
    if modulated_negatives(head):
        notes.append(
            "modulated negatives (the family's negatives stage): ~3 more fp32 [N, c] blocks in the chunked "
            "softmax (the value, its slope, the mask), an [N, S] bool mask in the dense one (counted)"
        )
    state = loss_state_bytes(head)
    if state:
        names = ", ".join(f"{k} ({v} B)" for k, v in state.items())
        notes.append(f"state: {names}, replicated on every rank, checkpointed once")
    return notes


def describe_losses() -> list[dict]:
    """Every registered loss: name, family, extra collectives, norm-aware, state buffers (``--list-heads``)."""
    return [
        dict(
            name=h,
            family=loss_family(h),
            n_allreduces=n_allreduces(h),
            extra_collectives=list(extra_collectives(h)),
            norm_aware=norm_aware(h),
            state=loss_state_bytes(h),
        )
        for h in list_losses()
    ]
