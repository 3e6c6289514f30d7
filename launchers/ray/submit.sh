#!/usr/bin/env bash
# Submit `dsv4 grpo` to a running Ray cluster with `ray job submit`: the driver then runs on the head node, under
# the cluster's Ray, and joins it (grpo.ray_address=auto).
#
#   RAY_ADDRESS=http://head-node:8265 launchers/ray/submit.sh grpo.init=/shared/runs/sft grpo.tasks=[math] \
#       run.dir=/shared/runs/grpo-math
#
# Everything after the script name is passed to `dsv4 grpo` ("$@"), then grpo.ray_address=auto. The head must run
# Ray's dashboard, which serves job submission (`ray start --head --include-dashboard=true`, which needs
# `pip install 'ray[default]==2.60.0'`; launchers/ray/grpo.sbatch with RAY_DASHBOARD=1).
#
# The runtime env (printed before submitting; the ray docs' "runtime environments"):
# - working_dir: this checkout (WORKING_DIR), uploaded to the cluster, without .git, .venv, runs/, data/ and
#   checkpoints; the job runs `python -m dsv4train.cli` from there, so the cluster runs this code, not whatever is
#   installed on it. Ray refuses a working_dir over its upload limit: keep data out of the checkout.
# - env_vars: OMP_NUM_THREADS (default 1: each actor is one CPU of Ray's) and PYTHONPATH=. (the uploaded code).
# - The cluster's Python must have dsv4train's dependencies (torch, ray, ...): install them on every node
#   (`pip install -e '.[ray]'`) or run the nodes from one image. PIP_PACKAGES="a b" adds a `pip` field instead,
#   which installs them per job (slow; no CUDA wheels on CPU nodes).
# - run.dir must be an absolute path on storage the head node and every rollout node see: the job's working dir is
#   a temporary copy that Ray deletes, so a relative run.dir is refused here.
#
# JOB_ID names the submission (ray job submit --submission-id); NO_WAIT=1 returns at once instead of following the
# logs (`ray job logs -f JOB_ID` later). DSV4_DRY_RUN=1 prints the command without running it.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
RAY="${RAY:-ray}"
RAY_ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
WORKING_DIR="${WORKING_DIR:-$REPO}"
OMP="${OMP_NUM_THREADS:-1}"

run_dir=""
for arg in "$@"; do
  case "$arg" in run.dir=*) run_dir="${arg#run.dir=}" ;; esac
done
if [[ "$run_dir" != /* ]]; then
  echo "launchers/ray/submit.sh: run.dir must be an absolute path on storage every node sees (got '${run_dir}');" \
       "the job runs in a temporary copy of the code that Ray deletes afterwards" >&2
  exit 2
fi

runtime_env="$(python3 - "$WORKING_DIR" "$OMP" "${PIP_PACKAGES:-}" <<'PY'
import json, sys
working_dir, omp, pip = sys.argv[1:4]
env = {
    "working_dir": working_dir,
    "excludes": [".git", ".venv", "runs", "data", "*.pt", "*.safetensors", "__pycache__"],
    "env_vars": {"OMP_NUM_THREADS": omp, "PYTHONPATH": "."},
}
if pip:
    env["pip"] = pip.split()
print(json.dumps(env))
PY
)"

cmd=("$RAY" job submit --address "$RAY_ADDRESS" --runtime-env-json "$runtime_env")
if [[ -n "${JOB_ID:-}" ]]; then cmd+=(--submission-id "$JOB_ID"); fi
if [[ -n "${NO_WAIT:-}" ]]; then cmd+=(--no-wait); fi
cmd+=(-- python -m dsv4train.cli grpo "$@" grpo.ray_address=auto)

echo "launchers/ray/submit.sh: $(printf '%q ' "${cmd[@]}")"
if [[ -n "${DSV4_DRY_RUN:-}" ]]; then exit 0; fi
exec "${cmd[@]}"
