#!/usr/bin/env bash
# One training process on one GPU (or the CPU), preemptible and self-resuming.
#
#   sbatch --gpus=1 [--partition=P --time=T] slurm/single_slurm.sh CONFIG [run_training.py args]
#   bash slurm/single_slurm.sh CONFIG [run_training.py args]      the same run without Slurm
#
# Resources come from the sbatch command line or its environment (SBATCH_GPUS=1, SBATCH_PARTITION=gpu,
# SBATCH_TIMELIMIT=...), so this file serves GPU clusters and CPU-only test clusters alike.
#   CODEQ_DEVICE  passed as --device (default: cuda when the job has a GPU, or, outside Slurm, when
#                 nvidia-smi finds one; cpu otherwise)
#   CODEQ_PYTHON  the Python with the project's packages (default: the repository's .venv)
# (both read in slurm/common.sh, which holds the logic all three scripts share)
#
# Every start passes --resume auto (unless the arguments name --resume): the run continues from its
# last.pt when it has one and starts from scratch otherwise. Preemption: Slurm sends USR1 120 s before
# the time limit; it is passed on to training, which finishes its step, writes a checkpoint and exits
# with code 3; the job then requeues itself (same job id) and the next start resumes. SIGTERM (scancel)
# also ends in a checkpoint, without a requeue.
#SBATCH --job-name=codeq
#SBATCH --ntasks=1
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

# Slurm runs a copy of this file from its spool directory; the original path locates the repository.
script=${SLURM_JOB_ID:+$(scontrol show job "$SLURM_JOB_ID" | sed -n '/^ *Command=/{s/^ *Command=\([^ ]*\).*/\1/p;q;}')}
# shellcheck source=slurm/common.sh
source "$(dirname "${script:-$0}")/common.sh"

codeq_need_args "sbatch [options] slurm/single_slurm.sh CONFIG [run_training.py args]" "$@"
config=$1
shift

codeq_job_header
codeq_train_single --config "$config" "$@"
