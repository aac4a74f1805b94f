#!/usr/bin/env bash
# Train on one host with several GPUs: one process drives all local GPUs (the mesh spans them).
#
#   launch/gpu_host.sh [--mem-fraction=0.95] [--dry-run] [--skip-setup] --config=configs/train/paper.py:llama2_7b,response
#   launch/gpu_host.sh --skip-setup --module=jax_implicit.generate --config=configs/generate.py ...   # any command
#
# Run from the repository root. Set-up makes .venv with jax[cuda12]. JAX preallocates 75% of GPU
# memory by default; the plan (jax_implicit.plan) assumes up to 90% is usable, so raise it.
source "$(dirname "$0")/common.sh"
parse_args mem-fraction -- "$@"
if (( ! SKIP_SETUP )); then
  run bash -c "$(setup_command 'jax[cuda12]')"
fi
run env XLA_PYTHON_CLIENT_MEM_FRACTION="${OPTS[mem-fraction]:-0.95}" "$PYTHON" -m "$MODULE" "${CMD_ARGS[@]}"
