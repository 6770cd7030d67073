#!/usr/bin/env bash
# A job array: one task per combination of a sweep file's configs and --set grid (format: src/sweep.py),
# each a single-process run with its own run directory and W&B run.
#
#   bash slurm/sweep.sh SWEEP.yaml [sbatch options]   checks every task's config, then submits the array
#                                                      (sbatch --array=0-<tasks - 1> [options] slurm/sweep.sh SWEEP.yaml)
#
# Options after the file go to sbatch, e.g. --array=0-11%4 to run at most 4 tasks at once, --gpus=1
# (or SBATCH_GPUS=1 in the environment) for one GPU per task; CODEQ_DEVICE and CODEQ_PYTHON as in
# single_slurm.sh. Preemption: USR1 120 s before the time limit -> checkpoint -> the task requeues and
# resumes (slurm/common.sh).
#SBATCH --job-name=codeq-sweep
#SBATCH --ntasks=1
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out

script=${SLURM_JOB_ID:+$(scontrol show job "$SLURM_JOB_ID" | sed -n '/^ *Command=/{s/^ *Command=\([^ ]*\).*/\1/p;q;}')}
# shellcheck source=slurm/common.sh
source "$(dirname "${script:-$0}")/common.sh"

codeq_need_args "bash slurm/sweep.sh SWEEP.yaml [sbatch options]" "$@"
sweep=$1
shift

if [[ -z ${SLURM_ARRAY_TASK_ID:-} ]]; then
  tasks=$("$CODEQ_PYTHON" -m codeq sweep "$sweep")  # validates every task; a bad one stops here
  echo "submitting $tasks tasks of $sweep"
  exec sbatch --array="0-$(( tasks - 1 ))" "$@" "$CODEQ_ROOT/slurm/sweep.sh" "$sweep"
fi

codeq_job_header
mapfile -t task_args < <("$CODEQ_PYTHON" -m codeq sweep "$sweep" --task "$SLURM_ARRAY_TASK_ID")
(( ${#task_args[@]} > 0 )) || exit 2
codeq_log "sweep $sweep task $SLURM_ARRAY_TASK_ID"
codeq_train_single "${task_args[@]}"
