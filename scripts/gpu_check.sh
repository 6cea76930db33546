#!/bin/bash
# Checks that need a CUDA GPU; writes a Markdown report to commit as docs/gpu_check.md.
#
#   bash scripts/gpu_check.sh [report path, default docs/gpu_check.md]
#
# 1. exact accumulation vs one big batch (scripts/verify_equivalence.py), fp32 and bf16
#    (fp32 is checked in float64, tolerance 1e-9; bf16 runs in bf16 autocast, tolerance 1e-2: bf16 has
#    8 mantissa bits, so two orders of summation differ by ~1e-3 relative per step)
# 2. a short fp16 run of scripts/train.py: the GradScaler must have run (its state in the checkpoint)
# 3. the GPU-only tests: FSDP full shard vs DDP, DeepSpeed ZeRO-2 on 2 GPUs (pytest -m gpu; they skip
#    with the reason when there are fewer than 2 GPUs or no deepspeed)
# 4. the benchmark: python scripts/bench.py --device cuda --out docs/benchmarks-gpu
# Every check runs even if an earlier one failed; the exit code is 1 if any failed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPORT="${1:-docs/gpu_check.md}"
LOG="$(mktemp -t gpu_check.XXXXXX.log)"
WORK="$(mktemp -d -t gpu_check.XXXXXX)"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
GPUS="$(python -c 'import torch; print(torch.cuda.device_count())')"
if [[ "${GPUS}" -lt 1 ]]; then
    echo "error: no CUDA GPU visible (torch.cuda.device_count() = 0); nothing to check" >&2
    exit 2
fi
# The tiny BERT on real reviews, 37 examples in windows of 12, 12, 12, 1 (the ragged case).
TINY=(model=tiny model.dropout=0.0 model.from_scratch.hidden_size=32 model.from_scratch.intermediate_size=64
      data.max_train_samples=37 data.max_eval_samples=37 data.max_length=64 optim.lr=1e-3 trainer.log_with=none
      trainer.mixed_precision=no)  # fp32 unless a section says otherwise (auto would pick bf16 on a GPU)
failed=()

section() {  # section <title> <command...>: run, tee into the log, record the verdict
    local title="$1"; shift
    echo "### ${title}" | tee -a "${LOG}"
    echo '```' >> "${LOG}"
    echo "\$ $*" >> "${LOG}"
    local start=$SECONDS
    if "$@" 2>&1 | tee -a "${LOG}"; then
        echo '```' >> "${LOG}"; echo "PASS (${title}, $((SECONDS - start)) s)" | tee -a "${LOG}"
    else
        echo '```' >> "${LOG}"; echo "FAIL (${title}, $((SECONDS - start)) s)" | tee -a "${LOG}"
        failed+=("${title}")
    fi
    echo >> "${LOG}"
}

verify() {  # verify <processes> <overrides...>
    local procs="$1"; shift
    if [[ "${procs}" -gt 1 ]]; then
        accelerate launch --multi_gpu --num_processes "${procs}" --dynamo_backend no \
            scripts/verify_equivalence.py "hydra.run.dir=${WORK}/verify-$RANDOM" "$@"
    else
        python scripts/verify_equivalence.py "hydra.run.dir=${WORK}/verify-$RANDOM" "$@"
    fi
}

fp16_run() {  # a few fp16 updates; the GradScaler's state must be in the checkpoint with a finite scale
    local run="${WORK}/fp16"
    python scripts/train.py "${TINY[@]}" trainer.mixed_precision=fp16 trainer.micro_batch_size=3 \
        trainer.grad_accum_steps=4 trainer.max_steps=6 trainer.checkpoint_every=2 "hydra.run.dir=${run}"
    python - "${run}" <<'PY'
import glob, json, math, sys, torch
run = sys.argv[1]
scalers = sorted(glob.glob(f"{run}/checkpoints/step-*/scaler.pt"))
assert scalers, "no scaler.pt in any checkpoint: the GradScaler did not run"
state = torch.load(scalers[-1], weights_only=False)
metrics = json.load(open(f"{run}/metrics.json"))
print(f"GradScaler state {scalers[-1]}: scale {state['scale']}, growth tracker {state['_growth_tracker']}")
print(f"updates {metrics['updates']}, optimizer steps {metrics['optimizer_steps']}, "
      f"skipped {metrics['skipped_updates']}, losses {[round(x, 4) for x in metrics['train_losses']]}")
assert math.isfinite(state["scale"]) and state["scale"] > 0
assert metrics["mixed_precision"] == "fp16" and metrics["optimizer_steps"] >= 1
PY
}

{
    echo "# GPU check"
    echo
    echo "Produced by \`bash scripts/gpu_check.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD)."
    echo
    echo '```'
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
    python -c 'import torch, accelerate, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "| accelerate", accelerate.__version__, "| transformers", transformers.__version__)'
    python -c 'import deepspeed; print("deepspeed", deepspeed.__version__)' 2>/dev/null || echo "deepspeed: not installed"
    echo '```'
    echo
} > "${LOG}"

section "equivalence fp32 (float64), 1 GPU, micro 3 x N 4" \
    verify 1 "${TINY[@]}" trainer.micro_batch_size=3 trainer.grad_accum_steps=4 verify.updates=4 verify.tolerance=1e-9
section "equivalence bf16, 1 GPU, micro 3 x N 4" \
    verify 1 "${TINY[@]}" trainer.mixed_precision=bf16 trainer.micro_batch_size=3 trainer.grad_accum_steps=4 \
    verify.updates=4 verify.tolerance=1e-2
if [[ "${GPUS}" -ge 2 ]]; then
    section "equivalence fp32 (float64), 2 GPUs, micro 3 x N 2" \
        verify 2 "${TINY[@]}" trainer.micro_batch_size=3 trainer.grad_accum_steps=2 verify.updates=4 verify.tolerance=1e-9
    section "equivalence bf16, 2 GPUs, micro 3 x N 2" \
        verify 2 "${TINY[@]}" trainer.mixed_precision=bf16 trainer.micro_batch_size=3 trainer.grad_accum_steps=2 \
        verify.updates=4 verify.tolerance=1e-2
fi
section "fp16 with the GradScaler" fp16_run
section "GPU-only tests (FSDP vs DDP, DeepSpeed ZeRO-2 on 2 GPUs)" \
    python -m pytest tests/test_engines.py -m gpu -rs -q
section "benchmark" python scripts/bench.py --device cuda --out docs/benchmarks-gpu  # keeps the CPU tables

{
    echo "## Verdict"
    echo
    if [[ ${#failed[@]} -eq 0 ]]; then echo "All checks passed."; else printf -- '- FAILED: %s\n' "${failed[@]}"; fi
} >> "${LOG}"
mkdir -p "$(dirname "${REPORT}")"
cp "${LOG}" "${REPORT}"
echo "report: ${REPORT}"
[[ ${#failed[@]} -eq 0 ]]
