"""Cluster cost model for the class-sharded head: memory per GPU, largest K, step time (``fr-dist plan``).

Pure arithmetic (no torch.distributed; torch only for ``--measure`` and unknown backbones). Every figure
is bytes or seconds for the busiest rank (rank 0 owns ``ceil(K / W)`` classes, fr_dist.sharding). It plans
a training recipe, its inputs read from the training config (:func:`plan_config_from_training`), or a
configuration given by flags::

    fr-dist plan --config configs/ms1mv3_r50_sf2.yaml --hardware h100 --nodes 2
    fr-dist plan --num-classes 100M --embedding-size 512 --gpus-per-node 8 --nodes 1 --batch-size 128 \\
        --head sphereface2 --hardware h100-80gb --proxy-dtype bf16 --fused-update --model iresnet50 --json

One module per job:

* :mod:`~fr_dist.plan.config`: the inputs (:class:`PlanConfig`) and the table of the training keys that give
  them (:data:`RECIPE_KEYS`);
* :mod:`~fr_dist.plan.losses`: what it reads of a loss, from the registry alone: its family, the collectives
  a step of its head sends (the family's + the loss's ``extra_collectives``), its state and norm vector;
* :mod:`~fr_dist.plan.hardware`: the GPU profiles, the ``cpu`` profile, YAML profiles;
* :mod:`~fr_dist.plan.backbones`: parameters, FLOPs and activation bytes per image of each backbone;
* :mod:`~fr_dist.plan.memory`: the heads' buffer counts, memory per GPU, the largest K that fits;
* :mod:`~fr_dist.plan.timing`: the step time model and where Partial FC's softmax all-reduces matter;
* :mod:`~fr_dist.plan.report`: one plan, the requested head beside the two baselines (SphereFace2, Partial
  FC), the printed table with each head's collectives and loss notes;
* :mod:`~fr_dist.plan.measure`: ``--measure``, the host rates of the ``cpu`` profile timed here;
* :mod:`~fr_dist.plan.cli`: the ``fr-dist plan`` command line.

Validated on this machine's CPU against benchmarks/classifier.py with rates measured in the same processes
(benchmarks/plan_vs_measured.py) and on GPU only against insightface's published V100 throughput, with one
fitted figure (``conv_efficiency``; benchmarks/plan_validation.py).
"""

from fr_dist.plan import config as _config
from fr_dist.plan.backbones import BACKBONES, backbone_info
from fr_dist.plan.config import (
    BASELINES,
    DTYPE_BYTES,
    PFC_IMPLS,
    RECIPE_KEYS,
    PlanConfig,
    parse_count,
    plan_config_from_training,
)
from fr_dist.plan.hardware import CPU_DEFAULT, HARDWARE, GiB, Hardware, MiB, load_hardware
from fr_dist.plan.losses import (
    describe_losses,
    extra_collectives,
    loss_family,
    loss_notes,
    n_allreduces,
    norm_aware,
    step_collectives,
)
from fr_dist.plan.measure import measure_cpu_profile, measure_rates
from fr_dist.plan.memory import (
    SF2_CHUNK_ROWS,
    SF2_LOGIT_BUFFERS,
    SF2_LOGIT_BUFFERS_TRITON,
    activation_bytes,
    max_identities,
    memory_breakdown,
    sf2_chunk,
    sf2_triton,
)
from fr_dist.plan.report import format_table, plan, side_by_side
from fr_dist.plan.timing import SAMPLER_BYTES_PER_CLASS, softmax_share_point, step_allocations, step_time

__all__ = [
    "Hardware",
    "PlanConfig",
    "HARDWARE",
    "CPU_DEFAULT",
    "BACKBONES",
    "DTYPE_BYTES",
    "BASELINES",
    "PFC_IMPLS",
    "RECIPE_KEYS",
    "GiB",
    "MiB",
    "SF2_CHUNK_ROWS",
    "SF2_LOGIT_BUFFERS",
    "SF2_LOGIT_BUFFERS_TRITON",
    "SAMPLER_BYTES_PER_CLASS",
    "parse_count",
    "plan_config_from_training",
    "load_hardware",
    "backbone_info",
    "activation_bytes",
    "sf2_chunk",
    "sf2_triton",
    "memory_breakdown",
    "max_identities",
    "step_allocations",
    "step_time",
    "softmax_share_point",
    "plan",
    "side_by_side",
    "format_table",
    "measure_rates",
    "measure_cpu_profile",
    "loss_family",
    "extra_collectives",
    "norm_aware",
    "n_allreduces",
    "step_collectives",
    "loss_notes",
    "describe_losses",
]


def __getattr__(name: str):
    """``HEADS``: the registered losses at the time of asking (fr_dist.plan.config.HEADS)."""
    if name == "HEADS":
        return _config.HEADS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
