"""One plan (memory, largest K, step time, the head's collectives, [N] all-reduce share, loss notes) for a
configuration, the requested head beside the two baselines, and the table ``fr-dist plan`` prints."""

from __future__ import annotations

import dataclasses

from fr_dist.plan.config import BASELINES, PlanConfig
from fr_dist.plan.hardware import GiB, Hardware
from fr_dist.plan.losses import (
    extra_collectives,
    loss_family,
    loss_notes,
    n_allreduces,
    norm_aware,
    step_collectives,
)
from fr_dist.plan.memory import max_identities, memory_breakdown
from fr_dist.plan.timing import softmax_share_point, step_time

__all__ = ["plan", "side_by_side", "format_table"]


def plan(cfg: PlanConfig, hw: Hardware) -> dict:
    mem = memory_breakdown(cfg, hw)
    kmax = max_identities(cfg, hw)
    st = step_time(cfg, hw)
    N = cfg.world * cfg.batch
    return dict(
        loss=dict(
            name=cfg.head,
            family=loss_family(cfg.head),
            extra_collectives=list(extra_collectives(cfg.head)),
            norm_aware=norm_aware(cfg.head),
            notes=loss_notes(cfg.head, N),
        ),
        collectives=step_collectives(cfg.head, N, cfg.dim) if cfg.world > 1 else [],
        fits=bool(mem["total"] <= hw.memory_bytes),
        max_identities=int(kmax),
        memory_per_gpu=mem,
        step_time_s=st,
        images_per_s=cfg.world * cfg.batch / st["total"],
        capacity_bytes=int(hw.memory_bytes),
        identities_per_gb=kmax / (cfg.world * hw.memory_bytes / 1e9),
        softmax_allreduce=softmax_share_point(cfg, hw),
        config=dataclasses.asdict(cfg),
        hardware=dataclasses.asdict(hw),
    )


def side_by_side(cfg: PlanConfig, hw: Hardware) -> dict[str, dict]:
    """The requested configuration, then the baselines it is not (SphereFace2 keeps the proxy settings;
    Partial FC is fp32 with the given sample rate, or 0.1 when the request is of the binary family). The
    two baselines alone keep their order (sphereface2, partial_fc); another loss comes first."""
    out = {} if cfg.head in BASELINES else {cfg.head: plan(cfg, hw)}
    for head in BASELINES:
        if head == cfg.head:
            out[head] = plan(cfg, hw)
        elif head == "partial_fc":
            rate = 0.1 if cfg.binary and cfg.sample_rate >= 1 else cfg.sample_rate
            out[head] = plan(dataclasses.replace(cfg, head=head, sample_rate=rate), hw)
        else:
            out[head] = plan(dataclasses.replace(cfg, head=head), hw)
    return out


def _fmt_bytes(b: float) -> str:
    return f"{b / GiB:9.2f} GiB"


def format_table(res: dict[str, dict]) -> str:
    heads = list(res)
    mem_keys = [k for k in res[heads[0]]["memory_per_gpu"]]
    time_keys = [k for k in res[heads[0]]["step_time_s"]]
    w = 22
    lines = []
    c0 = res[heads[0]]["config"]
    lines.append(
        f"fr-dist plan: K={c0['identities']:,} D={c0['dim']} W={c0['gpus_per_node']}x{c0['nodes']} "
        f"B={c0['batch']}/GPU backbone={c0['backbone']} amp={c0['amp']} optimizer={c0['optimizer']} "
        f"hardware={res[heads[0]]['hardware']['name']} ({res[heads[0]]['capacity_bytes'] / GiB:.1f} GiB/GPU)"
    )
    desc = []
    for h in heads:
        c = res[h]["config"]
        if res[h]["loss"]["family"] == "binary":
            desc.append(
                f"{h} {c['proxy_dtype']} {'fused' if c['fused_update'] else 'unfused'} chunk {c['chunk_size']}"
            )
        else:
            chunk = (
                f" chunk {c['softmax_chunk']}" if c["softmax_chunk"] and c["pfc_impl"] == "fr_dist" else ""
            )
            desc.append(f"{h} fp32 rate {c['sample_rate']} ({c['pfc_impl']}){chunk}")
    lines.append(f"{'':24s}" + "".join(f"{d:>{w + 14}s}" for d in desc))
    lines.append("memory per GPU")
    for k in mem_keys:
        lines.append(
            f"  {k:22s}" + "".join(f"{_fmt_bytes(res[h]['memory_per_gpu'][k]):>{w + 14}s}" for h in heads)
        )
    lines.append(f"  {'fits':22s}" + "".join(f"{str(res[h]['fits']):>{w + 14}s}" for h in heads))
    lines.append(
        f"  {'max identities':22s}" + "".join(f"{res[h]['max_identities']:>{w + 14},d}" for h in heads)
    )
    lines.append(
        f"  {'identities per GB':22s}"
        + "".join(f"{res[h]['identities_per_gb'] / 1e6:>{w + 11}.3f} M" for h in heads)
    )
    lines.append("step time")
    for k in time_keys:
        lines.append(
            f"  {k:22s}" + "".join(f"{res[h]['step_time_s'][k] * 1e3:>{w + 11}.2f} ms" for h in heads)
        )
    lines.append(
        f"  {'images/s (global)':22s}" + "".join(f"{res[h]['images_per_s']:>{w + 14},.0f}" for h in heads)
    )
    for h in heads:
        if res[h]["loss"]["family"] != "softmax":
            continue
        sm = res[h]["softmax_allreduce"]
        n_vec = n_allreduces(h)
        for label, d in (("full step", sm), ("head alone", sm["head_only"])):
            lines.append(
                f"{h} [N] all-reduces ({n_vec}, {label}): {d['share_here'] * 100:.2f}% of the step here; > 5% from "
                f"W = {d['world_size_above'] if d['world_size_above'] else 'never (<= 2^20 nodes)'} at this K"
                + (f", or for K <= {d['identities_below']:,} at this W" if d["identities_below"] else "")
            )
    lines.append("collectives per step (busiest rank; N = W x B gathered rows)")
    for h in heads:
        colls = res[h]["collectives"]
        text = ", ".join(
            f"{c['kind']} {c['name']} {c['shape']}" + (" (the loss's extra)" if c["extra"] else "")
            for c in colls
        )
        lines.append(f"  {h}: {text or 'none (one rank)'}")
    lines.append("loss notes")
    for h in heads:
        for note in res[h]["loss"]["notes"]:
            lines.append(f"  {h}: {note}")
    return "\n".join(lines)
