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
# Under `accelerate launch` the workers exit 75 but torch's launcher, signalled too, exits 1 (README,
# "Nothing lost"), so a step that ended nonzero AFTER the signal counts as 75 when the run directory holds
# a checkpoint written for the stop signal after the signal arrived: its workers stopped as asked.
# Needs RUN_DIR (the run directory) and SLURM_JOB_ID.

on_signal() {
    echo "signal received: asking the training step to checkpoint and stop"
    SIGNAL_AT="$(date +%s.%N)"
    kill -TERM "${STEP_PID}" 2>/dev/null
}

# stopped_for_signal <run dir> <since (epoch seconds)>: a checkpoint saved for the stop signal since then.
stopped_for_signal() {
    python - "$1" "$2" <<'PY'
import glob, json, os, sys
run, since = sys.argv[1], float(sys.argv[2])
states = [p for p in glob.glob(os.path.join(run, "checkpoints", "step-*", "trainer_state.json"))
          if os.path.getmtime(p) >= since]
sys.exit(0 if any(json.load(open(p))["position"]["reason"] == "stop signal" for p in states) else 1)
PY
}

run_step() {
    SIGNAL_AT=""
    trap on_signal TERM USR1
    "$@" &
    STEP_PID=$!
    # A trapped signal interrupts `wait` while the step still runs: wait again until it has ended, then
    # once more for its exit status (bash keeps it).
    while kill -0 "${STEP_PID}" 2>/dev/null; do wait "${STEP_PID}"; done
    wait "${STEP_PID}"
    local status=$?
    if [[ -n "${SIGNAL_AT}" && ${status} -ne 0 && ${status} -ne 75 ]] \
        && stopped_for_signal "${RUN_DIR}" "${SIGNAL_AT}"; then
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
