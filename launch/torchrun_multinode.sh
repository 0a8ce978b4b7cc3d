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
#   NNODES          $SLURM_JOB_NUM_NODES, else 1. A range MIN:MAX ("1:2", "2:4") makes the job
#                   elastic (torchrun --nnodes=MIN:MAX, c10d rendezvous): a lost node's peers
#                   re-form the group without it (one of MAX_RESTARTS) and a node started later
#                   joins at the next restart (torchrun restarts the workers when a node waits; that
#                   does not count as a restart). The ranks resume from the newest checkpoint
#                   (checkpoint.resume=auto), re-sharding the classifier to the new world size; the
#                   batch / LR policy is train.on_resize. Node 0 hosts the rendezvous store: the job
#                   survives the loss of any node but node 0.
#   NODE_RANK       $SLURM_NODEID, else unset. The c10d rendezvous assigns ranks itself; the node
#                   rank only decides which node HOSTS the rendezvous store (node 0, is_host=1),
#                   which avoids guessing from hostnames when the endpoint is an IP / alias.
#   RDZV_ENDPOINT   $MASTER_ADDR:$MASTER_PORT (port default 29400); required with NNODES > 1
#   RDZV_ID         $SLURM_JOB_ID, else "fr_dist" (must be the same on all nodes, unique per job)
#   MAX_RESTARTS    torchrun group restarts on failure (default 0); resume with checkpoint.resume=auto
#   PYTHON          interpreter with fr_dist installed (default .venv/bin/python if present, else python3)
#   TORCHRUN_ARGS   extra torchrun options
#   RDZV_TIMEOUT    seconds a node waits for its peers (default 300): a node other than 0 first waits
#                   this long for node 0's rendezvous store to accept, then fails naming the address;
#                   it is also torchrun's join_timeout (--rdzv-conf)
#   RDZV_READ_TIMEOUT  rendezvous store operations (torchrun read_timeout, default 60)
#   RDZV_LAST_CALL_TIMEOUT  elastic jobs: seconds the rendezvous waits for more nodes once MIN have
#                   joined (torchrun's last_call_timeout, default 30): part of every re-forming
#   EXIT_BARRIER_TIMEOUT  seconds a finished node's agent waits for the other agents before it exits
#                   (torch's exit barrier; 300 s in torch, no torchrun option: fr_dist.launch sets it
#                   from FR_DIST_EXIT_BARRIER_TIMEOUT). Default here 60: fr_dist's ranks finish
#                   together (shutdown barrier), and a peer agent that died after the end is not
#                   waited for 5 minutes.
#   LOCAL_ADDR      this node's address for --local-addr (default: the address that routes to the
#                   rendezvous host); the workers' MASTER_ADDR is node 0's LOCAL_ADDR
#   FR_DIST_COMMAND fr-dist subcommand run on every rank (default train; `doctor` = pre-flight)
#   FR_DIST_SCRIPT  run this Python script on every rank instead
#   FR_DIST_MODULE  or this module (python -m), e.g. benchmarks.classifier
#
# Multi-node (NNODES > 1) pre-flight, before torchrun starts (fr_dist.doctor launch-env):
#   * the rendezvous host is resolved ON THIS NODE; a loopback answer (Debian's "127.0.1.1 host"
#     line in /etc/hosts, most containers) or no answer stops the launch with exit code 3 and
#     the fix, instead of a job in which every node waits forever;
#   * --local-addr=<this node's routable address> is passed, so the address torchrun advertises
#     (and the workers' MASTER_ADDR) is not whatever the hostname resolves to;
#   * GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME, when unset, are set to the interface that owns that
#     address (gloo otherwise binds the hostname's address, 127.0.1.1 on such hosts);
#   * nodes other than 0 wait at most RDZV_TIMEOUT s for the store and then exit 3 naming it.
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
# With the shared store, a restart under --max-restarts read the previous attempt's addresses
# (no per-attempt prefix): "connection refused" to a dead rank or a hang in gloo's connection
# set-up in 3 of 5 SIGKILL-a-rank trials; with the variable 5 of 5 restarts worked. (fr_dist now
# also prefixes its process-group keys per attempt when the variable is unset: belt and braces.)
#
# torchrun runs as `python -m fr_dist.launch` (torchrun's own main, same arguments): after a
# graceful stop (SIGTERM / SIGUSR1 -> every local rank checkpointed and exited 0) it exits 0 with
# "fr_dist.launch: stopped gracefully by SIGTERM at step N, checkpoint ..." instead of torchrun's 1.
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
[[ "$RDZV_ENDPOINT" == *:* ]] || RDZV_ENDPOINT="$RDZV_ENDPOINT:29400"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
# Every worker restart of `--max-restarts` then gets a fresh process-group store (see header).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONUNBUFFERED=1

RDZV_TIMEOUT="${RDZV_TIMEOUT:-300}"
RDZV_READ_TIMEOUT="${RDZV_READ_TIMEOUT:-60}"
RDZV_CONF="join_timeout=$RDZV_TIMEOUT,read_timeout=$RDZV_READ_TIMEOUT"
if [[ -n "${RDZV_LAST_CALL_TIMEOUT:-}" ]]; then RDZV_CONF="$RDZV_CONF,last_call_timeout=$RDZV_LAST_CALL_TIMEOUT"; fi
export FR_DIST_EXIT_BARRIER_TIMEOUT="${EXIT_BARRIER_TIMEOUT:-${FR_DIST_EXIT_BARRIER_TIMEOUT:-60}}"
if [[ -n "$NODE_RANK" ]]; then
  if [[ "$NODE_RANK" == "0" ]]; then RDZV_CONF="is_host=1,$RDZV_CONF"; else RDZV_CONF="is_host=0,$RDZV_CONF"; fi
fi
LOCAL_ADDR_ARG=()
if [[ ! "$NNODES" =~ ^[0-9]+(:[0-9]+)?$ ]]; then
  echo "torchrun_multinode: NNODES=$NNODES: give a node count N or an elastic range MIN:MAX (e.g. 1:2)" >&2
  exit 2
fi
NNODES_MIN="${NNODES%%:*}"
NNODES_MAX="${NNODES##*:}"
if [[ "$NNODES_MIN" -lt 1 || "$NNODES_MAX" -lt "$NNODES_MIN" ]]; then
  echo "torchrun_multinode: NNODES=$NNODES: need 1 <= MIN <= MAX" >&2
  exit 2
fi
if [[ "$NNODES" == *:* && "${MAX_RESTARTS:-0}" == 0 ]]; then
  echo "torchrun_multinode: NNODES=$NNODES is elastic but MAX_RESTARTS=0: a lost node ends the job (set MAX_RESTARTS >= 1 to re-form without it)" >&2
fi
if [[ "$NNODES_MIN" -gt 1 || "$NNODES" == *:* ]]; then
  # Multi-node: resolve the rendezvous host HERE; refuse loopback (127.0.1.1 <hostname> in
  # /etc/hosts) instead of hanging; pass this node's routable address (--local-addr) and pin
  # gloo/NCCL to the interface that owns it unless GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME are set.
  # A node other than 0 first waits (at most RDZV_TIMEOUT s) until the rendezvous store accepts.
  probe=0
  if [[ -n "$NODE_RANK" && "$NODE_RANK" != "0" ]]; then probe="$RDZV_TIMEOUT"; fi
  if ! net_env=$("$PYTHON" -m fr_dist.doctor launch-env --endpoint "$RDZV_ENDPOINT" \
    --nnodes "$((NNODES_MAX > 2 ? NNODES_MAX : 2))" --probe "$probe"); then
    echo "torchrun_multinode: refusing to start on $(hostname) (node ${NODE_RANK:-?}): see the message above" >&2
    exit 3
  fi
  eval "$net_env"
  [[ -n "${GLOO_SOCKET_IFNAME:-}" ]] && export GLOO_SOCKET_IFNAME
  [[ -n "${NCCL_SOCKET_IFNAME:-}" ]] && export NCCL_SOCKET_IFNAME
  if [[ -n "${LOCAL_ADDR:-}" ]]; then LOCAL_ADDR_ARG=(--local-addr="$LOCAL_ADDR"); fi
  # the endpoint as the resolved IP: every node and torchrun itself then use the same address
  if [[ -n "${RDZV_ADDR:-}" && "$RDZV_ADDR" != *:* ]]; then RDZV_ENDPOINT="$RDZV_ADDR:${RDZV_ENDPOINT##*:}"; fi
fi

echo "torchrun_multinode: node ${NODE_RANK:-?} of $NNODES$([[ "$NNODES" == *:* ]] && echo " (elastic, max restarts ${MAX_RESTARTS:-0})") on $(hostname) (${LOCAL_ADDR:-local}), $NPROC_PER_NODE rank(s)/node," \
  "rendezvous $RDZV_ENDPOINT (id $RDZV_ID, timeout ${RDZV_TIMEOUT}s)," \
  "gloo if ${GLOO_SOCKET_IFNAME:-auto}, NCCL if ${NCCL_SOCKET_IFNAME:-auto}: ${FR_DIST_MODULE:-${FR_DIST_SCRIPT:-fr-dist ${FR_DIST_COMMAND:-train}}} ${ARGS[*]}" >&2
# what each rank runs: `fr-dist train` (FR_DIST_COMMAND=doctor for the pre-flight), or a script
if [[ -n "${FR_DIST_MODULE:-}" ]]; then ENTRY=(-m "$FR_DIST_MODULE"); elif [[ -n "${FR_DIST_SCRIPT:-}" ]]; then ENTRY=("$FR_DIST_SCRIPT"); else ENTRY=(-m fr_dist.cli "${FR_DIST_COMMAND:-train}"); fi
# shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of options
exec "$PYTHON" -m fr_dist.launch \
  --nnodes="$NNODES" \
  --nproc-per-node="$NPROC_PER_NODE" \
  --rdzv-backend=c10d \
  --rdzv-endpoint="$RDZV_ENDPOINT" \
  --rdzv-id="$RDZV_ID" \
  --rdzv-conf="$RDZV_CONF" \
  "${LOCAL_ADDR_ARG[@]}" \
  --max-restarts="${MAX_RESTARTS:-0}" \
  ${TORCHRUN_ARGS:-} \
  "${ENTRY[@]}" "${ARGS[@]}"
