#!/bin/bash
# GPU checks sized for a 15-minute device loan that includes the machine's start: at most
# GPU_CHECK_BUDGET_S (default 480 s = 8 min) of checks on one H100/H200-class GPU, most valuable first.
#
#   bash scripts/gpu_check.sh [--dry-run] [report dir]     default dir: docs/benchmarks/gpu/<gpu name>/
#                                                          (a dry run: $TMPDIR/gpu_check-dry-run/)
#   bash scripts/gpu_check.sh --list                       the steps, their budgets and commands; runs nothing
#
# Steps (budget = the step's timeout; a step never runs past the total budget, and one with under 20 s left is
# SKIPPED):
#   env                 GPU, driver, library versions                                                   15 s
#   equivalence-fp32    scripts/verify_equivalence.py, micro 3 x N 4 vs one batch, float64, tolerance 1e-9   45 s
#   equivalence-bf16    the same in bf16 autocast, tolerance 1e-2 (8 mantissa bits)                         45 s
#   fp16-gradscaler     6 fp16 updates of scripts/train.py; the GradScaler's state is in the checkpoint   60 s
#   2 GPUs only:
#   equivalence-2gpu    verify_equivalence.py on 2 processes (micro 3 x N 2 x 2), float64                  60 s
#   fsdp-deepspeed-2gpu pytest -m gpu: FSDP full shard vs 1 process, DeepSpeed ZeRO-2 vs 1 process        150 s
#   bert-base-bf16      BERT-base-shaped (110M, seq 128, micro 32 x N 4) bf16 training samples/s and MFU   90 s
#                       (model FLOPs / the GPU's dense bf16 peak), with the measured bf16 matmul ceiling
#   time-to-f1          the default job (`python scripts/train.py trainer.log_with=none`: MiniLM, Rotten     120 s
#                       Tomatoes, 1 epoch, precision auto): wall seconds and validation/test F1
# 1 GPU: 375 s of budgets; 2 GPUs: 585 s, so the total budget cuts the last steps short (they end as TIMEOUT
# or SKIPPED, with what they measured in their logs).
#
# The report, <dir>/report.md, gets one table row per step as soon as the step ends (result, wall seconds,
# budget, its one-line summary), so a failure or the end of the loan keeps every earlier figure; each
# step's full output is in <dir>/logs/<NN>-<step>.log. The exit code is 1 if any step did not PASS.
#
# --dry-run (or GPU_CHECK_DRY_RUN=1): no GPU is used (CUDA hidden): every step runs its command on the CPU with
# tiny sizes (the tiny BERT for the speed and time-to-F1 steps; bf16 stands in for fp16, which needs CUDA).
# GPU_CHECK_GPUS=2 takes the 2-GPU steps too (2 CPU ranks; pytest -m gpu then skips, with its reason). Its
# budgets are x10 (GPU_CHECK_BUDGET_SCALE): a busy CPU is not the GPU they are sized for. It checks this
# script and the steps' plumbing, not a GPU: dry-run figures mean nothing.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DRY="${GPU_CHECK_DRY_RUN:-0}"
LIST=0
while [[ $# -gt 0 && "$1" == --* ]]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --list) LIST=1 ;;
        *) echo "error: unknown option $1 (--dry-run, --list)" >&2; exit 2 ;;
    esac
    shift
done
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false DRY
BUDGET_S="${GPU_CHECK_BUDGET_S:-480}"
MIN_STEP_S=20
SCALE="${GPU_CHECK_BUDGET_SCALE:-1}"
if [[ "${DRY}" == 1 ]]; then
    export CUDA_VISIBLE_DEVICES="" ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1
    GPUS="${GPU_CHECK_GPUS:-1}"
    GPU_NAME="cpu-dry-run"
    SCALE="${GPU_CHECK_BUDGET_SCALE:-10}"
else
    GPUS="${GPU_CHECK_GPUS:-$(python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)}"
    GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
    if [[ "${LIST}" == 0 && "${GPUS}" -lt 1 ]]; then
        echo "error: no CUDA GPU visible (torch.cuda.device_count() = 0); nothing to check (--dry-run checks the script on a CPU)" >&2
        exit 2
    fi
fi
SLUG="$(echo "${GPU_NAME:-unknown-gpu}" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-|-$//g')"
DEFAULT_DIR="docs/benchmarks/gpu/${SLUG}"
[[ "${DRY}" == 1 ]] && DEFAULT_DIR="${TMPDIR:-/tmp}/gpu_check-dry-run"  # keeps dry-run figures out of docs/
DIR="${1:-${DEFAULT_DIR}}"
WORK="$(mktemp -d -t gpu_check.XXXXXX)"
export WORK GPUS

# The tiny BERT on real reviews, 37 examples in windows of 12, 12, 12, 1 (the ragged case); fp32 unless a
# step says otherwise (auto would pick bf16 on a GPU).
TINY="model=tiny model.dropout=0.0 model.from_scratch.hidden_size=32 model.from_scratch.intermediate_size=64
      data.max_train_samples=37 data.max_eval_samples=37 data.max_length=64 optim.lr=1e-3 trainer.log_with=none
      trainer.mixed_precision=no"
export TINY

# --- the steps: each prints a line `SUMMARY: ...` for the report ---------------------------------------

env_info() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
    python - <<'PY'
import accelerate, torch, transformers
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (dry run)"
try:
    import deepspeed
    ds = deepspeed.__version__
except Exception:
    ds = "not installed"
print(f"SUMMARY: {gpu} x {torch.cuda.device_count()} | torch {torch.__version__} cuda {torch.version.cuda} | "
      f"accelerate {accelerate.__version__} | transformers {transformers.__version__} | deepspeed {ds}")
PY
}

verify() {  # verify <processes> <overrides...>
    local procs="$1"; shift
    local cmd=(python) args
    if [[ "${procs}" -gt 1 ]]; then  # the arguments every launch of the project gets (dist_gacc.launch)
        args="$(python -m dist_gacc.launch --num_processes "${procs}" --main_process_port 0)" || return
        mapfile -t cmd <<< "${args}"
        cmd=(accelerate launch "${cmd[@]}")
    fi
    # shellcheck disable=SC2086  # TINY is a list of overrides
    "${cmd[@]}" scripts/verify_equivalence.py "hydra.run.dir=${WORK}/verify-${procs}-$RANDOM" ${TINY} "$@" || return
    echo "SUMMARY: $(grep -h '^max .* vs tolerance' "${STEP_LOG}" | tail -n 1)"
}

fp16_run() {  # a few fp16 updates; the GradScaler's state must be in the checkpoint with a finite scale
    local run="${WORK}/fp16" precision=fp16
    [[ "${DRY}" == 1 ]] && precision=bf16  # fp16 needs CUDA; the dry run checks the rest of the step
    # shellcheck disable=SC2086
    python scripts/train.py ${TINY} trainer.mixed_precision="${precision}" trainer.micro_batch_size=3 \
        trainer.grad_accum_steps=4 trainer.max_steps=6 trainer.checkpoint_every=2 "hydra.run.dir=${run}" || return
    python - "${run}" <<'PY'
import glob, json, math, os, sys
import torch
run, dry = sys.argv[1], os.environ["DRY"] == "1"
metrics = json.load(open(f"{run}/metrics.json"))
losses = [round(x, 4) for x in metrics["train_losses"]]
if dry:
    print(f"SUMMARY: dry run, bf16 for fp16: {metrics['optimizer_steps']} optimizer steps, losses {losses}")
    sys.exit(0)
scalers = sorted(glob.glob(f"{run}/checkpoints/step-*/scaler.pt"))
assert scalers, "no scaler.pt in any checkpoint: the GradScaler did not run"
state = torch.load(scalers[-1], weights_only=False)
assert math.isfinite(state["scale"]) and state["scale"] > 0
assert metrics["mixed_precision"] == "fp16" and metrics["optimizer_steps"] >= 1
print(f"SUMMARY: scale {state['scale']} (growth tracker {state['_growth_tracker']}), {metrics['optimizer_steps']} "
      f"optimizer steps, {metrics['skipped_updates']} skipped, losses {losses}")
PY
}

gpu_tests() {  # FSDP and DeepSpeed on 2 GPUs; they skip, with the reason, where there are fewer or no deepspeed
    # -n 0: in this process, one test at a time (each takes both GPUs; the suite's two xdist workers would start
    # ~5 s each for nothing)
    python -m pytest tests/test_engines.py -m gpu -n 0 -rs -q -p no:cacheprovider || return
    echo "SUMMARY: $(grep -E '(passed|skipped|failed)' "${STEP_LOG}" | tail -n 1 | tr -d '=')"
}

bert_speed() {  # BERT-base-shaped bf16 training samples/s and MFU, bench_worker's loop (a) in one process
    python - <<'PY'
import argparse, json, os, sys
from pathlib import Path
sys.path.insert(0, "scripts")
import bench

dry = os.environ["DRY"] == "1"
device, model = ("cpu", "tiny") if dry else ("cuda", "bert-base")
args = argparse.Namespace(quick=dry, accum=4, device=device, threads=os.cpu_count(),
                          work_dir=os.path.join(os.environ["WORK"], "bench"))
inputs = {model: bench.prepare(model, Path(args.work_dir))}
spec = bench.base_spec(args, model, inputs, variant="dist_gacc", precision="bf16")
ceiling = {"kind": "ceiling", "device": device, "threads": args.threads, "precision": "bf16", "repeats": 5,
           "sizes": [256, 512] if dry else [4096, 8192]}
run, matmul = bench.run_workers([spec, ceiling])
# Dense bf16 peaks (TFLOP/s, no sparsity) from the vendors' data sheets; MFU is model FLOPs / this peak.
PEAKS = {"H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0,
         "GH200": 989.4, "A100": 312.0, "L40S": 362.05, "L4": 121.0}
name = "cpu" if dry else __import__("torch").cuda.get_device_name(0)
peak = next((v for k, v in PEAKS.items() if k in name), None)
mfu = run["model_tflops_per_s"] / peak if peak else None
record = {"gpu": name, "model": model, "precision": "bf16", "micro": spec["micro"], "accum": spec["accum"],
          "updates": spec["updates"], "samples_per_s": run["samples_per_s"], "model_tflops_per_s":
          run["model_tflops_per_s"], "peak_tflops": peak, "mfu": mfu, "matmul_ceiling_tflops": matmul["tflops_per_s"],
          "peak_mb": run["peak_mb"], "tokens_per_sample": run["tokens_per_sample"]}
print(json.dumps(record, indent=1))
mfu_text = f"MFU {mfu:.1%} of {peak} TFLOP/s" if mfu else f"MFU n/a (no dense bf16 peak known for {name!r})"
print(f"SUMMARY: {model} bf16 seq {round(run['tokens_per_sample'])}, micro {spec['micro']} x N {spec['accum']}: "
      f"{run['samples_per_s']:.0f} samples/s, {run['model_tflops_per_s']:.1f} model TFLOP/s, {mfu_text}; "
      f"bf16 matmul ceiling {matmul['tflops_per_s']:.0f} TFLOP/s; peak memory {run['peak_mb']:.0f} MB")
PY
}

time_to_f1() {  # the default job, end to end: seconds from start to its final F1 (the step's wall time)
    local run="${WORK}/default-job" start=$SECONDS
    if [[ "${DRY}" == 1 ]]; then
        # shellcheck disable=SC2086
        python scripts/train.py ${TINY} "hydra.run.dir=${run}" || return
    else
        python scripts/train.py trainer.log_with=none "hydra.run.dir=${run}" || return
    fi
    python - "${run}" "$((SECONDS - start))" <<'PY'
import json, sys
m = json.load(open(f"{sys.argv[1]}/metrics.json"))
print(f"SUMMARY: {sys.argv[2]} s to validation F1 {m['eval']['f1']:.4f} (test F1 {m['test']['f1']:.4f}); "
      f"precision {m['mixed_precision']}, {m['updates']} updates, {m['train_samples_per_second']:.0f} training samples/s")
PY
}
export -f env_info verify fp16_run gpu_tests bert_speed time_to_f1

# --- the plan, most valuable first: name, budget (s), command --------------------------------------------

PLAN=(
    "env|15|env_info"
    "equivalence-fp32|45|verify 1 trainer.micro_batch_size=3 trainer.grad_accum_steps=4 verify.updates=4 verify.tolerance=1e-9"
    "equivalence-bf16|45|verify 1 trainer.mixed_precision=bf16 trainer.micro_batch_size=3 trainer.grad_accum_steps=4 verify.updates=4 verify.tolerance=1e-2"
    "fp16-gradscaler|60|fp16_run"
)
if [[ "${GPUS}" -ge 2 ]]; then
    PLAN+=("equivalence-2gpu|60|verify 2 trainer.micro_batch_size=3 trainer.grad_accum_steps=2 verify.updates=4 verify.tolerance=1e-9"
           "fsdp-deepspeed-2gpu|150|gpu_tests")
fi
PLAN+=("bert-base-bf16|90|bert_speed" "time-to-f1|120|time_to_f1")

if [[ "${LIST}" == 1 ]]; then
    total=0
    for entry in "${PLAN[@]}"; do
        IFS='|' read -r name budget cmd <<< "${entry}"
        printf '%-20s %4s s  %s\n' "${name}" "${budget}" "${cmd}"
        total=$((total + budget))
    done
    echo "steps ${#PLAN[@]}, budgets ${total} s, total budget ${BUDGET_S} s, ${GPUS} GPU(s)"
    exit 0
fi

# --- running them ------------------------------------------------------------------------------------

mkdir -p "${DIR}/logs"
BUDGET_S=$((BUDGET_S * SCALE))
REPORT="${DIR}/report.md"
{
    echo "# GPU check: ${GPU_NAME:-unknown GPU}"
    echo
    echo "\`bash scripts/gpu_check.sh$([[ "${DRY}" == 1 ]] && echo ' --dry-run')\` on $(date -u '+%Y-%m-%d %H:%M UTC'), commit" \
         "$(git rev-parse --short HEAD 2>/dev/null || echo unknown), ${GPUS} GPU(s), budget ${BUDGET_S} s$([[ "${SCALE}" != 1 ]] && echo " (every budget x${SCALE})")." \
         "$([[ "${DRY}" == 1 ]] && echo '**Dry run on a CPU, tiny sizes: the figures mean nothing.**')"
    echo "Each row is appended when its step ends; full output in logs/."
    echo
    echo "| # | step | result | wall s | budget s | summary |"
    echo "|---|---|---|---|---|---|"
} > "${REPORT}"

START=$SECONDS
failed=0
n=0
for entry in "${PLAN[@]}"; do
    IFS='|' read -r name budget cmd <<< "${entry}"
    budget=$((budget * SCALE))
    n=$((n + 1))
    left=$((BUDGET_S - (SECONDS - START)))
    STEP_LOG="${DIR}/logs/$(printf '%02d' "${n}")-${name}.log"
    export STEP_LOG
    if [[ ${left} -lt ${MIN_STEP_S} ]]; then
        result="SKIPPED" wall=0 summary="the total budget is spent (${left} s left)"
    else
        [[ ${budget} -gt ${left} ]] && budget=${left}
        echo "== ${n}. ${name} (budget ${budget} s): ${cmd}"
        t0=$SECONDS
        # timeout signals the step's whole process group; --kill-after ends what ignores the TERM
        timeout --kill-after=10 "${budget}" bash -c "${cmd}" > "${STEP_LOG}" 2>&1
        status=$?
        wall=$((SECONDS - t0))
        summary="$(grep '^SUMMARY: ' "${STEP_LOG}" | tail -n 1 | cut -c 10-)"
        case ${status} in
            0) result="PASS" ;;
            124|137) result="TIMEOUT" summary="stopped at its ${budget} s budget. ${summary}" ;;
            *) result="FAIL (exit ${status})" summary="$(grep -v '^\s*$' "${STEP_LOG}" | tail -n 1 | cut -c 1-200)" ;;
        esac
    fi
    [[ "${result}" == PASS ]] || failed=$((failed + 1))
    echo "| ${n} | ${name} | ${result} | ${wall} | ${budget} | ${summary//|/\\|} |" | tee -a "${REPORT}"
done
{
    echo
    echo "Total: $((SECONDS - START)) s of ${BUDGET_S} s; $((n - failed)) of ${n} steps passed."
} | tee -a "${REPORT}"
echo "report: ${REPORT}"
rm -rf "${WORK}"
[[ ${failed} -eq 0 ]]
