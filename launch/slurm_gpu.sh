#!/usr/bin/env bash
# SLURM GPU cluster: `python -m univit_jax.main FLAGS` as one JAX job, one process per GPU.
#
#   sbatch [--nodes=N --gpus-per-node=G --ntasks-per-node=G ...] launch/slurm_gpu.sh FLAGS
#   launch/slurm_gpu.sh --dry-run FLAGS   # inside an allocation: print the srun command
#
# Submit from the repository root, where .venv holds requirements.txt plus jax[cuda12] at the
# same jax version. Every task sees all GPUs of its node (--gpu-bind=none): JAX's SLURM detection
# gives it the GPU SLURM_LOCALID, process id SLURM_PROCID of SLURM_NTASKS. The coordinator is set
# here: the first host of the job, port $UNIVIT_PORT (default 12355).
# Preemption: 300 s before the time limit (--signal) the tasks get SIGTERM; a train or pipeline
# run saves a checkpoint and exits 75, and the job requeues itself to resume. Where SLURM
# preempts jobs with PreemptMode=REQUEUE, --requeue lets it requeue the job the same way.
#SBATCH --job-name=univit
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --requeue
#SBATCH --signal=TERM@300
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

usage() {
  sed -n '2,/^#SBATCH/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

# shellcheck source=launch/common.sh
source "${SLURM_SUBMIT_DIR:-$PWD}/launch/common.sh"

dry_run=0
if [[ ${1:-} == --dry-run ]]; then dry_run=1; shift; fi
(($#)) && [[ $1 != -h && $1 != --help ]] || usage
if [[ -z ${SLURM_JOB_ID:-} || -z ${SLURM_JOB_NODELIST:-} ]]; then
  echo "not inside a SLURM allocation: submit with sbatch (or run under salloc)" >&2
  exit 2
fi

root=${SLURM_SUBMIT_DIR:-$PWD}
coordinator=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):${UNIVIT_PORT:-12355}
env="ALL,UNIVIT_DISTRIBUTED=1,JAX_COORDINATOR_ADDRESS=$coordinator"
env+=",JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$root/jax_cache}"
status=0
run srun --export="$env" --chdir="$root" --gpu-bind=none \
  "$root/.venv/bin/python" -m univit_jax.main "$@" || status=$?
if ((status == 75)); then
  run scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
