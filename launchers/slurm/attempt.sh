#!/usr/bin/env bash
# Sourced by the sbatch files (launchers/slurm/pretrain.sbatch, launchers/ray/grpo.sbatch): one attempt of a run
# that a signal may stop early, and the requeue decision after it.
#
#   attempt_begin "$RUN_DIR"            before the run: a marker file, so only a summary.json newer than it counts
#   attempt_end "$RUN_DIR" "$rc"        after it: exits the script with the right code, requeueing when due
#
# attempt_end requeues the job (`scontrol requeue`) when THIS attempt's summary.json says a signal stopped the run
# early (preempted_by set, steps_done < steps_total), up to MAX_REQUEUES (default 50) restarts. A finished run exits
# 0; a crash (no fresh summary.json) is not requeued, so a broken run does not loop, and exits non-zero.

attempt_marker() { echo "$1/.attempt-${SLURM_JOB_ID:-0}-${SLURM_RESTART_COUNT:-0}"; }

attempt_begin() {
  mkdir -p "$1"
  touch "$(attempt_marker "$1")"
}

attempt_end() {
  local run_dir="$1" rc="$2" marker summary fresh=0 unfinished=0
  marker="$(attempt_marker "$run_dir")"
  summary="$run_dir/summary.json"
  if [[ -f "$summary" && "$summary" -nt "$marker" ]]; then
    fresh=1
    unfinished="$(python3 -c 'import json, sys
s = json.load(open(sys.argv[1]))
print(int(bool(s.get("preempted_by")) and s["steps_done"] < s["steps_total"]))' "$summary" 2>/dev/null || echo 0)"
  fi
  rm -f "$marker"
  if [[ "$unfinished" == 1 ]]; then
    if [[ "${SLURM_RESTART_COUNT:-0}" -lt "${MAX_REQUEUES:-50}" ]]; then
      echo "dsv4 sbatch: stopped early (exit $rc); requeueing job ${SLURM_JOB_ID:-?} to resume from $run_dir"
      scontrol requeue "${SLURM_JOB_ID:?}"
      exit 0
    fi
    echo "dsv4 sbatch: stopped early but already requeued ${MAX_REQUEUES:-50} times; not requeueing" >&2
    exit 1
  fi
  if [[ "$fresh" == 1 ]]; then
    echo "dsv4 sbatch: run finished (exit $rc); summary in $summary"
    exit 0
  fi
  echo "dsv4 sbatch: run failed (exit $rc, no fresh summary.json); not requeued; see the log above" >&2
  if [[ "$rc" == 0 ]]; then rc=1; fi
  exit "$rc"
}
