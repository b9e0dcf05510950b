#!/usr/bin/env bash
# Single-host CUDA GPU(s): install JAX with CUDA wheels, then run a config.
#   launch/gpu.sh demo --config.model.dtype=bfloat16
# All local GPUs form one mesh; set the axes with --config.mesh.data=-1 --config.mesh.tensor=2 ...
set -euo pipefail
config=${1:-demo}; shift || true
cd "$(dirname "$0")/.."
python -m pip install -q -U "jax[cuda12]"
python -m pip install -q -e .
python -m ffrag_jax.launch --config "$config" "$@"
