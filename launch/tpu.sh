#!/usr/bin/env bash
# Cloud TPU: a queued resource (TPU VM slice) running univit_jax on every worker.
#
#   launch/tpu.sh [--dry-run] COMMAND NAME --zone=ZONE [--project=PROJECT] [OPTIONS] [-- FLAGS]
#
#   create   --accelerator=TYPE --runtime=VERSION [--spot | --reserved] [--nodes=N]
#            queue a request (on-demand unless --spot / --reserved); it is ready when
#            `gcloud compute tpus queued-resources describe NAME --zone=ZONE` says ACTIVE
#   install  [--python=python3.11]: copy this checkout to ~/univit_jax on every worker, make a
#            venv there and pip install requirements.txt, requirements-gcs.txt (gs://
#            workdirs) plus jax[tpu] at its jax pin
#   run      -- FLAGS: `python -m univit_jax.main FLAGS` on all workers at once
#            (UNIVIT_DISTRIBUTED=1, compilation cache ~/jax_cache); the output streams back
#            and is appended to ~/univit_jax/run.log on each worker
#   logs     [--node=0] [--worker=0]: follow one worker's run.log
#   stop     SIGTERM the run on every worker (train and pipeline save a checkpoint, exit 75)
#   delete   the queued resource and its TPU VMs
#
# A run that exits 75 was preempted after saving its checkpoint: `run` again (after delete,
# create and install when a spot slice was taken away) resumes it.
# Multislice: --nodes=N queues N slices (nodes NAME-0 ... NAME-<N-1>); Cloud TPU sets
# MEGASCALE_COORDINATOR_ADDRESS, MEGASCALE_NUM_SLICES and MEGASCALE_SLICE_ID on their workers,
# which jax.distributed.initialize() reads; the other commands act on all nodes; the mesh splits
# mesh.dcn_axis (default data) across the slices (univit_jax/sharding.py, make_mesh).
# --dry-run prints each command (shell-quoted) instead of running it.
set -euo pipefail
((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 404)) || { echo "needs bash >= 4.4" >&2; exit 2; }

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

dry_run=0 zone='' project='' accelerator='' runtime='' tier='' nodes=1 python=python3.11
node=0 worker=0 words=() flags=()
while (($#)); do
  case $1 in
    --) shift; flags=("$@"); break ;;
    --dry-run) dry_run=1 ;;
    --zone=?*) zone=${1#*=} ;;
    --project=?*) project=${1#*=} ;;
    --accelerator=?*) accelerator=${1#*=} ;;
    --runtime=?*) runtime=${1#*=} ;;
    --spot | --reserved) [[ -z $tier ]] || usage; tier=$1 ;;
    --nodes=[1-9]*) nodes=${1#*=} ;;
    --python=?*) python=${1#*=} ;;
    --node=?*) node=${1#*=} ;;
    --worker=?*) worker=${1#*=} ;;
    -*) usage ;;
    *) words+=("$1") ;;
  esac
  shift
done
[[ $nodes =~ ^[0-9]+$ ]] || usage

# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"

root=$(cd "$(dirname "$0")/.." && pwd)
if [[ ${words[0]:-} == worker && ${#words[@]} == 1 ]]; then
  # On each worker, started by `run`: the entry point, its output also appended to run.log.
  main=(env UNIVIT_DISTRIBUTED=1 "JAX_COMPILATION_CACHE_DIR=$HOME/jax_cache"
        "$root/.venv/bin/python" -m univit_jax.main "${flags[@]}")
  if ((dry_run)); then run "${main[@]}"; exit; fi
  cd "$root"
  trap '' HUP  # a dropped ssh connection leaves the run going; `logs` follows it again
  exec > >(tee -a -p run.log) 2>&1
  echo "== $(date -u '+%F %T') $(hostname): ${main[*]}"
  echo $$ > run.pid
  exec "${main[@]}"
fi

((${#words[@]} == 2)) && [[ -n $zone ]] || usage
command=${words[0]} name=${words[1]}
if [[ $command == run ]]; then ((${#flags[@]})) || usage; else ((!${#flags[@]})) || usage; fi
qr=(gcloud compute tpus queued-resources)
where=(--zone="$zone" ${project:+"--project=$project"})
all=(--node=all --worker=all)
case $command in
  create)
    [[ -n $accelerator && -n $runtime ]] || usage
    if ((nodes > 1)); then slices=(--node-count="$nodes" --node-prefix="$name")
    else slices=(--node-id="$name"); fi
    run "${qr[@]}" create "$name" "${where[@]}" --accelerator-type="$accelerator" \
      --runtime-version="$runtime" "${slices[@]}" ${tier:+"$tier"} ;;
  install)
    jax=$(sed -n 's/^jax==//p' "$root/requirements.txt")
    [[ -n $jax ]] || { echo "requirements.txt pins no jax==VERSION" >&2; exit 1; }
    tarball=${TMPDIR:-/tmp}/univit_jax_$name.tgz
    run tar -C "$root" --exclude=.venv --exclude=.git --exclude=__pycache__ -czf "$tarball" .
    run "${qr[@]}" scp "$tarball" "$name:/tmp/univit_jax.tgz" "${where[@]}" "${all[@]}"
    # TPU VM images ship an older Python than the project needs (>= 3.11); apt adds it.
    setup="sudo apt-get -qq update && sudo apt-get -qq install -y $python-venv"
    setup+=" && mkdir -p univit_jax && tar -C univit_jax -xzf /tmp/univit_jax.tgz"
    setup+=" && cd univit_jax && $python -m venv .venv"
    setup+=" && .venv/bin/pip install -q -r requirements.txt -r requirements-gcs.txt"
    setup+=" 'jax[tpu]==$jax'"
    run "${qr[@]}" ssh "$name" "${where[@]}" "${all[@]}" --command="$setup" ;;
  run)
    printf -v quoted '%q ' "${flags[@]}"
    # --batch-size=all: every worker must start before any of them can initialise.
    run "${qr[@]}" ssh "$name" "${where[@]}" "${all[@]}" --batch-size=all \
      --command="univit_jax/launch/tpu.sh worker -- ${quoted% }" ;;
  logs)
    run "${qr[@]}" ssh "$name" "${where[@]}" --node="$node" --worker="$worker" \
      --command='tail -n 100 -F univit_jax/run.log' ;;
  stop)
    run "${qr[@]}" ssh "$name" "${where[@]}" "${all[@]}" \
      --command='pkill -TERM -F univit_jax/run.pid -f univit_jax.main' ;;
  delete)
    run "${qr[@]}" delete "$name" "${where[@]}" --force ;;
  *) usage ;;
esac
