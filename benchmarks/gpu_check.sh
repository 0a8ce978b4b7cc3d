#!/usr/bin/env bash
# One-command GPU check of fr_dist on a machine with one CUDA GPU: offline, within a fixed budget
# (465 s of steps by default), installing nothing unless --install.
#
#   benchmarks/gpu_check.sh                 # the real check: results in benchmarks/results/<gpu>_<yyyymm>/
#   benchmarks/gpu_check.sh --dry-run       # CPU: print every GPU command, run CPU stand-ins at smoke sizes
#   benchmarks/gpu_check.sh --print-plan    # the steps and their time caps (sum <= budget), nothing run
#   benchmarks/gpu_check.sh --out DIR --budget-s 465 --install --data-dir /tmp/fr_dist_gpu_check_data
#
# Budget: every step has an explicit cap (the CAP table below); the caps add up to at most the budget
# less a reserve for the summary (checked before anything runs; a smaller --budget-s scales them down).
# A step runs under `timeout` at its cap, cut further to what is left of the budget; a failing or cut
# step is recorded and the next one runs. The benchmarks rewrite their JSON after every measured point
# (temp file + rename), so a cut step keeps what it measured.
#
# Offline: fr_dist is not installed (the repo goes on PYTHONPATH; the benchmarks run as `python -m benchmarks.X`). The env step checks every import and
# tool the steps need (cv2, yaml, simplejpeg / PIL, triton + a C compiler + Python.h for its launcher,
# nvidia.dali, NCCL, deepspeed for the record); a step whose needs are missing is recorded as
# `skipped: <reason>` in status.tsv / summary.json instead of failing. --install pip-installs only the
# missing Python dependencies of pyproject.toml (+ dali, bench extras), with a constraint pinning the
# installed torch (and triton) so the machine's CUDA torch is never replaced, `--retries 0 --timeout 5`
# so that it fails within seconds offline (then the steps that need them are skipped).
#
# Steps, in this order:
#   install    (--install only) pip install the missing dependencies, torch pinned
#   env        nvidia-smi, torch CUDA build, NCCL, the modules above, a Triton kernel compiled and run
#   calibrate  benchmarks.gpu_calibrate: fp32 / bf16 / fp16 GEMM rates, HBM bandwidth (1 GiB copy),
#              kernel launch overhead, CUDA context memory -> calibrate.json + hardware_calibrated.yaml
#   data_synth the demo's synthetic RecordIO set (fr_dist.data.synthetic, 600 identities x 16 images +
#              120 held-out identities / 600 pairs, ~50 MB; the demo's data/ is not copied) into
#              --data-dir (default ${TMPDIR:-/tmp}/fr_dist_gpu_check_data: outside OUT, which stays small)
#   heads_fp32 benchmarks.classifier, both heads, K = 1e5 / 1e6 / 2e6 on the one GPU
#   train_fp16 the demo recipe (configs/demo_cpu.yaml) on cuda, fp16 autocast + GradScaler, 300 steps
#   train_bf16 the same in bf16
#   dali       loader throughput alone: DALI nvJPEG `mixed` decode vs the torch loader (CUDA
#              pinned memory + side-stream prefetch) -- benchmarks.train_throughput --mode data
#   e2e        iresnet50 + each head at K = 10^6 (synthetic / torch / DALI input), images/s and the
#              data / backbone / head / comm split, under torchrun so fr_dist.runtime selects NCCL
#   capacity   largest K one GPU holds per head (doubling + bisection, measured peak memory);
#              capacity_sf2_best: SphereFace2 with bf16 proxies and the fused update
#   heads_*    benchmarks.classifier variants at K = 1e6 (when its source has the flag): SphereFace2 bf16
#              proxies + fused update, the fused update with its Triton kernel and with kernel=eager,
#              chunked Partial FC, --compile
#   annotate   benchmarks.gpu_calibrate annotate: fr_dist.plan's step time and memory (datasheet
#              and calibrated profiles) beside every measurement -> plan_vs_measured_gpu.json / .md
#   summary    a table on stdout + summary.json
#
# Python: $PYTHON, else .venv/bin/python, else python3 (needs torch; a CUDA build for the real check).
set -u -o pipefail

cd "$(dirname "$0")/.."
ROOT="$PWD"
DRY=0
INSTALL=0
PRINT_PLAN=0
OUT=""
BUDGET=""
DATA_DIR="${TMPDIR:-/tmp}/fr_dist_gpu_check_data"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --install) INSTALL=1 ;;
        --print-plan) PRINT_PLAN=1 ;;
        --out) OUT="$2"; shift ;;
        --budget-s) BUDGET="$2"; shift ;;
        --data-dir) DATA_DIR="$2"; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

# ------------------------------------------------------------------ the budget: every step's cap, summed
RESERVE=15     # seconds kept for annotate's aftermath and the summary
GRACE=5        # timeout -k: a step that ignores SIGTERM is killed this much later
declare -A CAP=()
PLAN=()
plan() { PLAN+=("$1"); CAP[$1]=$2; }
src_has() { grep -q -- "\"$1\"" benchmarks/classifier.py; }  # does classifier.py define this flag?
if [ "$DRY" = 1 ]; then  # CPU stand-ins: generous caps (a loaded 2-core CI machine), ~1-2 min in practice
    DEFAULT_BUDGET=600
    [ "$INSTALL" = 1 ] && plan install 15
    plan env 30; plan calibrate 30; plan data_synth 40; plan heads_fp32 40; plan train_bf16 45
    plan dali 40; plan e2e 60; plan capacity 40; plan capacity_sf2_best 30
else
    DEFAULT_BUDGET=465
    [ "$INSTALL" = 1 ] && plan install 60
    plan env 30; plan calibrate 25; plan data_synth 25; plan heads_fp32 55; plan train_fp16 35
    plan train_bf16 30; plan dali 20; plan e2e 65; plan capacity 45; plan capacity_sf2_best 30
fi
VCAP=20
[ "$DRY" = 1 ] && VCAP=30
src_has --sf2-opt && plan heads_sf2_fused_bf16 $VCAP && plan heads_sf2_fused $VCAP && plan heads_sf2_fused_eager $VCAP
src_has --pfc-chunks && plan heads_pfc_chunked $VCAP
src_has --compile && plan heads_compile $VCAP
plan annotate $([ "$DRY" = 1 ] && echo 30 || echo 10)
if [ -z "$BUDGET" ]; then
    BUDGET=$DEFAULT_BUDGET
    [ "$INSTALL" = 1 ] && BUDGET=$((BUDGET + CAP[install]))  # the install's own time comes on top
fi
AVAIL=$((BUDGET - RESERVE))
cap_sum() { local s=0 n; for n in "${PLAN[@]}"; do s=$((s + CAP[$n])); done; echo "$s"; }
SUM=$(cap_sum)
if [ "$SUM" -gt "$AVAIL" ]; then  # a smaller --budget-s: every cap shrinks in proportion
    echo "gpu_check: the caps add up to ${SUM}s > ${AVAIL}s (budget ${BUDGET}s - reserve ${RESERVE}s): scaled down"
    for n in "${PLAN[@]}"; do CAP[$n]=$((CAP[$n] * AVAIL / SUM)); done
    SUM=$(cap_sum)
fi
if [ "$SUM" -gt "$AVAIL" ]; then
    echo "gpu_check: BUG: step caps ${SUM}s exceed the budget's ${AVAIL}s" >&2
    exit 3
fi
if [ "$PRINT_PLAN" = 1 ]; then
    for n in "${PLAN[@]}"; do printf 'cap\t%s\t%s\n' "$n" "${CAP[$n]}"; done
    printf 'sum\t%s\nbudget\t%s\nreserve\t%s\n' "$SUM" "$BUDGET" "$RESERVE"
    exit 0
fi

# ------------------------------------------------------------------ python, output folder
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
PY="$(command -v "$PY" || echo "$PY")"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # fr_dist importable without installing it
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node=1)
START=$SECONDS

if [ "$DRY" = 1 ]; then
    GPU="dry-run-cpu"
else
    GPU="$(timeout 20 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)"
    [ -n "$GPU" ] || GPU="unknown-gpu"
fi
SLUG="$(printf '%s' "$GPU" | tr '[:upper:]' '[:lower:]' | sed -e 's/nvidia//g' -e 's/[^a-z0-9]\{1,\}/-/g' -e 's/^-//' -e 's/-$//')"
if [ -z "$OUT" ]; then
    if [ "$DRY" = 1 ]; then OUT="${TMPDIR:-/tmp}/fr_dist_gpu_check_dry_run"
    else OUT="benchmarks/results/${SLUG}_$(date +%Y%m)"
    fi
fi
mkdir -p "$OUT/logs"
OUT="$(cd "$OUT" && pwd)"
STATUS="$OUT/status.tsv"
printf 'step\tstatus\trc\tseconds\tcap_s\tlog\n' > "$STATUS"
for n in "${PLAN[@]}"; do printf '%s\t%s\n' "$n" "${CAP[$n]}"; done > "$OUT/caps.tsv"
[ "$DRY" = 1 ] && DEFAULT_THREADS=1 || DEFAULT_THREADS=4
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$DEFAULT_THREADS}" PYTHONUNBUFFERED=1
echo "gpu_check: GPU '$GPU' -> $OUT (python $PY, budget ${BUDGET}s = caps ${SUM}s + reserve, dry-run $DRY)"

# skip NAME REASON: record a step that does not run
skip() {
    echo "---- [$1] skipped: $2"
    printf '%s\tskipped: %s\t-\t0\t%s\t-\n' "$1" "$2" "${CAP[$1]:--}" >> "$STATUS"
}

# why_not REQ...: why a step cannot run here ('' when it can). REQ: cuda, data, nccl, decoder (simplejpeg /
# cv2 / PIL), or a module the env step tried: cv2, yaml, nvidia.dali, ..., and each step's entry module
# (fr_dist.train.run, benchmarks.classifier, ...: whatever fr_dist itself needs, e.g. pydantic)
why_not() {
    local why=() r v
    for r in "$@"; do
        case "$r" in
            cuda) [ "$DRY" = 1 ] || [ "${ENV_CUDA:-0}" = 1 ] || why+=("no usable CUDA device (env step)") ;;
            data) [ -f "$SYN/.complete" ] || why+=("no synthetic data (data_synth did not finish)") ;;
            decoder) [ "${HAVE_decoder:-0}" = 1 ] || why+=("no JPEG decoder (simplejpeg / cv2 / PIL)") ;;
            nccl) [ "${HAVE_nccl:-0}" = 1 ] || why+=("no NCCL in this torch build") ;;
            fr_dist.*|benchmarks.*)  # the project's own modules: say what they miss
                v="HAVE_${r//./_}" w="WHY_${r//./_}"
                [ "${!v:-0}" = 1 ] || why+=("$r not importable (${!w:-env step did not run})") ;;
            *) v="HAVE_${r//./_}"; [ "${!v:-0}" = 1 ] || why+=("$r not importable") ;;
        esac
    done
    local IFS=';'
    echo "${why[*]}" | sed 's/;/; /g'
}

# step NAME "REQ..." CMD...: run under the step's cap (cut to the budget left) or record why not
LAST=""
step() {
    local name="$1" reqs="$2"
    shift 2
    LAST=skipped
    local why
    # shellcheck disable=SC2086
    why="$(why_not $reqs)"
    if [ -n "$why" ]; then skip "$name" "$why"; return 0; fi
    local limit="${CAP[$name]:?no cap for step $name}"
    local left=$((BUDGET - RESERVE - (SECONDS - START) - GRACE))
    [ "$limit" -gt "$left" ] && limit=$left
    local log="$OUT/logs/$name.log"
    echo "---- [$name] (cap ${CAP[$name]}s, timeout ${limit}s) $*"
    if [ "$limit" -lt 5 ]; then skip "$name" "budget spent"; return 0; fi
    local t0=$SECONDS rc=0
    timeout -k "$GRACE" "$limit" "$@" > "$log" 2>&1 || rc=$?
    local dt=$((SECONDS - t0)) st=ok
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then st=timeout
    elif [ "$rc" != 0 ]; then st=failed
    fi
    LAST=$st
    tail -n 6 "$log" | sed 's/^/    /'
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$st" "$rc" "$dt" "${CAP[$name]}" "$log" >> "$STATUS"
    return 0
}

# shown: print a command that only a GPU can run (dry run)
shown() {
    local name="$1"
    shift
    echo "---- [$name] GPU command (not run in --dry-run): $*"
    printf '%s\tshown (dry run)\t-\t0\t-\t-\n' "$name" >> "$STATUS"
}

# ------------------------------------------------------------------ install (opt-in): never touches torch
cat > "$OUT/install.py" <<'EOF'
"""pip-install the missing Python dependencies of fr_dist (pyproject.toml + the dali and bench extras),
with the installed torch (and triton) pinned by a constraint file; --print: only show the command."""
import importlib.metadata as md, importlib.util, re, subprocess, sys
from pathlib import Path

root, out, show = Path(sys.argv[1]), Path(sys.argv[2]), "--print" in sys.argv


def version(dist):  # the installed distribution's version (no import: torch takes seconds), else None
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


if version("torch") is None:
    sys.exit("gpu_check install: no torch here; install your CUDA build of torch first (this never installs it)")
text = (root / "pyproject.toml").read_text()
try:
    import tomllib
    proj = tomllib.loads(text)["project"]
    deps, extras = proj["dependencies"], proj.get("optional-dependencies", {})
except ImportError:  # python < 3.11: the two lists we need, by pattern
    def lst(key):
        m = re.search(rf"^{key}\s*=\s*\[(.*?)\]", text, re.S | re.M)
        return re.findall(r'"([^"]+)"', m.group(1)) if m else []
    deps, extras = lst("dependencies"), {e: lst(e) for e in ("dali", "bench")}
IMPORT = {"pyyaml": "yaml", "opencv-python-headless": "cv2", "pillow": "PIL", "nvidia-dali-cuda120": "nvidia.dali"}
reqs = [r for r in deps + extras.get("dali", []) + extras.get("bench", []) if not r.startswith("torch")]
def present(req):
    name = re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].lower()
    mod = IMPORT.get(name, name.replace("-", "_"))
    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False
missing = [r for r in reqs if not present(r)]
# the installed torch (and the triton its CUDA build came with) stay exactly as they are
pins = [f"{d}=={version(d)}" for d in ("torch", "triton", "pytorch-triton") if version(d)]
cons = out / "pip_constraints.txt"
cons.write_text("\n".join(pins) + "\n")
cmd = [sys.executable, "-m", "pip", "install", "--retries", "0", "--timeout", "5", "--no-input",
       "--disable-pip-version-check", "--upgrade-strategy", "only-if-needed", "-c", str(cons)] + missing
print("installed torch pinned:", ", ".join(pins))
print("missing:", " ".join(missing) or "nothing")
print("command:", " ".join(cmd))
if show or not missing:
    sys.exit(0)
p = subprocess.run(cmd)
if p.returncode:
    sys.exit(f"gpu_check install: pip failed (exit {p.returncode}; offline?): the steps needing "
             f"{' '.join(missing)} will be skipped")
EOF
if [ "$INSTALL" = 1 ]; then
    if [ "$DRY" = 1 ]; then step install "" "$PY" "$OUT/install.py" "$ROOT" "$OUT" --print
    else step install "" "$PY" "$OUT/install.py" "$ROOT" "$OUT"
    fi
fi

# ------------------------------------------------------------------ env: every import and tool the steps need
cat > "$OUT/triton_probe.py" <<'EOF'
import torch
import triton
import triton.language as tl


@triton.jit
def add_one(x_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    tl.store(x_ptr + i, tl.load(x_ptr + i, mask=m) + 1.0, mask=m)


x = torch.zeros(100, device="cuda")
add_one[(1,)](x, 100, BLOCK=128)
torch.cuda.synchronize()
assert float(x.sum()) == 100.0, float(x.sum())
print("triton kernel compiled and ran")
EOF
cat > "$OUT/env_check.py" <<'EOF'
import importlib, importlib.util, json, os, shlex, shutil, subprocess, sys, sysconfig

out_json, out_sh, want_cuda, probe = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
info = dict(python=sys.executable, python_version=sys.version.split()[0], modules={})
have = {}


def imported(mod):  # version, or None when it does not import (a broken install counts as missing)
    try:
        m = importlib.import_module(mod)
        return str(getattr(m, "__version__", "present"))
    except Exception as e:  # noqa: BLE001
        info.setdefault("import_errors", {})[mod] = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        return None


for mod in ("numpy", "yaml", "cv2", "simplejpeg", "PIL", "triton", "nvidia.dali"):
    info["modules"][mod] = imported(mod)
for mod in ("tqdm", "tensorboard", "matplotlib", "deepspeed"):  # no step needs them: presence only
    info["modules"][mod] = "present" if importlib.util.find_spec(mod) else None
for mod, v in info["modules"].items():
    have[mod.replace(".", "_")] = v is not None
have["decoder"] = any(info["modules"][m] for m in ("simplejpeg", "cv2", "PIL"))
try:
    import torch
    import torch.distributed as dist

    info.update(torch=torch.__version__, cuda_build=torch.version.cuda, cuda_available=torch.cuda.is_available(),
                nccl=dist.is_nccl_available(), gloo=dist.is_gloo_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info(0)
        info.update(gpu=p.name, memory_bytes=p.total_memory, free_bytes=free, capability=f"{p.major}.{p.minor}",
                    bf16=torch.cuda.is_bf16_supported(), nccl_version=".".join(map(str, torch.cuda.nccl.version())))
except Exception as e:  # noqa: BLE001
    info.update(torch=None, torch_error=f"{type(e).__name__}: {e}"[:300], cuda_available=False, nccl=False)
have["nccl"] = bool(info.get("nccl"))
# what each step runs must import here (fr_dist's own dependencies: pydantic, yaml, ... with the reason)
info["entry_modules"] = {}
for mod in ("fr_dist.plan", "fr_dist.data.synthetic", "fr_dist.train.config_load", "fr_dist.train.run",
            "benchmarks.gpu_calibrate", "benchmarks.classifier", "benchmarks.train_throughput"):
    info["entry_modules"][mod] = imported(mod) is not None
    have[mod.replace(".", "_")] = info["entry_modules"][mod]
# Triton compiles a small C launcher with the host compiler against Python.h on first use
cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang") or shutil.which("cc")
python_h = os.path.join(sysconfig.get_paths()["include"], "Python.h")
info.update(c_compiler=cc, python_h=python_h if os.path.exists(python_h) else None)
why = []
if not info["modules"]["triton"]:
    why.append("triton not importable")
if not cc:
    why.append("no C compiler (gcc / clang / $CC)")
if not info["python_h"]:
    why.append(f"no Python.h ({python_h}; apt-get install python3-dev)")
if not info.get("cuda_available"):
    why.append("no CUDA device")
if not why:
    try:
        p = subprocess.run([sys.executable, probe], capture_output=True, text=True, timeout=25)
        if p.returncode:
            why.append("Triton probe kernel failed: " + (p.stderr or p.stdout).strip().splitlines()[-1][:200])
    except subprocess.TimeoutExpired:
        why.append("Triton probe kernel took > 25 s")
info["triton_kernel"] = "ok" if not why else "; ".join(why)
have["triton_kernel"] = not why
print(json.dumps(info, indent=1))
with open(out_json, "w") as f:
    json.dump(dict(info, have=have), f, indent=1)
with open(out_sh, "w") as f:
    for k, v in have.items():
        f.write(f"HAVE_{k}={int(bool(v))}\n")
    f.write(f"ENV_CUDA={int(bool(info.get('cuda_available')))}\n")
    f.write(f"TRITON_WHY={shlex.quote(info['triton_kernel'])}\n")
    for mod, err in info.get("import_errors", {}).items():
        f.write(f"WHY_{mod.replace('.', '_')}={shlex.quote(err)}\n")
sys.exit(3 if want_cuda and not info.get("cuda_available") else 0)
EOF
rm -f "$OUT/env.sh"
step env "" "$PY" "$OUT/env_check.py" "$OUT/env.json" "$OUT/env.sh" "$((1 - DRY))" "$OUT/triton_probe.py"
# shellcheck disable=SC1091
[ -f "$OUT/env.sh" ] && . "$OUT/env.sh"
if [ "$DRY" = 0 ] && [ "${ENV_CUDA:-0}" != 1 ]; then
    echo "gpu_check: no usable CUDA GPU (see $OUT/logs/env.log): the GPU steps are skipped"
fi
# SphereFace2's fused chunk runs a Triton kernel on CUDA when triton imports (kernel=auto); where it
# imports but cannot build its launcher, every SphereFace2 step runs kernel=eager instead of failing
SF2_EAGER=0
if [ "$DRY" = 0 ] && [ "${HAVE_triton:-0}" = 1 ] && [ "${HAVE_triton_kernel:-0}" != 1 ]; then
    SF2_EAGER=1
    echo "gpu_check: Triton imports but its kernel does not run (${TRITON_WHY:-?}): SphereFace2 with kernel=eager"
fi

# ------------------------------------------------------------------ planner calibration
step calibrate "cuda benchmarks.gpu_calibrate" "$PY" -m benchmarks.gpu_calibrate measure --out "$OUT/calibrate.json"

# ------------------------------------------------------------------ synthetic RecordIO set, made here
mkdir -p "$DATA_DIR"
SYN="$(cd "$DATA_DIR" && pwd)/synthetic_$([ "$DRY" = 1 ] && echo dry || echo gpu)"
rm -f "$SYN/.complete"  # made afresh every run (a cut generation must not be taken for a set)
if [ "$DRY" = 1 ]; then SYNTH=(--num-ids 40 --images-per-id 4 --heldout-ids 10 --heldout-pairs 20 --workers 1)
else SYNTH=(--num-ids 600 --images-per-id 16 --heldout-ids 120 --heldout-pairs 600 --workers 8)
fi
step data_synth "cv2 fr_dist.data.synthetic" "$PY" -m fr_dist.data.cli synth "$SYN" "${SYNTH[@]}" --quiet
[ "$LAST" = ok ] && [ -f "$SYN/train.rec" ] && echo ok > "$SYN/.complete"

# ------------------------------------------------------------------ head benchmark (benchmarks.classifier)
HEAD_ARGS=(--heads sphereface2 partial_fc)
if [ "$DRY" = 1 ]; then
    HEAD_ARGS+=(--world-sizes 1 --batch 16 --dim 64 --steps 2 --warmup 1)
    HEAD_K=(--num-classes 1000)
    VARIANT_K=(--num-classes 1000 --no-memory)  # the profiled memory step runs once, in heads_fp32
else
    HEAD_ARGS+=(--launcher torchrun --batch 128 --dim 512 --steps 10 --warmup 3)
    HEAD_K=(--num-classes 100000 1000000 2000000)
    VARIANT_K=(--num-classes 1000000)
fi
SF2_OPT=()
[ "$SF2_EAGER" = 1 ] && SF2_OPT=(--sf2-opt kernel=eager)
heads_run() {  # heads_run NAME "REQ..." CLASSIFIER_ARGS...
    local name="$1" reqs="$2 benchmarks.classifier"
    shift 2
    if [ "$DRY" = 1 ]; then
        step "$name" "$reqs" "$PY" -m benchmarks.classifier "${HEAD_ARGS[@]}" "$@" --out "$OUT/classifier_${name#heads_}.json"
    else
        step "$name" "$reqs" "${TORCHRUN[@]}" -m benchmarks.classifier "${HEAD_ARGS[@]}" "$@" \
            --out "$OUT/classifier_${name#heads_}.json"
    fi
}
heads_run heads_fp32 "cuda" "${HEAD_K[@]}" "${SF2_OPT[@]}"

# ------------------------------------------------------------------ demo recipe, fp16 + GradScaler and bf16
DEMO_DATA=(data.rec="$SYN/train.rec" data.synthetic.generate=false data.synthetic.out_dir="$SYN"
           eval.bins=["$SYN/heldout.bin"])
[ "$SF2_EAGER" = 1 ] && DEMO_DATA+=(head.sphereface2.kernel=eager)
TRAIN_MODS="fr_dist.train.config_load fr_dist.train.run"
if [ "$DRY" = 1 ]; then
    DEMO=("${DEMO_DATA[@]}" data.batch_size=16 data.num_workers=0 train.max_steps=4 train.log_every=2
          train.warmup_steps=1 device=cpu)
    shown train_fp16_gpu "$PY" -m fr_dist.cli train --config configs/demo_cpu.yaml "${DEMO_DATA[@]}" device=cuda \
        train.amp=fp16 train.max_steps=300 data.num_workers=6 output_dir="$OUT/runs/demo_fp16"
    step train_bf16 "yaml decoder data $TRAIN_MODS" "$PY" -m fr_dist.cli train --config configs/demo_cpu.yaml "${DEMO[@]}" \
        train.amp=bf16 output_dir="$OUT/runs/demo_bf16"
else
    DEMO=("${DEMO_DATA[@]}" device=cuda train.max_steps=300 train.log_every=25 data.num_workers=6)
    step train_fp16 "cuda yaml decoder data $TRAIN_MODS" "$PY" -m fr_dist.cli train --config configs/demo_cpu.yaml \
        "${DEMO[@]}" train.amp=fp16 output_dir="$OUT/runs/demo_fp16"
    step train_bf16 "cuda yaml decoder data $TRAIN_MODS" "$PY" -m fr_dist.cli train --config configs/demo_cpu.yaml \
        "${DEMO[@]}" train.amp=bf16 output_dir="$OUT/runs/demo_bf16"
fi

# ------------------------------------------------------------------ loader alone: DALI mixed vs torch (CUDA streams)
TT=(-m benchmarks.train_throughput)
if [ "$DRY" = 1 ]; then
    step dali "nvidia.dali decoder data benchmarks.train_throughput" "$PY" "${TT[@]}" --mode data --smoke --device cpu --sources torch dali \
        --steps 4 --rec "$SYN/train.rec" --out "$OUT/data_loader_gpu.json"
else
    step dali "cuda nvidia.dali decoder data benchmarks.train_throughput" "$PY" "${TT[@]}" --mode data --device cuda --sources torch dali \
        --batch 256 --workers 8 --warmup 3 --steps 40 --rec "$SYN/train.rec" --out "$OUT/data_loader_gpu.json"
fi

# ------------------------------------------------------------------ end to end: iresnet50 + each head at K = 10^6
E2E_SRC=(--sources synthetic)  # the RecordIO sources when their data and decoders are here
if [ -z "$(why_not data decoder)" ]; then
    E2E_SRC+=(torch)
    [ -z "$(why_not nvidia.dali)" ] && E2E_SRC+=(dali)
    E2E_SRC+=(--rec "$SYN/train.rec")
fi
E2E_HK=()
[ "$SF2_EAGER" = 1 ] && E2E_HK=(--head-kwargs '{"sphereface2": {"kernel": "eager"}}')
E2E_GPU=(--launcher torchrun --device cuda --backbone iresnet50 --embedding-size 512 --backbone-kwargs '{}'
         --num-classes 1000000 --batch 128 --amp bf16 --workers 8 --warmup 3 --steps 8)
if [ "$DRY" = 1 ]; then
    shown e2e_gpu "${TORCHRUN[@]}" "${TT[@]}" "${E2E_GPU[@]}" --sources synthetic torch dali \
        --rec "$SYN/train.rec" --out "$OUT/train_throughput.json"
    step e2e "benchmarks.train_throughput" "${TORCHRUN[@]}" "${TT[@]}" --launcher torchrun --device cpu --smoke --num-classes 4096 \
        "${E2E_SRC[@]}" --out "$OUT/train_throughput.json"
else
    step e2e "cuda nccl benchmarks.train_throughput" "${TORCHRUN[@]}" "${TT[@]}" "${E2E_GPU[@]}" "${E2E_SRC[@]}" "${E2E_HK[@]}" \
        --out "$OUT/train_throughput.json"
fi

# ------------------------------------------------------------------ largest K on this GPU vs the planner
BEST='{"sphereface2": {"proxy_dtype": "bf16", "fused_update": true}}'
[ "$SF2_EAGER" = 1 ] && BEST='{"sphereface2": {"proxy_dtype": "bf16", "fused_update": true, "kernel": "eager"}}'
if [ "$DRY" = 1 ]; then
    step capacity "benchmarks.train_throughput" "$PY" "${TT[@]}" --mode capacity --smoke --device cpu --out "$OUT/capacity.json"
    step capacity_sf2_best "benchmarks.train_throughput" "$PY" "${TT[@]}" --mode capacity --smoke --device cpu --heads sphereface2 \
        --head-kwargs "$BEST" --append --out "$OUT/capacity.json"
else
    CAP_HK=()
    [ "$SF2_EAGER" = 1 ] && CAP_HK=(--head-kwargs '{"sphereface2": {"kernel": "eager"}}')
    step capacity "cuda benchmarks.train_throughput" "$PY" "${TT[@]}" --mode capacity --device cuda --embedding-size 512 --batch 128 \
        --k-start 4000000 --capacity-budget-s $((CAP[capacity] * 2 / 5)) "${CAP_HK[@]}" --out "$OUT/capacity.json"
    # SphereFace2 with the record settings: bf16 proxies + the fused in-pass update (no [n, D] gradient)
    step capacity_sf2_best "cuda benchmarks.train_throughput" "$PY" "${TT[@]}" --mode capacity --device cuda --embedding-size 512 --batch 128 \
        --heads sphereface2 --head-kwargs "$BEST" --k-start 16000000 \
        --capacity-budget-s $((CAP[capacity_sf2_best] * 3 / 4)) --append --out "$OUT/capacity.json"
fi

# ------------------------------------------------------------------ head benchmark variants (last: optional)
if [ -n "${CAP[heads_sf2_fused_bf16]:-}" ]; then  # bf16 proxies need the fused update (the head owns it)
    heads_run heads_sf2_fused_bf16 "cuda" "${VARIANT_K[@]}" --heads sphereface2 --sf2-opt fused_update=True \
        --sf2-opt proxy_dtype=bf16 "${SF2_OPT[@]}"
    if [ "$DRY" = 0 ] && [ "${HAVE_triton_kernel:-0}" != 1 ]; then  # it times the Triton kernel: nothing to time
        skip heads_sf2_fused "Triton kernel unusable: ${TRITON_WHY:-env step did not run}"
    else
        heads_run heads_sf2_fused "cuda" "${VARIANT_K[@]}" --heads sphereface2 --sf2-opt fused_update=True
    fi
    heads_run heads_sf2_fused_eager "cuda" "${VARIANT_K[@]}" --heads sphereface2 --sf2-opt fused_update=True \
        --sf2-opt kernel=eager
fi
[ -n "${CAP[heads_pfc_chunked]:-}" ] && heads_run heads_pfc_chunked "cuda" "${VARIANT_K[@]}" --heads partial_fc \
    --pfc-chunks 65536
[ -n "${CAP[heads_compile]:-}" ] && heads_run heads_compile "cuda" "${VARIANT_K[@]}" --compile "${SF2_OPT[@]}"

# ------------------------------------------------------------------ the planner beside every measurement
step annotate "fr_dist.plan benchmarks.gpu_calibrate" "$PY" -m benchmarks.gpu_calibrate annotate "$OUT"

# ------------------------------------------------------------------ summary
cat > "$OUT/summary.py" <<'EOF'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
COLS = ["step", "status", "rc", "seconds", "cap_s", "log"]
rows = [ln.split("\t") for ln in (out / "status.tsv").read_text().splitlines()[1:] if ln.strip()]
print("\n==== gpu_check summary:", out)
print(f"{'step':22s} {'status':60s} {'rc':>4s} {'s':>5s} {'cap':>5s}")
for r in rows:
    print(f"{r[0]:22s} {r[1][:60]:60s} {r[2]:>4s} {r[3]:>5s} {r[4]:>5s}")


def load(name):
    p = out / name
    try:
        return json.loads(p.read_text()) if p.exists() else None
    except ValueError:
        return None


figs = {}
m = (load("calibrate.json") or {}).get("measured", {})
if m:
    sq, hd = m.get("gemm_square_tflops", {}), m.get("gemm_head_tflops", {})
    figs["calibrate"] = (
        f"GEMM TFLOP/s square fp32 {sq.get('fp32', 0):.1f} bf16 {sq.get('bf16', 0):.1f}, head-shaped fp32 "
        f"{hd.get('fp32', 0):.1f} bf16 {hd.get('bf16', 0):.1f}; copy {m.get('copy_gbps', {}).get('gbps', 0):.0f} GB/s; "
        f"launch {m.get('launch_overhead_s', 0) * 1e6:.1f} us; outside allocator "
        f"{(m.get('memory_after') or {}).get('outside_allocator_bytes', 0) / 2**20:.0f} MiB"
    )
for f in sorted(out.glob("classifier_*.json")):
    for r in (load(f.name) or {}).get("results", []):
        peak = r.get("peak_memory_bytes") or r.get("peak_step_bytes") or 0
        chunk = f" chunk={r['chunk']}" if r.get("chunk") else ""
        figs[f"{f.stem} {r['head']} K={r['num_classes']}{chunk}"] = (
            f"{r['images_per_s']:.0f} img/s, step {r['step_time_s'] * 1e3:.2f} ms, "
            f"peak {peak / 2**30:.2f} GiB ({r.get('peak_memory_kind')})"
        )
for run in ("demo_fp16", "demo_bf16"):
    mj = out / "runs" / run / "metrics.jsonl"
    if mj.exists():
        recs = [json.loads(ln) for ln in mj.read_text().splitlines() if '"loss"' in ln]
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
for k, v in ((load("plan_vs_measured_gpu.json") or {}).get("medians") or {}).items():
    if v.get("points"):
        figs[f"planner/measured {k}"] = (
            f"{v['points']} points, median step ratio {v.get('step_ratio')}, memory ratio {v.get('memory_ratio')}"
            + (f", implied conv_efficiency {v['implied_conv_efficiency']:.3f}" if v.get("implied_conv_efficiency") else "")
        )
print()
for k, v in figs.items():
    print(f"{k:44s} {v}")
steps = [dict(zip(COLS, r)) for r in rows]
caps = [ln.split("\t") for ln in (out / "caps.tsv").read_text().splitlines() if ln.strip()]
budget = dict(budget_s=int(sys.argv[2]), reserve_s=int(sys.argv[3]), caps={n: int(c) for n, c in caps})
budget["caps_sum_s"] = sum(budget["caps"].values())
summary = dict(steps=steps, figures=figs, budget=budget, wall_s=int(sys.argv[4]))
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
bad = [r[0] for r in rows if r[1] in ("failed", "timeout")]
skipped = [r[0] for r in rows if r[1].startswith("skipped")]
print(f"\n{len(rows)} steps, {len(bad)} failed or timed out {bad or ''}, {len(skipped)} skipped; "
      f"summary.json in {out}")
EOF
"$PY" "$OUT/summary.py" "$OUT" "$BUDGET" "$RESERVE" "$((SECONDS - START))" || column -t -s $'\t' "$STATUS"
echo "gpu_check: total $((SECONDS - START))s of a ${BUDGET}s budget"
if awk -F'\t' 'NR > 1 && ($2 == "failed" || $2 == "timeout") {bad = 1} END {exit !bad}' "$STATUS"; then
    exit 1
fi
exit 0
