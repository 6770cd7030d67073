# shellcheck shell=bash
# Sourced by the batch scripts in slurm/. It finds the repository, picks the Python, and runs
# training (in the directory the job was submitted from, so relative paths mean what they mean
# there) so that Slurm's early signal ends in a checkpoint and a requeue:
#
#   #SBATCH --signal=B:USR1@<seconds>  Slurm sends USR1 to this batch shell that long before the time limit;
#   codeq_preemptible                  passes it on to training, which finishes its step, writes a checkpoint
#                                      and exits; the shell then requeues the job (same job id, same run);
#   codeq_resume_args                  a requeued job (SLURM_RESTART_COUNT > 0) continues with --resume auto.
#
# SIGTERM (scancel, the time limit itself, Slurm's own preemption) is passed on as well, so training
# still checkpoints, but the job is not requeued by this script.
#
# Environment: CODEQ_PYTHON  the Python with the project's packages (default: .venv/bin/python, else python3).
set -euo pipefail

CODEQ_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CODEQ_TRAIN=$CODEQ_ROOT/run_training.py
if [[ -z ${CODEQ_PYTHON:-} ]]; then
  CODEQ_PYTHON=python3
  if [[ -x $CODEQ_ROOT/.venv/bin/python ]]; then CODEQ_PYTHON=$CODEQ_ROOT/.venv/bin/python; fi
fi
export PYTHONPATH=$CODEQ_ROOT${PYTHONPATH:+:$PYTHONPATH}  # for python -m src.<module> from any directory
export PYTHONUNBUFFERED=1  # log lines reach the Slurm output file as they happen

codeq_log() { echo "[codeq $(date +%H:%M:%S)] $*"; }

codeq_job_header() {
  codeq_log "job ${SLURM_JOB_ID:-?}${SLURM_ARRAY_TASK_ID:+ (array task $SLURM_ARRAY_TASK_ID)}" \
    "restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-$(hostname)}; python $CODEQ_PYTHON"
}

# The flag that makes a requeued job continue its run instead of starting over.
codeq_resume_args() {
  if (( ${SLURM_RESTART_COUNT:-0} > 0 )); then echo "--resume auto"; fi
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

# codeq_train_single ARGS...: one training process (one GPU, or the CPU) with run_training.py ARGS.
codeq_train_single() {
  # shellcheck disable=SC2046  # codeq_resume_args is empty or two words
  codeq_preemptible 'kill -USR1 "$CODEQ_CHILD"' "$CODEQ_PYTHON" "$CODEQ_TRAIN" "$@" $(codeq_resume_args)
}
