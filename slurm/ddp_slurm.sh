#!/usr/bin/env bash
# Data-parallel training on one or more nodes: srun starts one torchrun per node, torchrun starts one
# training process per GPU, and the nodes meet at a c10d rendezvous on the allocation's first host.
#
#   sbatch --nodes=2 --gpus-per-node=4 --cpus-per-task=32 slurm/ddp_slurm.sh CONFIG [run_training.py args]
#
# batch_size in CONFIG is per process: the global batch is batch_size x nodes x processes per node
# (the run name ends in _gb<global batch>). Which resources to ask for is up to the sbatch command
# line or sbatch's environment variables (SBATCH_GPUS_PER_NODE, SBATCH_PARTITION, ...), so this
# file serves GPU clusters and CPU-only ones alike. Settings read here:
#   CODEQ_NPROC_PER_NODE  processes per node (default: the GPUs Slurm gave each node, else 1)
#   CODEQ_RDZV_PORT       rendezvous port on the first host (default: 20000 + job id mod 20000)
#   CODEQ_DEVICE, CODEQ_PYTHON as in single_slurm.sh (slurm/common.sh holds the logic all three share)
# CPU example (the test cluster): CODEQ_NPROC_PER_NODE=2 sbatch --cpus-per-task=2 slurm/ddp_slurm.sh CONFIG
#
# Preemption: USR1 arrives 120 s before the time limit. torchrun would die of USR1, so it is passed on as
# TERM to every torchrun, which hands it to its workers; they agree on a step, rank 0 writes the
# checkpoint, and the job requeues itself and resumes (every start passes --resume auto).
#SBATCH --job-name=codeq-ddp
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

script=${SLURM_JOB_ID:+$(scontrol show job "$SLURM_JOB_ID" | sed -n '/^ *Command=/{s/^ *Command=\([^ ]*\).*/\1/p;q;}')}
# shellcheck source=slurm/common.sh
source "$(dirname "${script:-$0}")/common.sh"

if (( $# < 1 )) || [[ -z ${SLURM_JOB_ID:-} ]]; then
  echo "usage: sbatch [options] slurm/ddp_slurm.sh CONFIG [run_training.py args]" \
    "(without Slurm: torchrun --nproc-per-node=N run_training.py --config CONFIG)" >&2
  exit 2
fi
config=$1
shift

gpus_per_node=${SLURM_GPUS_ON_NODE:-0}
nproc_per_node=${CODEQ_NPROC_PER_NODE:-$(( gpus_per_node > 0 ? gpus_per_node : 1 ))}
device=$(codeq_device)
rdzv_host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
rdzv_port=${CODEQ_RDZV_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}
nnodes=${SLURM_JOB_NUM_NODES:-1}

codeq_job_header
codeq_log "DDP: $nnodes node(s) x $nproc_per_node process(es) on $device, rendezvous $rdzv_host:$rdzv_port"
codeq_resume_args "$@"
codeq_threads "$nproc_per_node"
codeq_preemptible 'scancel --signal=TERM "$SLURM_JOB_ID"' \
  srun --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-$SLURM_CPUS_ON_NODE}" --kill-on-bad-exit=1 \
  "$CODEQ_PYTHON" -m torch.distributed.run \
    --nnodes="$nnodes" --nproc-per-node="$nproc_per_node" \
    --rdzv-backend=c10d --rdzv-endpoint="$rdzv_host:$rdzv_port" --rdzv-id="$SLURM_JOB_ID" \
    "$CODEQ_TRAIN" --config "$config" --device "$device" "$@" "${CODEQ_RESUME[@]}"
