#!/usr/bin/env bash
# Cloud TPU VM / pod slice: the same command on every worker.
#   launch/tpu_pod.sh TPU_NAME ZONE demo --workdir gs://bucket/run1
# Multi-host initialisation (jax.distributed.initialize) is not wired in yet: today this runs
# single-host slices only (see the README's status section).
set -euo pipefail
tpu=$1 zone=$2 config=$3; shift 3
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "
  cd ffrag_jax && python -m pip install -q -U 'jax[tpu]' && python -m pip install -q -e . &&
  python -m ffrag_jax.launch --config $config $*"
