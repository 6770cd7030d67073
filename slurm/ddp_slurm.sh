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
#   CODEQ_DEVICE          passed as --device (default: cuda when the node has GPUs, else the config's)
#   CODEQ_RDZV_PORT       rendezvous port on the first host (default: 20000 + job id mod 20000)
# CPU example (the test cluster): CODEQ_NPROC_PER_NODE=2 sbatch --cpus-per-task=2 slurm/ddp_slurm.sh CONFIG
#
# Preemption: USR1 arrives 180 s before the time limit; it is passed on as TERM to every torchrun (which
# hands it to its workers), training checkpoints, and the job requeues and resumes (slurm/common.sh).
#SBATCH --job-name=codeq-ddp
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

script=${SLURM_JOB_ID:+$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')}
# shellcheck source=slurm/common.sh
source "$(dirname "${script:-$0}")/common.sh"

if (( $# < 1 )); then
  echo "usage: sbatch [options] slurm/ddp_slurm.sh CONFIG [run_training.py args]" >&2
  exit 2
fi
config=$1
shift

gpus_per_node=${SLURM_GPUS_ON_NODE:-0}
nproc_per_node=${CODEQ_NPROC_PER_NODE:-$(( gpus_per_node > 0 ? gpus_per_node : 1 ))}
device=${CODEQ_DEVICE:-}
if [[ -z $device ]] && (( gpus_per_node > 0 )); then device=cuda; fi
rdzv_host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
rdzv_port=${CODEQ_RDZV_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}
nnodes=${SLURM_JOB_NUM_NODES:-1}

codeq_job_header
codeq_log "DDP: $nnodes node(s) x $nproc_per_node process(es), device ${device:-from config}, rendezvous $rdzv_host:$rdzv_port"

# shellcheck disable=SC2046  # codeq_resume_args is empty or two words
codeq_preemptible 'scancel --signal=TERM "$SLURM_JOB_ID"' \
  srun --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-$SLURM_CPUS_ON_NODE}" --kill-on-bad-exit=1 \
  "$CODEQ_PYTHON" -m torch.distributed.run \
    --nnodes="$nnodes" --nproc-per-node="$nproc_per_node" \
    --rdzv-backend=c10d --rdzv-endpoint="$rdzv_host:$rdzv_port" --rdzv-id="$SLURM_JOB_ID" \
    "$CODEQ_TRAIN" --config "$config" ${device:+--device "$device"} "$@" $(codeq_resume_args)
