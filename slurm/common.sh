# shellcheck shell=bash
# Sourced by the batch scripts in slurm/. It finds the repository, picks the Python, and runs
# training (in the directory the job was submitted from, so relative paths mean what they mean
# there) so that Slurm's early signal ends in a checkpoint and a requeue:
#
#   #SBATCH --signal=B:USR1@<seconds>  Slurm sends USR1 to this batch shell that long before the time limit;
#   codeq_preemptible                  passes it on to training, which finishes its step, writes a checkpoint
#                                      and exits (code 3); the shell then requeues the job (same job id);
#   codeq_resume_args                  every start passes --resume auto: the requeued job continues its run
#                                      (a run without a checkpoint yet simply starts).
#
# SIGTERM (scancel, the time limit itself, Slurm's own preemption) is passed on as well, so training
# still checkpoints, but the job is not requeued by this script.
#
# Environment: CODEQ_PYTHON  the Python with the project's packages (default: .venv/bin/python, else python3)
#              CODEQ_DEVICE  passed as --device (default: cuda when the job, or outside Slurm the machine,
#                            has a GPU; cpu otherwise)
set -euo pipefail

CODEQ_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CODEQ_TRAIN=$CODEQ_ROOT/run_training.py
if [[ -z ${CODEQ_PYTHON:-} ]]; then
  CODEQ_PYTHON=python3
  if [[ -x $CODEQ_ROOT/.venv/bin/python ]]; then CODEQ_PYTHON=$CODEQ_ROOT/.venv/bin/python; fi
fi
export PYTHONUNBUFFERED=1  # log lines reach the Slurm output file as they happen

codeq_log() { echo "[codeq $(date +%H:%M:%S)] $*"; }

# codeq_need_args USAGE ARGS...: exits 2 with "usage: USAGE" unless ARGS holds at least one argument.
codeq_need_args() {
  local usage=$1
  shift
  if (( $# < 1 )); then
    echo "usage: $usage" >&2
    exit 2
  fi
}

codeq_job_header() {
  codeq_log "job ${SLURM_JOB_ID:-?}${SLURM_ARRAY_TASK_ID:+ (array task $SLURM_ARRAY_TASK_ID)}" \
    "restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-$(hostname)}; python $CODEQ_PYTHON"
}

# The --device for this job's training processes.
codeq_device() {
  if [[ -n ${CODEQ_DEVICE:-} ]]; then
    echo "$CODEQ_DEVICE"
  elif [[ -n ${SLURM_JOB_ID:-} ]]; then
    if (( ${SLURM_GPUS_ON_NODE:-0} > 0 )); then echo cuda; else echo cpu; fi
  elif nvidia-smi -L >/dev/null 2>&1; then
    echo cuda
  else
    echo cpu
  fi
}

# codeq_threads PROCESSES: split the job's CPUs per task among PROCESSES training processes (OMP_NUM_THREADS),
# so processes sharing a node do not each start a thread per core.
codeq_threads() {
  if [[ -z ${OMP_NUM_THREADS:-} && -n ${SLURM_CPUS_PER_TASK:-} ]]; then
    export OMP_NUM_THREADS=$(( SLURM_CPUS_PER_TASK / $1 > 0 ? SLURM_CPUS_PER_TASK / $1 : 1 ))
  fi
}

# codeq_resume_args ARGS...: sets CODEQ_RESUME to (--resume auto), or to () when ARGS name --resume themselves.
codeq_resume_args() {
  CODEQ_RESUME=(--resume auto)
  local arg
  for arg in "$@"; do
    if [[ $arg == --resume || $arg == --resume=* ]]; then CODEQ_RESUME=(); fi
  done
}

# codeq_preemptible FORWARD COMMAND...: runs COMMAND; on USR1 or TERM evaluates FORWARD (which passes
# the signal on to training; $CODEQ_CHILD is COMMAND's pid), waits for training to stop and, after
# USR1, requeues the job unless training had already finished. Returns COMMAND's exit code.
codeq_preemptible() {
  local forward=$1 status
  shift
  CODEQ_REQUEUE=0
  trap 'CODEQ_REQUEUE=1; codeq_log "USR1: checkpoint, then requeue"; '"$forward"' || true' USR1
  trap 'codeq_log "TERM: checkpoint, then stop"; '"$forward"' || true' TERM
  "$@" &
  CODEQ_CHILD=$!
  # bash runs a trap only once `wait` returns, so wait again until the child has really exited
  while :; do
    status=0
    wait "$CODEQ_CHILD" || status=$?
    kill -0 "$CODEQ_CHILD" 2>/dev/null || break
  done
  trap - USR1 TERM
  # CODEQ_CHECKPOINT_EXIT: the one exit code that means "checkpoint written" (3 from run_training.py); unset,
  # any failure after USR1 counts, since torchrun reports its workers' exit code 3 as 1. Outside Slurm
  # (no SLURM_JOB_ID) there is nothing to requeue.
  if (( CODEQ_REQUEUE && status != 0 )) && [[ -n ${SLURM_JOB_ID:-} ]] \
    && [[ -z ${CODEQ_CHECKPOINT_EXIT:-} || $status == "$CODEQ_CHECKPOINT_EXIT" ]]; then
    codeq_log "training stopped (exit code $status): requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"  # Slurm ends this script here; the job restarts with --resume auto
  fi
  codeq_log "training exited with code $status"
  return "$status"
}

# codeq_train_single ARGS...: one training process (one GPU, or the CPU): run_training.py ARGS.
codeq_train_single() {
  local device
  device=$(codeq_device)
  codeq_resume_args "$@"
  codeq_threads 1
  CODEQ_CHECKPOINT_EXIT=3  # run_training.py's EXIT_PREEMPTED
  codeq_log "single process on $device: $*"
  codeq_preemptible 'kill -USR1 "$CODEQ_CHILD"' \
    "$CODEQ_PYTHON" "$CODEQ_TRAIN" --device "$device" "$@" "${CODEQ_RESUME[@]}"
}
