"""Calibrate ``fr-dist plan``'s hardware profile on this device, and put the planner beside every measurement.

    python -m benchmarks.gpu_calibrate measure --out DIR/calibrate.json     # ~10 s on a GPU
    python -m benchmarks.gpu_calibrate annotate DIR                         # planner vs DIR's benchmark JSON

``measure`` times, on the device (CUDA, else CPU at small sizes):

* the memory the CUDA context and the libraries hold outside torch's caching allocator
  (``mem_get_info`` total - free - ``memory_reserved``, before and after the GEMMs: cuBLAS handles);
* square GEMM TFLOP/s in fp32 (TF32 off, as the planner's fp32 figure), bf16 and fp16;
* the classifier's three GEMMs (logits [N, D] @ [D, c], d-embeddings [N, c] @ [c, D], d-proxies
  [c, N] @ [N, D]; N = 128, D = 512, c = 65,536) in fp32 and bf16: the rate the head's GEMM term uses;
* HBM bandwidth (a 1 GiB device-to-device copy, read + write bytes);
* kernel launch overhead (1,000 one-element in-place adds, launch-bound) and a launch + synchronize round trip;
* on CPU also the host rates of ``fr_dist.plan.measure_rates``.

It writes ``calibrate.json`` after every figure (atomically, so a cut run keeps what it measured) with the
base profile (the built-in one whose short name is in the device name: h100, h200, a100, v100; ``cpu``)
and the overrides that make the calibrated profile: ``tflops`` = the head-shaped GEMM rates with
``gemm_efficiency`` 1, ``elementwise_efficiency`` = measured copy bandwidth / the profile's HBM figure,
``op_overhead_s``, ``overhead_bytes`` (context + libraries) and ``memory_bytes`` (the device total);
``conv_efficiency`` is rescaled so that the backbone's bf16 prediction is unchanged (the backbone is not
measured here; ``annotate`` gives the efficiency the end-to-end run implies). On a GPU also
``hardware_calibrated.yaml`` for ``fr-dist plan --hardware``.

``annotate DIR`` reads what gpu_check.sh left in DIR (classifier_*.json, train_throughput.json,
capacity.json, calibrate.json) and writes ``plan_vs_measured_gpu.json`` / ``.md``: per measured point the
planner's step time and memory on the datasheet profile and on the calibrated one, beside the measured
step time, peak allocation and reserved memory. Pure arithmetic: it can be re-run anywhere on the saved
JSON (e.g. after the planner changes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from benchmarks._common import cuda_memory, cuda_sync, write_json_atomic

GiB = 1 << 30
# fr_dist.plan is imported only by the functions that use the planner (`from fr_dist import plan as P` there)


def base_profile(device_name: str) -> str:
    """The built-in profile for a device name: the one whose short name (h100, ...) it contains; else cpu."""
    from fr_dist import plan as P

    low = device_name.lower()
    for name in sorted(P.HARDWARE, key=len, reverse=True):
        if name.split("-")[0] in low:
            return name
    return "cpu"


# ----------------------------------------------------------------------------- measure
def _best(fn, device: torch.device, reps: int, inner: int = 1) -> float:
    """Best seconds per call of ``fn`` over ``reps`` timings of ``inner`` back-to-back calls."""
    fn()
    cuda_sync(device)
    best = math.inf
    for _ in range(reps):
        cuda_sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        cuda_sync(device)
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _square_gemm_tflops(device, dtype: str, size: int, reps: int) -> float:
    a = torch.randn(size, size, device=device).to(DTYPES[dtype])
    b = torch.randn(size, size, device=device).to(DTYPES[dtype])
    out = torch.empty(size, size, device=device, dtype=DTYPES[dtype])
    t = _best(lambda: torch.mm(a, b, out=out), device, reps, inner=3)
    return 2.0 * size**3 / t / 1e12


def _head_gemm_tflops(device, dtype: str, N: int, D: int, c: int, reps: int) -> float:
    dt = DTYPES[dtype]
    x, w, g = (torch.randn(*s, device=device).to(dt) for s in ((N, D), (c, D), (N, c)))  # [N,D] [c,D] [N,c]
    logits = torch.empty(N, c, device=device, dtype=dt)
    dx = torch.empty(N, D, device=device, dtype=dt)
    dw = torch.empty(c, D, device=device, dtype=dt)

    def gemm3():
        torch.mm(x, w.t(), out=logits)  # [N, c]
        torch.mm(g, w, out=dx)  # [N, D]
        torch.mm(g.t(), x, out=dw)  # [c, D]

    return 6.0 * N * D * c / _best(gemm3, device, reps, inner=3) / 1e12


def _copy_gbps(device, nbytes: int, reps: int) -> float:
    src = torch.empty(nbytes // 4, device=device)
    src.fill_(1.0)
    dst = torch.empty_like(src)
    return 2.0 * nbytes / _best(lambda: dst.copy_(src), device, reps, inner=2) / 1e9


def _launch_overhead_s(device, calls: int, reps: int) -> tuple[float, float]:
    one = torch.zeros(1, device=device)

    def many():
        for _ in range(calls):
            one.add_(1.0)

    per_op = _best(many, device, reps) / calls
    roundtrip = _best(lambda: one.add_(1.0), device, reps * 4)  # one op + a synchronize
    return per_op, roundtrip


def _planner():
    """fr_dist.plan, or None where fr_dist's own dependencies (pydantic, yaml) are not installed: the
    measurements need torch alone; the planner's profile is derived from them later (``annotate``)."""
    try:
        from fr_dist import plan as P
    except ImportError as e:
        print(f"gpu_calibrate: fr_dist.plan not importable ({e}): raw measurements only", flush=True)
        return None
    return P


def measure(device: torch.device, out: Path, quick: bool = False) -> dict:
    """Every figure of the module docstring, JSON rewritten after each one."""
    P = _planner()
    cuda = device.type == "cuda"
    name = (
        torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or platform.machine()})"
    )
    base = base_profile(name) if cuda and P is not None else "cpu"
    rec = dict(
        benchmark="gpu_calibrate",
        device=name,
        torch=torch.__version__,
        cuda=torch.version.cuda,
        base_profile=base,
        allow_tf32=bool(torch.backends.cuda.matmul.allow_tf32),
        measured={},
        status="running",
    )
    m = rec["measured"]

    def save(key=None, value=None):
        if key is not None:
            m[key] = value
            print(f"{key}: {json.dumps(value)}", flush=True)
        write_json_atomic(out, rec)

    save()
    reps = 3 if quick or not cuda else 5
    if cuda:
        torch.cuda.init()
        torch.zeros(1, device=device)
        cuda_sync(device)
        save("memory_at_start", cuda_memory(device))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the planner's fp32 figure is plain fp32
    try:
        size = 8192 if cuda else 256
        sq = {}
        for dt in ("fp32", "bf16", "fp16") if cuda else ("fp32", "bf16"):
            sq[dt] = _square_gemm_tflops(device, dt, size, reps)
            save("gemm_square_tflops", dict(sq, size=size))
        N, D, c = (128, 512, 65536) if cuda else (16, 64, 1024)
        hd = {}
        for dt in ("fp32", "bf16"):
            hd[dt] = _head_gemm_tflops(device, dt, N, D, c, reps)
            save("gemm_head_tflops", dict(hd, N=N, D=D, c=c))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    nbytes = GiB if cuda else 32 << 20
    save("copy_gbps", dict(gbps=_copy_gbps(device, nbytes, reps), bytes=nbytes))
    per_op, roundtrip = _launch_overhead_s(device, 1000 if cuda else 200, reps)
    save("launch_overhead_s", per_op)
    save("launch_sync_roundtrip_s", roundtrip)
    if cuda:
        torch.cuda.empty_cache()
        save("memory_after", cuda_memory(device))
    elif P is not None:
        save("host_rates", P.measure_rates(numel=1 << 20, reps=2))
    if P is not None:
        rec["profile_overrides"] = profile_overrides(rec)
    rec["status"] = "ok"
    save()
    if cuda and P is not None:
        yaml_path = out.with_name("hardware_calibrated.yaml")
        yaml_path.write_text(_profile_yaml(rec))
        print(f"wrote {yaml_path} (fr-dist plan --hardware {yaml_path})")
    print(f"wrote {out}")
    return rec


def profile_overrides(rec: dict) -> dict:
    """Hardware fields that turn ``rec['base_profile']`` into the profile measured here (module docstring)."""
    from fr_dist import plan as P

    m = rec["measured"]
    base = P.load_hardware(rec["base_profile"], 1)
    head = m["gemm_head_tflops"]
    tflops = {"fp32": head["fp32"], "bf16": head["bf16"], "fp16": head["bf16"]}
    over = dict(tflops=tflops, gemm_efficiency=1.0, op_overhead_s=m["launch_overhead_s"])
    if base.tflops.get("bf16") and head["bf16"]:
        over["conv_efficiency"] = base.conv_efficiency * base.tflops["bf16"] / head["bf16"]
    if "host_rates" in m:  # CPU: the planner's host rates, as measured (stream, elementwise, ...)
        fields = {f.name for f in dataclasses.fields(P.Hardware)}
        over.update({k: v for k, v in m["host_rates"].items() if k in fields})
        over["elementwise_efficiency"] = 1.0
    else:
        over["elementwise_efficiency"] = m["copy_gbps"]["gbps"] / base.hbm_gbps
    after = m.get("memory_after")
    if after:
        over["overhead_bytes"] = after["outside_allocator_bytes"]
        over["memory_bytes"] = after["total_bytes"]
    return over


def _profile_yaml(rec: dict) -> str:
    """The calibrated profile as a YAML file for ``fr-dist plan --hardware`` (written without pyyaml)."""
    lines = [
        f"# calibrated by benchmarks.gpu_calibrate on {rec['device']} (torch {rec['torch']})",
        f"base: {rec['base_profile']}",
        f"name: calibrated-{rec['base_profile']}",
    ]

    def num(v) -> str:  # YAML 1.1 (pyyaml) reads a float only with a dot and a signed exponent: 4.0e-06
        return f"{v:.6e}" if isinstance(v, float) else str(v)

    for k, v in rec["profile_overrides"].items():
        if isinstance(v, dict):
            v = "{" + ", ".join(f"{dk}: {num(dv)}" for dk, dv in v.items()) + "}"
        lines.append(f"{k}: {num(v)}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- annotate
def _load(path: Path):
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except ValueError:
        return None


def hardware_profiles(out: Path) -> dict:
    """{label: f(world) -> Hardware}: the datasheet profile and, when calibrate.json has it, the calibrated one."""
    from fr_dist import plan as P

    cal = _load(out / "calibrate.json") or {}
    env = _load(out / "env.json") or {}
    gpu = env.get("gpu") if env.get("cuda_available") else None
    base = base_profile(gpu) if gpu else cal.get("base_profile", "cpu")
    if gpu and cal.get("measured") and not cal.get("profile_overrides"):
        # measured where the planner did not import (torch alone on the device): derive the profile now
        cal = dict(cal, base_profile=base)
        cal["profile_overrides"] = profile_overrides(cal)
    fields = {f.name for f in dataclasses.fields(P.Hardware)}
    over = {k: v for k, v in (cal.get("profile_overrides") or {}).items() if k in fields}
    profiles = {base: lambda W: P.load_hardware(base, W)}
    if over:
        profiles["calibrated"] = lambda W: dataclasses.replace(P.load_hardware(base, W), **over)
    return profiles


def head_plan_kwargs(
    head: str, num_classes: int, dim: int, world: int, batch: int, opts=None, **rest
) -> dict:
    """``fr_dist.plan.PlanConfig`` keywords of one measured head: ``world`` ranks of one GPU each, ``batch``
    per rank, ``opts`` the head's constructor options (SphereFace2: proxy_dtype, fused_update, chunk_size,
    sample_rate, master_weights, kernel, with the heads' defaults; Partial FC: sample_rate); ``rest`` sets
    the other fields (amp, backbone, ...): by default the head alone in fp32 with SGD momentum, as
    benchmarks/classifier.py and the capacity mode run it."""
    opts = opts or {}
    kw = dict(
        identities=int(num_classes), dim=int(dim), gpus_per_node=int(world), nodes=1, batch=int(batch),
        head=head, sample_rate=float(opts.get("sample_rate") or 1.0), optimizer="sgd", amp="none",
        head_amp=False, backbone="none", pfc_impl="fr_dist", ddp_bucket_copy=False,
    )  # fmt: skip
    if head == "sphereface2":
        kw.update(
            chunk_size=int(opts.get("chunk_size") or 0),
            proxy_dtype=opts.get("proxy_dtype") or "fp32",
            fused_update=bool(opts.get("fused_update", False)),
            fp32_master=bool(opts.get("master_weights", False)),
            sf2_kernel=opts.get("kernel") or "auto",
        )
    kw.update(rest)
    return kw


def _predict(cfg_kw: dict, profiles: dict) -> dict:
    """The planner's step time and memory for one configuration on every profile (errors recorded)."""
    from fr_dist import plan as P

    out = {}
    for label, make in profiles.items():
        try:
            cfg = P.PlanConfig(**cfg_kw)
            hw = make(cfg.world)
            mem, st = P.memory_breakdown(cfg, hw), P.step_time(cfg, hw)
            out[label] = dict(
                step_s=st["total"],
                head_s=st["total"] - st.get("backbone_compute", 0.0),
                backbone_s=st.get("backbone_compute", 0.0),
                memory_bytes=int(mem["total"]),
                memory_without_overhead_bytes=int(mem["total"] - hw.overhead_bytes),
                overhead_bytes=int(hw.overhead_bytes),
                step_time=st,
                memory=mem,
            )
        except Exception as e:  # noqa: BLE001 - one bad point must not lose the others
            out[label] = dict(error=f"{type(e).__name__}: {e}"[:300])
    return out


def _ratios(row: dict) -> None:
    """predicted / measured for step time and memory, per profile (None where a side is missing)."""
    meas = row["measured"]
    for pred in row["planner"].values():
        if "error" in pred:
            continue
        if meas.get("step_s"):
            pred["step_ratio"] = pred["step_s"] / meas["step_s"]
        if meas.get("peak_allocated_bytes"):
            pred["memory_ratio"] = pred["memory_without_overhead_bytes"] / meas["peak_allocated_bytes"]


def classifier_rows(out: Path, profiles: dict) -> list[dict]:
    rows = []
    for f in sorted(out.glob("classifier_*.json")):
        for r in (_load(f) or {}).get("results", []):
            sf2 = r["head"] == "sphereface2"
            opts = r.get("head_options") or {}
            kw = head_plan_kwargs(
                r["head"], r["num_classes"], r["dim"], r["world_size"], r["batch_per_rank"],
                opts if sf2 else {"sample_rate": r.get("sample_rate")},
            )  # fmt: skip
            mem = r.get("cuda_memory") or {}
            row = dict(
                kind="classifier",
                source=f.name,
                head=r["head"],
                num_classes=r["num_classes"],
                options=opts if sf2 else {"chunk": r.get("chunk")},
                note=None if sf2 or not r.get("chunk") else "the planner does not model chunked Partial FC",
                measured=dict(
                    step_s=r.get("step_time_s"),
                    gemm3_s=r.get("gemm3_time_s"),
                    peak_allocated_bytes=mem.get("max_allocated_bytes"),
                    reserved_bytes=mem.get("max_reserved_bytes"),
                    free_bytes=mem.get("free_bytes"),
                ),
                planner=_predict(kw, profiles),
            )
            _ratios(row)
            rows.append(row)
    return rows


def e2e_rows(out: Path, profiles: dict) -> list[dict]:
    from fr_dist import plan as P

    rows = []
    for run in (_load(out / "train_throughput.json") or {}).get("runs", []):
        args = run.get("args") or {}
        for r in run.get("results", []):
            if "free" not in r:
                continue
            bb = args.get("backbone")
            row = dict(
                kind="e2e",
                source=f"train_throughput.json {r.get('source')}",
                head=r["head"],
                num_classes=r.get("num_classes"),
                options={k: v for k, v in (r.get("head_kwargs") or {}).items() if k in _PLAN_KEYS},
                measured=dict(
                    step_s=r["free"]["step_s"],
                    head_s=r["timed"]["phase_s"]["head"],
                    backbone_s=r["timed"]["phase_s"]["backbone"],
                    peak_allocated_bytes=(r.get("cuda_memory") or {}).get("max_allocated_bytes"),
                    reserved_bytes=(r.get("cuda_memory") or {}).get("max_reserved_bytes"),
                ),
                planner={},
            )
            if bb not in P.BACKBONES or args.get("backbone_kwargs"):
                row["note"] = f"planner skipped: backbone {bb!r} with kwargs is not in the planner's table"
                rows.append(row)
                continue
            kw = head_plan_kwargs(
                r["head"], r["num_classes"], args["embedding_size"], r["world_size"], r["batch_per_rank"],
                r.get("head_kwargs"), amp=args.get("amp", "none"), head_amp=args.get("head_dtype") == "bf16",
                backbone=bb, ddp_bucket_copy=r["world_size"] > 1,  # fr_dist wraps in DDP from 2 ranks on
            )  # fmt: skip
            row["planner"] = _predict(kw, profiles)
            _ratios(row)
            info = P.backbone_info(bb, args["embedding_size"])
            dt = "fp32" if kw["amp"] == "none" else kw["amp"]
            for pred, make in zip(row["planner"].values(), profiles.values()):
                if "error" not in pred and row["measured"]["backbone_s"]:
                    peak = make(r["world_size"]).tflops[dt] * 1e12
                    flops = 3.0 * info["fwd_flops"] * r["batch_per_rank"]
                    pred["implied_conv_efficiency"] = flops / (peak * row["measured"]["backbone_s"])
            rows.append(row)
    return rows


_PLAN_KEYS = ("sample_rate", "chunk_size", "proxy_dtype", "fused_update", "master_weights", "kernel")


def capacity_rows(out: Path, profiles: dict) -> list[dict]:
    from fr_dist import plan as P

    rows = []
    for run in (_load(out / "capacity.json") or {}).get("runs", []):
        args = run.get("args") or {}
        for r in run.get("results", []):
            hk = r.get("head_kwargs") or {}
            for t in r.get("trials", []):
                if not t.get("fits"):
                    continue
                kw = head_plan_kwargs(
                    r["head"], t["K"], args.get("embedding_size", 512), 1, args.get("batch", 128), hk,
                    head_amp=args.get("head_dtype") == "bf16",
                )  # fmt: skip
                mem = t.get("cuda_memory") or {}
                row = dict(
                    kind="capacity",
                    source="capacity.json",
                    head=r["head"],
                    num_classes=t["K"],
                    options={k: v for k, v in hk.items() if k in _PLAN_KEYS},
                    measured=dict(
                        peak_allocated_bytes=t.get("peak_bytes")
                        if t.get("peak_kind") == "cuda_max_allocated"
                        else None,
                        reserved_bytes=mem.get("max_reserved_bytes"),
                        max_k_measured=r.get("max_k_measured"),
                    ),
                    planner=_predict(kw, profiles),
                )
                for pred, make in zip(row["planner"].values(), profiles.values()):
                    if "error" not in pred:
                        try:
                            pred["max_identities"] = P.max_identities(P.PlanConfig(**kw), make(1))
                        except Exception as e:  # noqa: BLE001
                            pred["max_identities_error"] = str(e)[:200]
                _ratios(row)
                rows.append(row)
    return rows


def _median(xs):
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None


def annotate(out: Path) -> dict:
    """plan_vs_measured_gpu.json / .md in ``out`` from the benchmark JSON there."""
    profiles = hardware_profiles(out)
    rows = classifier_rows(out, profiles) + e2e_rows(out, profiles) + capacity_rows(out, profiles)
    medians = {}
    for label in profiles:
        for kind in ("classifier", "e2e", "capacity"):
            rs = [r["planner"].get(label) or {} for r in rows if r["kind"] == kind]
            medians[f"{label} {kind}"] = dict(
                points=len(rs),
                step_ratio=_median([p.get("step_ratio") for p in rs]),
                memory_ratio=_median([p.get("memory_ratio") for p in rs]),
                implied_conv_efficiency=_median([p.get("implied_conv_efficiency") for p in rs]),
            )
    report = dict(
        benchmark="plan_vs_measured_gpu",
        profiles=list(profiles),
        notes=(
            "predicted / measured; memory: the planner's total minus its overhead_bytes vs torch's peak "
            "allocation (max_memory_allocated) in the measured step"
        ),
        medians=medians,
        rows=rows,
    )
    write_json_atomic(out / "plan_vs_measured_gpu.json", report)
    md = [
        "# `fr-dist plan` beside gpu_check's measurements",
        "",
        "Generated by `python -m benchmarks.gpu_calibrate annotate DIR`. Ratios are predicted / measured "
        "(step time; memory = planner total - its overhead vs torch's peak allocation).",
        "",
        "| kind | head | K | options | measured step ms | measured peak GiB | "
        + " | ".join(f"{p} step ratio | {p} memory ratio" for p in profiles)
        + " |",
        "|---|---|---:|---|---:|---:|" + "---:|---:|" * len(profiles),
    ]

    def fmt(x, scale=1.0, spec=".2f"):
        return "-" if x is None else format(x * scale, spec)

    for r in rows:
        m = r["measured"]
        cells = []
        for p in profiles:
            pr = r["planner"].get(p) or {}
            cells += [fmt(pr.get("step_ratio")), fmt(pr.get("memory_ratio"))]
        md.append(
            f"| {r['kind']} | {r['head']} | {r['num_classes']:,} | {json.dumps(r['options'], sort_keys=True)} "
            f"| {fmt(m.get('step_s'), 1e3, '.2f')} | {fmt(m.get('peak_allocated_bytes'), 1 / GiB, '.2f')} | "
            + " | ".join(cells)
            + " |"
        )
    md += ["", "Medians: " + json.dumps({k: v for k, v in medians.items() if v["points"]}, default=str)]
    (out / "plan_vs_measured_gpu.md").write_text("\n".join(md) + "\n")
    print(f"{len(rows)} points; medians {json.dumps(medians, default=str)}")
    print(f"wrote {out / 'plan_vs_measured_gpu.json'} and .md")
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure", help="time the device; write calibrate.json")
    m.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--quick", action="store_true", help="fewer repetitions")
    a = sub.add_parser("annotate", help="planner beside every measurement of a gpu_check output folder")
    a.add_argument("dir", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "measure":
        cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        measure(torch.device("cuda:0" if cuda else "cpu"), args.out, args.quick)
    else:
        annotate(args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
