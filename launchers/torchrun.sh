#!/usr/bin/env bash
# Launch a dsv4 command under torchrun, on one node or many. No training logic: it only builds the torchrun
# command line from the environment, prints it and runs it.
#
#   launchers/torchrun.sh [COMMAND] [overrides...]
#
# COMMAND is a dsv4 command (pretrain, sft, grpo, distill, pipeline, eval, ...) and defaults to pretrain; the first
# argument is taken as the command when it has no "=" and does not start with "-" (Hydra overrides always have an
# "=", flags start with "-"). Everything else goes to the command unchanged.
#
# Environment (defaults in brackets):
#   NPROC_PER_NODE   processes per node [number of GPUs that nvidia-smi lists, else 1]
#   NNODES           nodes [1]. 1: torchrun --standalone (a local rendezvous on a free port).
#                    >1: c10d rendezvous; every node runs this script with the same settings.
#   RDZV_ENDPOINT    host:port of the c10d rendezvous [$MASTER_ADDR:${MASTER_PORT:-29500}]
#   MASTER_ADDR, MASTER_PORT   used for RDZV_ENDPOINT when it is not set
#   RDZV_ID          rendezvous id, the same on every node of one job [$SLURM_JOB_ID, else dsv4]
#   RDZV_BACKEND     c10d [c10d] or static; static needs NODE_RANK and MASTER_ADDR (node ranks fixed by hand,
#                    no elastic rendezvous). With c10d, NODE_RANK is not needed: ranks are assigned at rendezvous.
#   NODE_RANK        this node's rank, static backend only
#   SHUTDOWN_TIMEOUT seconds torchrun lets workers finish after forwarding a signal before it SIGKILLs them [110]
#   OMP_NUM_THREADS  threads per process [CPU cores of the node / NPROC_PER_NODE, at least 1] (set only if unset)
#   TORCHRUN         the launcher [torchrun on PATH, else the repo's .venv/bin/torchrun, else python -m
#                    torch.distributed.run]
#   TORCHRUN_ARGS    extra torchrun flags, split on spaces (e.g. "--max_restarts 0 --log_dir logs")
#   DSV4_DRY_RUN=1   print the command and exit 0 without running it
#
# Signals: torchrun forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT and (added here) SIGUSR1 to its workers and waits
# SHUTDOWN_TIMEOUT seconds for them. The trainer treats SIGTERM and SIGUSR1 as "checkpoint after this step and exit
# 0" (dsv4train/utils/signals.py); the default torchrun list lacks SIGUSR1, whose default action would kill the
# agent and orphan the workers. torchrun itself exits non-zero after a forwarded signal even when every worker
# exited 0, so a wrapper must judge the run by its run directory (summary.json), not by this script's exit code.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

cmd="pretrain"
if [[ $# -gt 0 && "$1" != -* && "$1" != *=* ]]; then
  cmd="$1"
  shift
fi

count_gpus() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    local n
    n="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    if [[ "${n:-0}" -gt 0 ]]; then
      echo "$n"
      return
    fi
  fi
  echo 1
}

nproc_per_node="${NPROC_PER_NODE:-$(count_gpus)}"
nnodes="${NNODES:-1}"
shutdown_timeout="${SHUTDOWN_TIMEOUT:-110}"

if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
  cores="$(nproc 2>/dev/null || echo 1)"
  OMP_NUM_THREADS=$((cores / nproc_per_node))
  if [[ "$OMP_NUM_THREADS" -lt 1 ]]; then OMP_NUM_THREADS=1; fi
  export OMP_NUM_THREADS
fi

if [[ -n "${TORCHRUN:-}" ]]; then
  read -r -a launcher <<<"$TORCHRUN"
elif command -v torchrun >/dev/null 2>&1; then
  launcher=(torchrun)
elif [[ -x "$REPO/.venv/bin/torchrun" ]]; then
  launcher=("$REPO/.venv/bin/torchrun")
else
  launcher=(python3 -m torch.distributed.run)
fi

args=(--nproc_per_node "$nproc_per_node")
if [[ "$nnodes" == 1 ]]; then
  args+=(--standalone)
else
  args+=(--nnodes "$nnodes")
  backend="${RDZV_BACKEND:-c10d}"
  case "$backend" in
    c10d)
      endpoint="${RDZV_ENDPOINT:-}"
      if [[ -z "$endpoint" ]]; then
        if [[ -z "${MASTER_ADDR:-}" ]]; then
          echo "launchers/torchrun.sh: NNODES=$nnodes needs RDZV_ENDPOINT=host:port or MASTER_ADDR (the head node)" >&2
          exit 2
        fi
        endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}"
      fi
      args+=(--rdzv_backend c10d --rdzv_endpoint "$endpoint" --rdzv_id "${RDZV_ID:-${SLURM_JOB_ID:-dsv4}}")
      ;;
    static)
      if [[ -z "${NODE_RANK:-}" || -z "${MASTER_ADDR:-}" ]]; then
        echo "launchers/torchrun.sh: RDZV_BACKEND=static needs NODE_RANK and MASTER_ADDR" >&2
        exit 2
      fi
      args+=(--node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}")
      ;;
    *)
      echo "launchers/torchrun.sh: RDZV_BACKEND must be c10d or static, got '$backend'" >&2
      exit 2
      ;;
  esac
fi
args+=(--signals_to_handle "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" --shutdown_timeout "$shutdown_timeout")
if [[ -n "${TORCHRUN_ARGS:-}" ]]; then
  read -r -a extra <<<"$TORCHRUN_ARGS"
  args+=("${extra[@]}")
fi

# The package is importable from any working directory (run.dir stays relative to where you launch from).
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

full=("${launcher[@]}" "${args[@]}" -m dsv4train.cli "$cmd" "$@")
echo "launchers/torchrun.sh: OMP_NUM_THREADS=$OMP_NUM_THREADS $(printf '%q ' "${full[@]}")"
if [[ "${DSV4_DRY_RUN:-0}" == 1 ]]; then
  exit 0
fi
exec "${full[@]}"
