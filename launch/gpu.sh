#!/usr/bin/env bash
# One CUDA GPU host (one process drives all its GPUs): install JAX's CUDA 13 wheels, run a config.
#   launch/gpu.sh heter --workdir runs/heter-gpu --config.model.dtype=bfloat16
# All local GPUs form one mesh; set its axes with --config.mesh.fsdp=-1 --config.mesh.tensor=2
# (see the README's memory table). Flags passed: everything after the config name goes to
# python -m ffrag_jax.launch unchanged. JAX's persistent compilation cache is on by default on
# GPU (~/.cache/ffrag_jax/xla; compilation_cache=off or a folder to change it).
# CUDA 12 drivers: JAX_CUDA=cuda12 launch/gpu.sh ...
set -euo pipefail
config=${1:-demo}; shift || true
cd "$(dirname "$0")/.."
python -m pip install -q -U "jax[${JAX_CUDA:-cuda13}]"
python -m pip install -q -e .
exec python -m ffrag_jax.launch --config "$config" "$@"
