#!/usr/bin/env bash
# Multi-node training: run this once on EVERY node; torchrun's c10d rendezvous forms the job.
#
#   launch/torchrun_multinode.sh [NPROC_PER_NODE] [--nnodes N] [--node-rank R]
#                                [--rdzv-endpoint HOST:PORT] [--rdzv-id ID] [--]
#                                --config configs/RECIPE.yaml [key=value ...]
#
# e.g. 4 nodes x 8 GPUs, node0 reachable as gpu001:
#   gpu001$ NNODES=4 NODE_RANK=0 RDZV_ENDPOINT=gpu001:29400 launch/torchrun_multinode.sh 8 --config configs/wf42m_r50_sf2_32gpu.yaml
#   gpu002$ NNODES=4 NODE_RANK=1 RDZV_ENDPOINT=gpu001:29400 launch/torchrun_multinode.sh 8 --config configs/wf42m_r50_sf2_32gpu.yaml
#   ...     (same command, NODE_RANK=2, 3)
#
# Arguments win over the environment; unset values fall back to:
#   NPROC_PER_NODE  visible GPUs (nvidia-smi -L), else 1
#   NNODES          $SLURM_JOB_NUM_NODES, else 1 (a range "2:4" makes the job elastic)
#   NODE_RANK       $SLURM_NODEID, else unset. The c10d rendezvous assigns ranks itself; the node
#                   rank only decides which node HOSTS the rendezvous store (node 0, is_host=1),
#                   which avoids guessing from hostnames when the endpoint is an IP / alias.
#   RDZV_ENDPOINT   $MASTER_ADDR:$MASTER_PORT (port default 29400); required with NNODES > 1
#   RDZV_ID         $SLURM_JOB_ID, else "fr_dist" (must be the same on all nodes, unique per job)
#   MAX_RESTARTS    torchrun group restarts on failure (default 0); resume with checkpoint.resume=auto
#   PYTHON          interpreter with fr_dist installed (default .venv/bin/python if present, else python3)
#   TORCHRUN_ARGS   extra torchrun options
#
# Network variables (export them before calling this script, or in the sbatch file):
#   NCCL_SOCKET_IFNAME=ib0|eth0|^lo,docker0  NIC for NCCL's bootstrap / socket transport. Set it
#                                     when nodes have several interfaces (docker0, virbr0, an
#                                     unroutable management NIC): a wrong guess shows up as a hang
#                                     in the first all_reduce or "Connection refused" / timeouts.
#   GLOO_SOCKET_IFNAME=eth0           the same for gloo (CPU runs, and gloo side channels).
#   NCCL_IB_HCA=mlx5_0,mlx5_1         which InfiniBand / RoCE adapters NCCL uses (default: all).
#   NCCL_IB_DISABLE=1                 no InfiniBand: force TCP sockets (slow; debugging / Ethernet-only).
#   NCCL_IB_GID_INDEX=3               RoCE v2 GID index on many Ethernet fabrics.
#   NCCL_IB_TIMEOUT=22, NCCL_IB_RETRY_CNT=10   more tolerant IB timeouts on congested fabrics.
#   NCCL_NET_GDR_LEVEL=PHB            GPUDirect RDMA policy (topology dependent).
#   NCCL_DEBUG=INFO (NCCL_DEBUG_SUBSYS=INIT,NET)  print the chosen interfaces/transports: the first
#                                     thing to look at when a multi-node job hangs at start.
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=1 turn a stuck collective into an error after the timeout.
#
# TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (set below): the workers' process group gets its own
# TCPStore (hosted by global rank 0 on a free port of its node) instead of reusing the agent's
# c10d rendezvous store, which torchrun shares with the workers by default since torch 2.4.
# The separate store is the long-standing behaviour and sidesteps problems reported with the
# shared one (workers and agents contending on one store, restarts of the worker group).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then
  NPROC_PER_NODE="$1"
  shift
fi
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nnodes) NNODES="$2"; shift 2 ;;
    --nnodes=*) NNODES="${1#*=}"; shift ;;
    --node-rank) NODE_RANK="$2"; shift 2 ;;
    --node-rank=*) NODE_RANK="${1#*=}"; shift ;;
    --rdzv-endpoint) RDZV_ENDPOINT="$2"; shift 2 ;;
    --rdzv-endpoint=*) RDZV_ENDPOINT="${1#*=}"; shift ;;
    --rdzv-id) RDZV_ID="$2"; shift 2 ;;
    --rdzv-id=*) RDZV_ID="${1#*=}"; shift ;;
    --nproc-per-node) NPROC_PER_NODE="$2"; shift 2 ;;
    --nproc-per-node=*) NPROC_PER_NODE="${1#*=}"; shift ;;
    --) shift; ARGS+=("$@"); break ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
if [[ ${#ARGS[@]} -eq 0 ]]; then
  echo "usage: $0 [NPROC_PER_NODE] [--nnodes N] [--node-rank R] [--rdzv-endpoint HOST:PORT] --config CONFIG [key=value ...]" >&2
  exit 2
fi

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=0
  if command -v nvidia-smi >/dev/null 2>&1; then
    NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  fi
  [[ "$NPROC_PER_NODE" -gt 0 ]] || NPROC_PER_NODE=1
fi
NNODES="${NNODES:-${SLURM_JOB_NUM_NODES:-1}}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-}}"
RDZV_ID="${RDZV_ID:-${SLURM_JOB_ID:-fr_dist}}"
if [[ -z "${RDZV_ENDPOINT:-}" ]]; then
  if [[ -n "${MASTER_ADDR:-}" ]]; then
    RDZV_ENDPOINT="${MASTER_ADDR}:${MASTER_PORT:-29400}"
  elif [[ "$NNODES" == "1" ]]; then
    RDZV_ENDPOINT="localhost:29400"
  else
    echo "torchrun_multinode: set RDZV_ENDPOINT=HOST:PORT (or --rdzv-endpoint, or MASTER_ADDR) -- the same on every node" >&2
    exit 2
  fi
fi
RDZV_CONF=""
if [[ -n "$NODE_RANK" ]]; then
  if [[ "$NODE_RANK" == "0" ]]; then RDZV_CONF="--rdzv-conf=is_host=1"; else RDZV_CONF="--rdzv-conf=is_host=0"; fi
fi

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONUNBUFFERED=1

echo "torchrun_multinode: node ${NODE_RANK:-?} of $NNODES on $(hostname), $NPROC_PER_NODE rank(s)/node," \
  "rendezvous $RDZV_ENDPOINT (id $RDZV_ID): fr-dist train ${ARGS[*]}" >&2
# shellcheck disable=SC2086  # RDZV_CONF / TORCHRUN_ARGS are option lists
exec "$PYTHON" -m torch.distributed.run \
  --nnodes="$NNODES" \
  --nproc-per-node="$NPROC_PER_NODE" \
  --rdzv-backend=c10d \
  --rdzv-endpoint="$RDZV_ENDPOINT" \
  --rdzv-id="$RDZV_ID" \
  $RDZV_CONF \
  --max-restarts="${MAX_RESTARTS:-0}" \
  ${TORCHRUN_ARGS:-} \
  -m fr_dist.cli train "${ARGS[@]}"
