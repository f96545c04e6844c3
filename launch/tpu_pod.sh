#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (every host runs the same command; jax.distributed starts
# itself from the TPU environment and each host feeds its own part of the global batch).
#
#   launch/tpu_pod.sh NAME ZONE TRAIN_FLAGS...
#   launch/tpu_pod.sh muse-v4-512 us-central2-b \
#       --config=configs/muse_base_3b.py --workdir=gs://BUCKET/muse_3b \
#       --config.data.source=pre_encoded --config.data.path=gs://BUCKET/preencoded
#
# Preemption: rerun the same line; the trainer resumes from the newest checkpoint in
# --workdir by itself (it loses at most train.ckpt_every steps).
set -euo pipefail
if [ $# -lt 3 ]; then
  sed -n '2,12p' "$0"
  exit 2
fi
name=$1 zone=$2
shift 2
repo=${MUSE_JAX_REPO:-$(git -C "$(dirname "$0")/.." remote get-url origin 2>/dev/null || echo "")}
if [ -z "$repo" ]; then
  echo "set MUSE_JAX_REPO to a git URL the TPU hosts can clone" >&2
  exit 2
fi
flags=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "
  set -e
  if [ ! -d muse_jax ]; then git clone -q $repo muse_jax; fi
  cd muse_jax && git pull -q
  python3 -m pip install -q -e '.[tpu]'
  muse-jax train$flags
"
