#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (single host such as v4-8, or a multi-host pod slice): the same
# command runs on every worker (--worker=all) and jax.distributed finds the others by itself.
#
#   launch/tpu_pod.sh --name=my-v4-32 --zone=us-central2-b [--project=P] [--dry-run] [--skip-setup] \
#       --config=configs/train/paper.py:llama2_7b,response --config.train.out_dir=gs://BUCKET/run
#
# Set-up ships this checkout (git archive of HEAD) to every worker, unpacks it into ~/jax_implicit
# and installs it with jax[tpu]. Commands other than training (--module=jax_implicit.generate, ...) run
# on worker 0 only, where process 0 wrote the HF export. Multi-host checkpoints need an out_dir all
# workers share (GCS/NFS);
# gated hub models need HF_TOKEN on the workers. --dry-run prints the commands without running them.
source "$(dirname "$0")/common.sh"
parse_args name zone project -- "$@"
require name zone
GCLOUD_FLAGS=(--zone="${OPTS[zone]}" --worker=all)
[[ -n ${OPTS[project]:-} ]] && GCLOUD_FLAGS+=(--project="${OPTS[project]}")
NAME=${OPTS[name]}
TARBALL=/tmp/jax_implicit-$NAME.tar.gz

if (( ! SKIP_SETUP )); then
  run git archive --format=tar.gz --output="$TARBALL" HEAD
  run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME":jax_implicit.tar.gz "${GCLOUD_FLAGS[@]}"
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" --command="set -e; mkdir -p ~/jax_implicit && \
tar -xzf ~/jax_implicit.tar.gz -C ~/jax_implicit && cd ~/jax_implicit && $(setup_command 'jax[tpu]')"
fi
single_process && GCLOUD_FLAGS=("${GCLOUD_FLAGS[@]/--worker=all/--worker=0}")
run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" --command="cd ~/jax_implicit && $(module_command)"
