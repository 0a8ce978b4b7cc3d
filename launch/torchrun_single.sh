#!/usr/bin/env bash
# Single-node training: NPROC ranks of `fr-dist train` under torchrun (one per GPU, or CPU ranks).
#
#   launch/torchrun_single.sh [NPROC] --config configs/RECIPE.yaml [key=value ...]
#
#   NPROC   first argument when it is a number; else $NPROC; else the number of visible GPUs
#           (nvidia-smi -L, restricted by CUDA_VISIBLE_DEVICES); else 2 (CPU demo).
#   Everything else goes to `fr-dist train` unchanged, e.g.
#           launch/torchrun_single.sh 8 --config configs/ms1mv3_r50_sf2.yaml output_dir=runs/r50
#           launch/torchrun_single.sh 2 --config configs/demo_cpu.yaml train.max_steps=50
#
# Environment:
#   PYTHON            interpreter with fr_dist installed (default: .venv/bin/python if present, else python3)
#   OMP_NUM_THREADS   intra-op threads per rank (default 1, as torchrun; raise it for CPU ranks on big hosts)
#   MAX_RESTARTS      torchrun restarts of the whole worker group on a failure (default 0); with
#                     checkpoint.resume=auto a restart continues from the newest checkpoint
#   TORCHRUN_ARGS     extra torchrun options (e.g. "--log-dir runs/logs --redirects 3")
#
# --standalone runs a private c10d rendezvous on a free local port, so several jobs can share
# a node. For several nodes use launch/torchrun_multinode.sh.
#
# torchrun is started as `python -m fr_dist.launch` (torchrun's own main, same arguments): after a
# stop signal (kill -TERM <this pid>, a scheduler) the ranks checkpoint and exit 0, and so does the
# launcher ("fr_dist.launch: stopped gracefully by SIGTERM at step N, checkpoint ..."); plain
# torchrun exits 1 there. TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives every --max-restarts attempt
# a fresh process-group store (fr_dist also prefixes its keys per attempt when the variable is unset).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then
  NPROC="$1"
  shift
fi
if [[ -z "${NPROC:-}" ]]; then
  NPROC=0
  if command -v nvidia-smi >/dev/null 2>&1; then
    NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
      IFS=',' read -r -a _visible <<<"$CUDA_VISIBLE_DEVICES"
      NPROC=${#_visible[@]}
    fi
  fi
  [[ "$NPROC" -gt 0 ]] || NPROC=2
fi
if [[ $# -eq 0 ]]; then
  echo "usage: $0 [NPROC] --config configs/RECIPE.yaml [key=value ...]" >&2
  exit 2
fi

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONUNBUFFERED=1
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

echo "torchrun_single: $NPROC rank(s) on $(hostname): fr-dist train $*" >&2
# shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of options
exec "$PYTHON" -m fr_dist.launch \
  --standalone \
  --nnodes=1 \
  --nproc-per-node="$NPROC" \
  --max-restarts="${MAX_RESTARTS:-0}" \
  ${TORCHRUN_ARGS:-} \
  -m fr_dist.cli train "$@"
