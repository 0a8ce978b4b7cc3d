#!/usr/bin/env bash
# Submit train.sbatch / bench.sbatch with GPUs and CPUs taken from variables, checked against
# `sinfo` first: a request the partition can never satisfy fails HERE with a message, instead of
# sitting PENDING forever (Reason=PartitionConfig) or being refused for an unknown GRES.
#
#   launch/slurm/submit.sh train CONFIG [key=value ...]
#   launch/slurm/submit.sh bench
#
#   PARTITION=gpu NODES=4 GPUS_PER_NODE=8 launch/slurm/submit.sh train configs/wf42m_r50_sf2_32gpu.yaml
#   PARTITION=cpu NODES=2 CPUS_PER_TASK=16 CPU_RANKS_PER_NODE=2 launch/slurm/submit.sh train configs/demo_cpu.yaml
#
# Variables (defaults in brackets):
#   PARTITION           [the cluster's default partition]
#   NODES               [1]
#   GPUS_PER_NODE       [every GPU of the partition's nodes (GRES gpu:N); 0 on a partition without GPUs]
#   CPUS_PER_TASK       [all CPUs of the partition's smallest node; the one task per node runs torchrun]
#   CPU_RANKS_PER_NODE  [1] ranks per node when GPUS_PER_NODE=0 (OMP threads = CPUS_PER_TASK / ranks)
#   TIME                [the partition's limit] e.g. 24:00:00
#   PREEMPT_WARNING_S   [120] seconds of warning before the time limit / preemption (--signal=B:USR1@S)
#   SBATCH_ARGS         extra sbatch options, e.g. "--account=x --qos=y --exclude=node7"
#   DRY_RUN=1           print the sbatch command instead of running it
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ $# -lt 1 || ! "$1" =~ ^(train|bench)$ ]]; then
  echo "usage: $0 train CONFIG [key=value ...] | $0 bench" >&2
  exit 2
fi
KIND="$1"
shift
die() {
  echo "submit: $*" >&2
  exit 2
}
command -v sinfo >/dev/null || die "sinfo not found: is this a Slurm login node?"

if [[ -z "${PARTITION:-}" ]]; then
  PARTITION=$(sinfo -h -o '%P' | sed -n 's/\*$//p' | head -n1)
  [[ -n "$PARTITION" ]] || die "no default partition: set PARTITION (have: $(sinfo -h -o '%P' | sort -u | paste -sd' ' -))"
fi
# one line per node group: CPUs|GRES|nodes|time limit
info=$(sinfo -h -p "$PARTITION" -o '%c|%G|%D|%l' 2>/dev/null || true)
[[ -n "$info" ]] || die "partition '$PARTITION' not found (have: $(sinfo -h -o '%P' | tr -d '*' | sort -u | paste -sd' ' -))"
min_cpus=$(cut -d'|' -f1 <<<"$info" | sed 's/+//' | sort -n | head -n1)
total_nodes=$(cut -d'|' -f3 <<<"$info" | awk '{s += $1} END {print s + 0}')
gres=$(cut -d'|' -f2 <<<"$info" | sort -u | paste -sd' ' -)
# GPUs per node: the smallest gpu:N (or gpu:type:N) count among the node groups, 0 without GPUs
part_gpus=$(cut -d'|' -f2 <<<"$info" | while read -r g; do
  n=$(grep -o 'gpu:[^,(]*' <<<"$g" | head -n1 | awk -F: '{print $NF}')
  echo "${n:-0}"
done | sort -n | head -n1)
part_gpus="${part_gpus:-0}"

NODES="${NODES:-1}"
GPUS_PER_NODE="${GPUS_PER_NODE:-$part_gpus}"
CPUS_PER_TASK="${CPUS_PER_TASK:-$min_cpus}"
CPU_RANKS_PER_NODE="${CPU_RANKS_PER_NODE:-1}"
PREEMPT_WARNING_S="${PREEMPT_WARNING_S:-120}"

((NODES <= total_nodes)) || die "NODES=$NODES but partition '$PARTITION' has $total_nodes node(s)"
((CPUS_PER_TASK <= min_cpus)) || die "CPUS_PER_TASK=$CPUS_PER_TASK but the nodes of partition '$PARTITION'" \
  "have $min_cpus CPU(s): the job would stay PENDING (Reason=PartitionConfig). Set CPUS_PER_TASK<=$min_cpus."
if ((GPUS_PER_NODE > 0)); then
  ((part_gpus > 0)) || die "GPUS_PER_NODE=$GPUS_PER_NODE but partition '$PARTITION' has no GPUs (GRES: $gres):" \
    "use GPUS_PER_NODE=0 (CPU ranks, CPU_RANKS_PER_NODE) or a GPU partition."
  ((GPUS_PER_NODE <= part_gpus)) || die "GPUS_PER_NODE=$GPUS_PER_NODE but the nodes of '$PARTITION' have $part_gpus GPU(s)."
  ranks="$GPUS_PER_NODE GPU(s)"
else
  ((CPU_RANKS_PER_NODE <= CPUS_PER_TASK)) || die "CPU_RANKS_PER_NODE=$CPU_RANKS_PER_NODE > CPUS_PER_TASK=$CPUS_PER_TASK"
  ranks="$CPU_RANKS_PER_NODE CPU rank(s)"
fi

args=(--partition="$PARTITION" --nodes="$NODES" --ntasks-per-node=1 --cpus-per-task="$CPUS_PER_TASK"
  --signal="B:USR1@$PREEMPT_WARNING_S")
((GPUS_PER_NODE > 0)) && args+=(--gpus-per-node="$GPUS_PER_NODE")
[[ -n "${TIME:-}" ]] && args+=(--time="$TIME")
# shellcheck disable=SC2206  # SBATCH_ARGS is a list of options
args+=(${SBATCH_ARGS:-})
export GPUS_PER_NODE CPU_RANKS_PER_NODE FR_DIST_ROOT="${FR_DIST_ROOT:-$ROOT}"
echo "submit: $KIND on '$PARTITION': $NODES node(s) x $ranks, $CPUS_PER_TASK CPU(s) per node task" >&2
cmd=(sbatch "${args[@]}" "$ROOT/launch/slurm/$KIND.sbatch" "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
else
  exec "${cmd[@]}"
fi
