#!/usr/bin/env bash
# Recipe pretrain-1b-8gpu: 8 GPUs on one node (dp4 × ep2), or the same job under Slurm.
#
#   recipes/pretrain-1b-8gpu/launch.sh [overrides]          # this node, torchrun --standalone
#   SLURM=1 recipes/pretrain-1b-8gpu/launch.sh [overrides]  # sbatch, 1 node × 8 GPUs, requeued on preemption
#
# Re-running the same command resumes from runs/pretrain-1b-8gpu (run.dir in config.yaml). Extra arguments are
# Hydra overrides, e.g. `train.steps=100 run.dir=runs/smoke`. No training logic here.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
RECIPE="$REPO/recipes/pretrain-1b-8gpu"
cd "$REPO"

if [[ "${SLURM:-0}" == 1 ]]; then
  # The sbatch file sets run.dir from the job name; pass the recipe's so a resubmission resumes the same run.
  exec sbatch --job-name=pretrain-1b-8gpu --nodes=1 --gpus-per-node=8 \
    --export=ALL,RUN_DIR="$REPO/runs/pretrain-1b-8gpu" \
    launchers/slurm/pretrain.sbatch --config-dir "$RECIPE" --config-name config "$@"
fi
NPROC_PER_NODE="${NPROC_PER_NODE:-8}" exec launchers/torchrun.sh pretrain --config-dir "$RECIPE" --config-name config "$@"
