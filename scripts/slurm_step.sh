# Sourced by scripts/slurm_train.sbatch and scripts/slurm_multinode.sbatch (not run on its own).
#
#   run_step <command...>    runs the training step (srun ...), forwards SLURM's warning signal to it,
#                            requeues the job only if training stopped for that signal (exit 75) and
#                            exits with the step's exit code
#
# Exit codes of scripts/train.py: 0 done, 2 bad input, 3 training diverged, 75 stopped by a signal after a
# checkpoint. Only 75 requeues: a failed run (1, 2, 3, a kill by the OOM killer: 137) would fail again, and
# a run that finished inside the warning time (0) has nothing left to do.
#
# Under `accelerate launch` the workers exit 75 but torch's launcher, signalled too, exits 1 (143 when only it
# was signalled; README, "Nothing lost"), so a step that ended nonzero AFTER the signal counts as 75 when the
# run directory holds a checkpoint saved for the stop signal that was not there when the step started: its
# workers stopped as asked. (Compared by file and mtime, not by clock: a shared file system's server clock
# may differ from this node's.)
# Needs RUN_DIR (the run directory) and SLURM_JOB_ID.

on_signal() {
    echo "signal received: asking the training step to checkpoint and stop"
    SIGNALLED=1
    kill -TERM "${STEP_PID}" 2>/dev/null
}

# stop_checkpoints <run dir>: "<trainer_state.json> <mtime ns>" of every checkpoint saved for a stop signal.
stop_checkpoints() {
    python - "$1" <<'PY' 2>/dev/null
import glob, json, os, sys
for path in sorted(glob.glob(os.path.join(sys.argv[1], "checkpoints", "step-*", "trainer_state.json"))):
    try:
        if json.load(open(path))["position"]["reason"] == "stop signal":
            print(path, os.stat(path).st_mtime_ns)
    except (OSError, ValueError, KeyError):
        pass
PY
}

run_step() {
    SIGNALLED=0
    local before status
    before="$(stop_checkpoints "${RUN_DIR}")"
    trap on_signal TERM USR1
    "$@" &
    STEP_PID=$!
    # A trapped signal interrupts `wait` while the step still runs: wait again until it has ended, then
    # once more for its exit status (bash keeps it).
    while kill -0 "${STEP_PID}" 2>/dev/null; do wait "${STEP_PID}"; done
    wait "${STEP_PID}"
    status=$?
    if [[ ${SIGNALLED} -eq 1 && ${status} -ne 0 && ${status} -ne 75 ]] \
        && stop_checkpoints "${RUN_DIR}" | grep -qFxv -e "${before:-no checkpoint}"; then
        echo "the step exited ${status} after the signal and its run checkpointed for it: counted as 75"
        status=75
    fi
    if [[ ${status} -eq 75 ]]; then
        echo "training stopped for the signal (exit 75): requeueing job ${SLURM_JOB_ID}; it resumes from ${RUN_DIR}"
        scontrol requeue "${SLURM_JOB_ID}"
    else
        echo "training step exited ${status}: not requeued"
    fi
    exit "${status}"
}
