#!/bin/bash
# One node's share of a SLURM job: `accelerate launch` for this node's processes.
# Started through `srun` once per node by scripts/slurm_multinode.sbatch, and on its one node by
# scripts/slurm_train.sbatch; reads SLURM's variables:
#
#   SLURM_NNODES        machines in the job             -> --num_machines
#   SLURM_NODEID        this machine's index (0..N-1)   -> --machine_rank (0 hosts the rendezvous)
#   SLURM_GPUS_ON_NODE  processes on this machine       -> --num_processes = nodes x this (the TOTAL)
# and from the batch script:
#   MAIN_ADDR           address of node 0 (first host of the allocation; several nodes only)
#   MAIN_PORT           rendezvous port (default 29500)
#   RUN_DIR             the run directory, on a file system every node shares
#   ACCELERATE_CONFIG   optional conf/accelerate/*.yaml (fsdp, deepspeed_zero2); default: DDP
# Extra arguments are Hydra overrides for scripts/train.py. The `accelerate launch` arguments come from
# dist_gacc.launch, which writes every launch of the project (a config file's distributed_type picks the
# engine: no --multi_gpu next to it).
#
# `exec` makes accelerate's launcher this task's process, so the SIGTERM that srun forwards reaches
# torch's launcher, which passes it to the workers: each finishes its update, the run checkpoints
# and the workers exit 75 (README, "Nothing lost").
set -euo pipefail
: "${SLURM_NNODES:?}" "${SLURM_NODEID:?}" "${RUN_DIR:?}"
(( SLURM_NNODES == 1 )) || : "${MAIN_ADDR:?}"
per_node="${SLURM_GPUS_ON_NODE:-8}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
args="$(python -m dist_gacc.launch --config_file "${ACCELERATE_CONFIG:-}" --num_processes "$((SLURM_NNODES * per_node))" \
    --num_machines "${SLURM_NNODES}" --machine_rank "${SLURM_NODEID}" --main_process_ip "${MAIN_ADDR:-}" \
    --main_process_port "${MAIN_PORT:-29500}")"
mapfile -t launch <<< "${args}"
echo "node ${SLURM_NODEID}/${SLURM_NNODES} on $(hostname): ${per_node} processes, rendezvous ${MAIN_ADDR:-local}:${MAIN_PORT:-29500}, run ${RUN_DIR}"
exec accelerate launch "${launch[@]}" "${repo}/scripts/train.py" hydra.run.dir="${RUN_DIR}" resume=auto "$@"
