# Sourced by the sbatch templates in this folder (not run on its own). One `srun` task per GPU, each
# taking its rank from SLURM (mst_ds.cluster); the run stops with a checkpoint MARGIN_MIN minutes before
# the job's time limit and the job requeues itself until the run is finished. SIGTERM (preemption,
# scancel, the time limit) and SIGUSR1 (--signal=USR1@300, if the margin was not enough) make every rank
# finish its step, save it and exit 75, on which the job requeues; a preempted job is requeued by SLURM
# (--requeue). Either way it resumes from the newest complete checkpoint of the same run directory,
# bit-identically (README, "Resume" and "Reliability").
#
# Expects: MST_DS_ROOT (the repository, default: the submit directory), PRESET, RUN_DIR, SETS (array of
# --set k=v); optional MARGIN_MIN (default 15).
set -euo pipefail
cd "${MST_DS_ROOT:-$SLURM_SUBMIT_DIR}"
[[ -x .venv/bin/mst-ds ]] || { echo "mst-ds: error: no .venv/bin/mst-ds in $PWD (run scripts/setup.sh; set MST_DS_ROOT)" >&2; exit 2; }
. .venv/bin/activate

# Loader workers per rank: the task's cores minus the one that runs the training step. data.num_workers
# is part of the run's identity (each worker reads its own slice of the epoch): keep --cpus-per-task
# unchanged for the life of a run directory.
workers=$(( ${SLURM_CPUS_PER_TASK:-2} > 1 ? ${SLURM_CPUS_PER_TASK:-2} - 1 : 0 ))

# Minutes this job may train: until MARGIN_MIN before its end (SLURM_JOB_END_TIME, Slurm ≥ 23.02;
# else squeue's time left, [D-]HH:MM:SS, or UNLIMITED / NOT_SET without a limit). run.time_limit_min does
# not change the config hash.
margin=${MARGIN_MIN:-15}
left=""
if [[ -n "${SLURM_JOB_END_TIME:-}" ]]; then
  left=$(( (SLURM_JOB_END_TIME - $(date +%s)) / 60 ))
else
  time_left=$(squeue -h -j "$SLURM_JOB_ID" -o %L)
  if [[ "$time_left" =~ ^([0-9]+-)?([0-9]+:){0,2}[0-9]+$ ]]; then
    left=$(awk -F'[-:]' '{ n = NF; m = $(n-1) + 60 * (n > 2 ? $(n-2) : 0) + 1440 * (n > 3 ? $(n-3) : 0); print m }' <<< "$time_left")
  fi
fi
time_limit=()
if [[ -n "$left" ]]; then
  limit=$(( left - margin ))
  (( limit > 0 )) || { echo "mst-ds: error: $left min left in this job, less than the ${margin}-min margin" >&2; exit 2; }
  time_limit=(--set run.time_limit_min="$limit")
fi

echo "mst-ds: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NUM_NODES node(s), $SLURM_NTASKS tasks," \
     "$workers loader workers per task, training for up to ${limit:-unlimited} min into $RUN_DIR"

set +e
srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
  mst-ds train --preset "$PRESET" --run-dir "$RUN_DIR" "${SETS[@]}" \
  --set data.num_workers="$workers" "${time_limit[@]}"
rc=$?
set -e
if [[ $rc -eq 0 ]]; then
  python -m mst_ds.cluster finished "$RUN_DIR" && echo "mst-ds: run finished" && exit 0
  [[ $? -eq 3 ]] || exit 1
  echo "mst-ds: stopped at the time limit with a checkpoint; requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
elif [[ $rc -eq 75 ]]; then  # mst_ds.job.EXIT_STOPPED: SIGTERM/SIGUSR1, every rank saved its last step
  echo "mst-ds: stopped by a signal with a checkpoint of the last step; requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit $rc
