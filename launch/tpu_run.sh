#!/usr/bin/env bash
# Runs univit_jax on every worker of a Cloud TPU VM slice.
#
#   launch/tpu_run.sh TPU_NAME ZONE --config=configs/vit_l.py --workdir=gs://BUCKET/univit_l
#
# Copies this checkout to each worker, installs the pinned requirements plus jax[tpu] at the same
# jax version, and starts `python -m univit_jax.main` with the given flags on all workers at once
# (jax.distributed discovers the slice on TPU VMs). The persistent compilation cache lives in
# $HOME/jax_cache on each worker.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  sed -n '2,10p' "$0"
  exit 2
fi
name=$1 zone=$2
shift 2
jax_version=$(sed -n 's/^jax==//p' "$(dirname "$0")/../requirements.txt")
root=$(cd "$(dirname "$0")/.." && pwd)
tar -C "$root" --exclude=.venv --exclude=.git -czf /tmp/univit_jax.tgz .
gcloud compute tpus tpu-vm scp /tmp/univit_jax.tgz "$name":/tmp/ --zone="$zone" --worker=all
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="
  set -e
  mkdir -p ~/univit_jax && tar -C ~/univit_jax -xzf /tmp/univit_jax.tgz && cd ~/univit_jax
  python3 -m venv .venv
  .venv/bin/pip install -q -r requirements.txt 'jax[tpu]==${jax_version}'
  JAX_COMPILATION_CACHE_DIR=\$HOME/jax_cache UNIVIT_DISTRIBUTED=1 \
    .venv/bin/python -m univit_jax.main $*
"
