#!/usr/bin/env bash
# One-command GPU check of fr_dist on a machine with one CUDA GPU (< 8 minutes, installs nothing).
#
#   benchmarks/gpu_check.sh                 # the real check: results in benchmarks/results/<gpu>_<yyyymm>/
#   benchmarks/gpu_check.sh --dry-run       # CPU: print every GPU command, run CPU stand-ins at smoke sizes
#   benchmarks/gpu_check.sh --out DIR --budget-s 480 --install
#
# Steps, in this order (each under its own timeout, cut to what is left of the budget; a failing
# step is recorded and the next one runs; the summary table lists every step's status):
#   env        nvidia-smi, torch CUDA build, NCCL and DALI availability
#   heads_fp32 benchmarks/classifier.py, both heads, K = 1e5 / 1e6 / 2e6 on the one GPU
#   train_fp16 the demo recipe (configs/demo_cpu.yaml) on cuda, fp16 autocast + GradScaler, 300 steps
#   train_bf16 the same in bf16
#   dali       loader throughput alone: DALI nvJPEG `mixed` decode vs the torch loader (CUDA
#              pinned memory + side-stream prefetch) -- benchmarks/train_throughput.py --mode data
#   e2e        iresnet50 + each head at K = 10^6 (synthetic / torch / DALI input), images/s and the
#              data / backbone / head / comm split, under torchrun so fr_dist.runtime selects NCCL
#              (a 1-rank NCCL group: every collective of the step runs through NCCL)
#   capacity   largest K one GPU holds per head (doubling + bisection, measured peak memory)
#              against `fr-dist plan` at that K; capacity_sf2_best: SphereFace2 with bf16 proxies
#              and the fused update
#   heads_*    classifier.py variants, run only when its --help lists the flag: SphereFace2 bf16
#              proxies and fused update (--sf2-opt), the fused chunk with torch ops instead of its
#              Triton kernel (kernel=eager), chunked Partial FC (--pfc-chunks), a dtype
#              flag, --compile (torch.compile / Triton); otherwise reported as skipped
#   summary    a table on stdout + summary.json
#
# Python: $PYTHON, else .venv/bin/python, else python3 (needs a CUDA build of torch and the
# project's extras: `pip install -e ".[test,dali]"`; --install runs exactly that, nothing else).
set -u -o pipefail

cd "$(dirname "$0")/.."
DRY=0
INSTALL=0
OUT=""
BUDGET=465
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --install) INSTALL=1 ;;
        --out) OUT="$2"; shift ;;
        --budget-s) BUDGET="$2"; shift ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
PY="$(command -v "$PY" || echo "$PY")"
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node=1)
START=$SECONDS

if [ "$DRY" = 1 ]; then
    GPU="dry-run-cpu"
else
    GPU="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)"
    [ -n "$GPU" ] || GPU="unknown-gpu"
fi
SLUG="$(printf '%s' "$GPU" | tr '[:upper:]' '[:lower:]' | sed -e 's/nvidia//g' -e 's/[^a-z0-9]\{1,\}/-/g' -e 's/^-//' -e 's/-$//')"
if [ -z "$OUT" ]; then
    if [ "$DRY" = 1 ]; then OUT="${TMPDIR:-/tmp}/fr_dist_gpu_check_dry_run"
    else OUT="benchmarks/results/${SLUG}_$(date +%Y%m)"
    fi
fi
mkdir -p "$OUT/logs"
STATUS="$OUT/status.tsv"
printf 'step\tstatus\trc\tseconds\tlog\n' > "$STATUS"
[ "$DRY" = 1 ] && DEFAULT_THREADS=1 || DEFAULT_THREADS=4
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$DEFAULT_THREADS}" PYTHONUNBUFFERED=1
echo "gpu_check: GPU '$GPU' -> $OUT (python $PY, budget ${BUDGET}s, dry-run $DRY)"

# step NAME TIMEOUT_S CMD... : run with a timeout cut to the remaining budget; record status.
step() {
    local name="$1" limit="$2"
    shift 2
    local left=$((BUDGET - (SECONDS - START) - 15))
    [ "$limit" -gt "$left" ] && limit=$left
    local log="$OUT/logs/$name.log"
    echo "---- [$name] (timeout ${limit}s) $*"
    if [ "$limit" -lt 5 ]; then
        printf '%s\tskipped (budget spent)\t-\t0\t%s\n' "$name" "$log" >> "$STATUS"
        return 0
    fi
    local t0=$SECONDS rc=0
    timeout -k 10 "$limit" "$@" > "$log" 2>&1 || rc=$?
    local dt=$((SECONDS - t0)) st=ok
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then st=timeout
    elif [ "$rc" != 0 ]; then st=failed
    fi
    tail -n 6 "$log" | sed 's/^/    /'
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$st" "$rc" "$dt" "$log" >> "$STATUS"
    return 0
}

# shown: print a command that only a GPU can run (dry run)
shown() {
    local name="$1"
    shift
    echo "---- [$name] GPU command (not run in --dry-run): $*"
    printf '%s\tshown (dry run)\t-\t0\t-\n' "$name" >> "$STATUS"
}

HEAD_HELP=""
has_flag() {  # does benchmarks/classifier.py --help list this flag? (its options change over time)
    [ -n "$HEAD_HELP" ] || HEAD_HELP="$("$PY" benchmarks/classifier.py --help 2>/dev/null || echo none)"
    grep -qE -- "(^|[[:space:]\[])$1([[:space:]=]|$)" <<< "$HEAD_HELP"
}

# ------------------------------------------------------------------ env
if [ "$INSTALL" = 1 ] && [ "$DRY" = 0 ]; then
    step install 240 "$PY" -m pip install -q -e ".[test,dali]"
fi
cat > "$OUT/env_check.py" <<'EOF'
import json, sys
import torch, torch.distributed as dist
info = dict(torch=torch.__version__, cuda_build=torch.version.cuda, cuda_available=torch.cuda.is_available(),
            nccl=dist.is_nccl_available(), gloo=dist.is_gloo_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, memory_bytes=p.total_memory, capability=f"{p.major}.{p.minor}",
                bf16=torch.cuda.is_bf16_supported(), nccl_version=".".join(map(str, torch.cuda.nccl.version())))
try:
    import nvidia.dali as d
    info["dali"] = d.__version__
except ImportError:
    info["dali"] = None
print(json.dumps(info))
json.dump(info, open(sys.argv[1], "w"), indent=1)
sys.exit(0 if (info["cuda_available"] or sys.argv[2] == "0") else 3)
EOF
step env 60 "$PY" "$OUT/env_check.py" "$OUT/env.json" "$((1 - DRY))"
if [ "$DRY" = 0 ] && ! grep -q '"cuda_available": true' "$OUT/env.json" 2>/dev/null; then
    echo "gpu_check: no usable CUDA GPU (see $OUT/logs/env.log); the GPU steps will fail fast and be reported"
fi

# ------------------------------------------------------------------ head benchmark (classifier.py)
HEAD_ARGS=(--heads sphereface2 partial_fc)
if [ "$DRY" = 1 ]; then
    HEAD_ARGS+=(--num-classes 1000 --world-sizes 1 --batch 16 --dim 64 --steps 2 --warmup 1)
else
    HEAD_ARGS+=(--launcher torchrun --num-classes 100000 1000000 2000000 --batch 128 --dim 512 --steps 10 --warmup 3)
fi
heads_variant() {  # heads_variant NAME TIMEOUT EXTRA_FLAGS...
    local name="$1" limit="$2"
    shift 2
    if [ "$DRY" = 1 ]; then
        step "heads_$name" "$limit" "$PY" benchmarks/classifier.py "${HEAD_ARGS[@]}" "$@" --out "$OUT/classifier_$name.json"
    else
        step "heads_$name" "$limit" "${TORCHRUN[@]}" benchmarks/classifier.py "${HEAD_ARGS[@]}" "$@" \
            --out "$OUT/classifier_$name.json"
    fi
}
heads_variant fp32 60

# ------------------------------------------------------------------ demo recipe, fp16 + GradScaler and bf16
if [ "$DRY" = 1 ]; then
    SYN="$OUT/synthetic_demo"
    DEMO=(data.rec="$SYN/train.rec" data.synthetic.out_dir="$SYN" data.synthetic.num_identities=40
          data.synthetic.images_per_identity=4 data.synthetic.heldout_identities=10 data.synthetic.heldout_pairs=20
          eval.bins=["$SYN/heldout.bin"] data.batch_size=16 data.num_workers=0 train.max_steps=4 train.log_every=2
          train.warmup_steps=1 device=cpu)
    shown train_fp16_gpu "$PY" -m fr_dist.cli train --config configs/demo_cpu.yaml device=cuda train.amp=fp16 \
        train.max_steps=300 data.num_workers=6 output_dir="$OUT/runs/demo_fp16"
    step train_bf16 90 "$PY" -m fr_dist.cli train --config configs/demo_cpu.yaml "${DEMO[@]}" train.amp=bf16 \
        output_dir="$OUT/runs/demo_bf16"
else
    DEMO=(device=cuda train.max_steps=300 train.log_every=25 data.num_workers=6)
    step train_fp16 45 "$PY" -m fr_dist.cli train --config configs/demo_cpu.yaml "${DEMO[@]}" train.amp=fp16 \
        output_dir="$OUT/runs/demo_fp16"
    step train_bf16 40 "$PY" -m fr_dist.cli train --config configs/demo_cpu.yaml "${DEMO[@]}" train.amp=bf16 \
        output_dir="$OUT/runs/demo_bf16"
fi

# ------------------------------------------------------------------ loader alone: DALI mixed vs torch (CUDA streams)
TT=(benchmarks/train_throughput.py)
if [ "$DRY" = 1 ]; then
    step dali 60 "$PY" "${TT[@]}" --mode data --smoke --device cpu --sources torch dali --steps 4 \
        --out "$OUT/data_loader_gpu.json"
else
    step dali 35 "$PY" "${TT[@]}" --mode data --device cuda --sources torch dali --batch 256 --workers 8 \
        --warmup 3 --steps 40 --out "$OUT/data_loader_gpu.json"
fi

# ------------------------------------------------------------------ end to end: iresnet50 + each head at K = 10^6
if [ "$DRY" = 1 ]; then
    shown e2e_gpu "${TORCHRUN[@]}" "${TT[@]}" --launcher torchrun --device cuda --backbone iresnet50 \
        --embedding-size 512 --backbone-kwargs '{}' --num-classes 1000000 --batch 128 --amp bf16 \
        --workers 8 --warmup 5 --steps 15 --out "$OUT/train_throughput.json"
    step e2e 90 "${TORCHRUN[@]}" "${TT[@]}" --launcher torchrun --device cpu --smoke --num-classes 4096 \
        --out "$OUT/train_throughput.json"
else
    step e2e 120 "${TORCHRUN[@]}" "${TT[@]}" --launcher torchrun --device cuda --backbone iresnet50 \
        --embedding-size 512 --backbone-kwargs '{}' --num-classes 1000000 --batch 128 --amp bf16 \
        --workers 8 --warmup 5 --steps 15 --out "$OUT/train_throughput.json"
fi

# ------------------------------------------------------------------ largest K on this GPU vs the planner
if [ "$DRY" = 1 ]; then
    step capacity 60 "$PY" "${TT[@]}" --mode capacity --smoke --device cpu --out "$OUT/capacity.json"
    step capacity_sf2_best 60 "$PY" "${TT[@]}" --mode capacity --smoke --device cpu --heads sphereface2 \
        --head-kwargs '{"sphereface2": {"proxy_dtype": "bf16", "fused_update": true}}' --append \
        --out "$OUT/capacity.json"
else
    step capacity 70 "$PY" "${TT[@]}" --mode capacity --device cuda --embedding-size 512 --batch 128 \
        --k-start 4000000 --capacity-budget-s 30 --out "$OUT/capacity.json"
    # SphereFace2 with the record settings: bf16 proxies + the fused in-pass update (no [n, D] gradient)
    step capacity_sf2_best 50 "$PY" "${TT[@]}" --mode capacity --device cuda --embedding-size 512 --batch 128 \
        --heads sphereface2 --head-kwargs '{"sphereface2": {"proxy_dtype": "bf16", "fused_update": true}}' \
        --k-start 16000000 --capacity-budget-s 35 --append --out "$OUT/capacity.json"
fi

# ------------------------------------------------------------------ head benchmark variants (last: optional)
# flags that the head benchmark may or may not offer: used only when its --help lists them
skip() { printf '%s\tskipped (%s)\t-\t0\t-\n' "$1" "$2" >> "$STATUS"; }
if has_flag "--head-dtype"; then heads_variant bf16 40 --head-dtype bf16
elif has_flag "--dtype"; then heads_variant bf16 40 --dtype bf16
elif has_flag "--sf2-opt"; then  # bf16 proxies need the fused update (the head owns the update)
    heads_variant sf2_fused_bf16 40 --heads sphereface2 --sf2-opt fused_update=True --sf2-opt proxy_dtype=bf16
else skip heads_bf16 "classifier.py has no dtype flag"
fi
if has_flag "--fused-update"; then heads_variant fused 40 --heads sphereface2 --fused-update
elif has_flag "--sf2-opt"; then heads_variant sf2_fused 40 --heads sphereface2 --sf2-opt fused_update=True
else skip heads_fused "classifier.py has no fused-update option"
fi
if has_flag "--sf2-opt"; then  # the chunk's elementwise part in torch ops (the default on CUDA: one Triton kernel)
    heads_variant sf2_fused_eager 40 --heads sphereface2 --sf2-opt fused_update=True --sf2-opt kernel=eager
else skip heads_sf2_fused_eager "classifier.py has no --sf2-opt"
fi
if has_flag "--pfc-chunks"; then heads_variant pfc_chunked 40 --heads partial_fc --pfc-chunks 65536
else skip heads_pfc_chunked "classifier.py has no --pfc-chunks"
fi
if has_flag "--compile"; then heads_variant compile 40 --compile
else skip heads_compile "classifier.py has no --compile (torch.compile / Triton)"
fi

# ------------------------------------------------------------------ summary
cat > "$OUT/summary.py" <<'EOF'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
rows = [ln.split("\t") for ln in (out / "status.tsv").read_text().splitlines()[1:] if ln.strip()]
print("\n==== gpu_check summary:", out)
print(f"{'step':22s} {'status':46s} {'rc':>4s} {'s':>5s}")
for name, st, rc, sec, _log in rows:
    print(f"{name:22s} {st:46s} {rc:>4s} {sec:>5s}")


def load(name):
    p = out / name
    try:
        return json.loads(p.read_text()) if p.exists() else None
    except ValueError:
        return None


figs = {}
for f in sorted(out.glob("classifier_*.json")):
    for r in (load(f.name) or {}).get("results", []):
        peak = r.get("peak_memory_bytes") or r.get("peak_step_bytes") or 0
        chunk = f" chunk={r['chunk']}" if r.get("chunk") else ""
        figs[f"{f.stem} {r['head']} K={r['num_classes']}{chunk}"] = (
            f"{r['images_per_s']:.0f} img/s, step {r['step_time_s'] * 1e3:.2f} ms, "
            f"peak {peak / 2**30:.2f} GiB ({r.get('peak_memory_kind')})"
        )
for run in ("demo_fp16", "demo_bf16"):
    m = out / "runs" / run / "metrics.jsonl"
    if m.exists():
        recs = [json.loads(ln) for ln in m.read_text().splitlines() if '"loss"' in ln]
        if recs:
            figs[f"train {run}"] = (
                f"loss {recs[0]['loss']:.3f} (step {recs[0]['step']}) -> {recs[-1]['loss']:.3f} "
                f"(step {recs[-1]['step']}), {recs[-1].get('images_per_s', float('nan')):.0f} img/s"
            )
for run in (load("data_loader_gpu.json") or {}).get("runs", []):
    for r in run.get("results", []):
        if "images_per_s" in r:
            figs[f"data {r['source']}"] = f"{r['images_per_s']:.0f} img/s ({r['source_detail']})"
for run in (load("train_throughput.json") or {}).get("runs", []):
    for r in run.get("results", []):
        if "free" in r:
            sh = r["timed"]["share"]
            figs[f"e2e {r['head']} {r['source']}"] = (
                f"{r['free']['images_per_s_global']:.0f} img/s; data {sh['data']:.0%} backbone "
                f"{sh['backbone']:.0%} head {sh['head']:.0%} comm {sh['comm']:.0%} "
                f"[{run.get('backend')}, K={r.get('num_classes')}]"
            )
for run in (load("capacity.json") or {}).get("runs", []):
    for r in run.get("results", []):
        pl = r.get("planner") or {}
        pm = pl.get("memory_total_bytes")
        plan = f"planner {pm / 2**30:.2f} GiB, max K {pl.get('max_identities')}" if pm else (
            f"planner: {pl.get('skipped') or pl.get('error', '')[:80]}")
        opts = json.dumps(r.get("head_kwargs") or {}, sort_keys=True)
        figs[f"capacity {r['head']} {opts}"] = (
            f"max K measured {r.get('max_k_measured')}, peak {(r.get('peak_bytes_at_max') or 0) / 2**30:.2f} GiB; "
            + plan
        )
print()
for k, v in figs.items():
    print(f"{k:44s} {v}")
steps = [dict(zip(["step", "status", "rc", "seconds", "log"], r)) for r in rows]
(out / "summary.json").write_text(json.dumps(dict(steps=steps, figures=figs), indent=1) + "\n")
bad = [r[0] for r in rows if r[1] in ("failed", "timeout")]
print(f"\n{len(rows)} steps, {len(bad)} failed or timed out {bad or ''}; summary.json in {out}")
EOF
"$PY" "$OUT/summary.py" "$OUT"
echo "gpu_check: total $((SECONDS - START))s"
if awk -F'\t' 'NR > 1 && ($2 == "failed" || $2 == "timeout") {bad = 1} END {exit !bad}' "$STATUS"; then
    exit 1
fi
exit 0
