#!/usr/bin/env bash
# The federated LoRA job on Flower's deployment runtime, on this machine: one SuperLink and N
# SuperNodes as real processes on 127.0.0.1 (SuperNode k is client k: --node-config
# "partition-id=k num-partitions=N"), the job submitted with `flwr run`, every process stopped
# by PID when the run ends, fails or runs past FLOWER_TIMEOUT seconds (default 3600).
#
#   launch/flower_local.sh WORKDIR N [launcher flags...]
#   launch/flower_local.sh runs/fed 3 --config heter --config.fl.num_clients=3 \
#       '--config.lora.generator.ranks=(4,2,2)'
#
# Logs: WORKDIR.flower-logs/. Separate machines: see the README ("Flower on real machines").
exec python -m ffrag_jax.federated.flower.deployment "$@"
