#!/usr/bin/env bash
# A Cloud TPU VM slice (v4, v5e, v5p, ... any number of hosts): the same command on every
# worker. JAX finds the other workers from the TPU metadata (the launcher calls
# jax.distributed.initialize when TPU_WORKER_HOSTNAMES lists more than one host), process 0
# writes the workdir, and orbax writes the checkpoints from every worker, so --workdir must be
# on storage all workers see (a GCS FUSE or Filestore mount).
#   launch/tpu_pod.sh TPU_NAME ZONE heter --workdir /mnt/shared/heter-v4-32 \
#       --config.mesh.clients=1 --config.mesh.fsdp=-1
# Flags passed: the config name, then everything after it, to python -m ffrag_jax.launch.
# The checkout is expected at ~/ffrag_jax on every worker (gcloud ... scp --worker=all).
set -euo pipefail
tpu=$1 zone=$2 config=$3; shift 3
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "
  set -e; cd ~/ffrag_jax &&
  python -m pip install -q -U 'jax[tpu]' && python -m pip install -q -e . &&
  python -m ffrag_jax.launch --config $config$args"
