#!/usr/bin/env bash
# The federated LoRA job on Flower's deployment runtime, on this machine: one SuperLink, N
# SuperNodes (client k gets --node-config "partition-id=k num-partitions=N"), the job started
# with `flwr run`; every process it started is stopped by PID when the run ends or fails.
#
#   launch/flower_local.sh WORKDIR N [launcher flags...]
#   launch/flower_local.sh runs/fed 3 --config heter --config.fl.num_clients=3 \
#       '--config.lora.generator.ranks=(4,2,2)'
#
# Environment: FLOWER_PORT (SuperLink's runtime API, default 9093: SuperNodes reach
# 127.0.0.1:FLOWER_PORT, flwr run its control API on the same port), FLOWER_NODE_PORT (the
# first SuperNode's own API port, default 9200; node k uses +k), FLOWER_TIMEOUT (seconds for
# the whole run, default 1800). Logs: WORKDIR.flower-logs/. Separate machines: see the README.
set -euo pipefail
workdir=$1; n=$2; shift 2
here=$(cd "$(dirname "$0")" && pwd)
port=${FLOWER_PORT:-9093}; node_port=${FLOWER_NODE_PORT:-9200}; limit=${FLOWER_TIMEOUT:-1800}
logs="${workdir%/}.flower-logs"; mkdir -p "$logs"
config=$(python -m ffrag_jax.federated.flower.configure --workdir "$workdir" "$@")
home=$(mktemp -d)  # flwr's own settings: the SuperLink connection below, nothing global
trap 'rm -rf "$home"' EXIT
pids=()
stop() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  sleep 1
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  rm -rf "$home"
}
trap stop EXIT INT TERM

export FLWR_HOME=$home
cat > "$home/config.toml" <<TOML
[superlink]
default = "local-deployment"

[superlink.local-deployment]
address = "127.0.0.1:$port"
insecure = true
TOML

flower-superlink --insecure --host 127.0.0.1 --port "$port" --database "$home/state.db" \
  > "$logs/superlink.log" 2>&1 &
pids+=($!)
for k in $(seq 0 $((n - 1))); do
  flower-supernode --insecure --superlink "127.0.0.1:$port" --port $((node_port + k)) \
    --node-config "partition-id=$k num-partitions=$n" > "$logs/supernode_$k.log" 2>&1 &
  pids+=($!)
done
echo "SuperLink pid ${pids[0]}, SuperNodes ${pids[*]:1}; logs in $logs" >&2

started=0
for try in $(seq 1 60); do  # until the SuperLink listens
  out=$(flwr run "$here/flower_app" local-deployment --format json \
    --run-config "config-file='$config' workdir='$(realpath -m "$workdir")'" 2>&1 || true)
  case "$out" in *'"run-id"'*) started=1; break;; *unavailable*) sleep 1;; *) break;; esac
done
echo "$out" > "$logs/flwr_run.json"
if [ $started = 0 ]; then echo "error: flwr run failed: $out" >&2; exit 1; fi
run_id=$(python -c 'import json,sys; print(json.loads(sys.argv[1])["run-id"])' "$out")
echo "run $run_id started" >&2
deadline=$((SECONDS + limit))
while [ ! -f "$workdir/summary.json" ]; do
  status=$(flwr ls local-deployment --run-id "$run_id" --format json 2>/dev/null || true)
  case "$status" in
    *finished:failed*|*finished:stopped*)
      echo "error: the Flower run $run_id ended without a summary; see $logs" >&2
      flwr log "$run_id" local-deployment --show 2>/dev/null | tail -20 >&2 || true
      exit 1;;
  esac
  if [ $SECONDS -ge $deadline ]; then
    echo "error: no summary after FLOWER_TIMEOUT=$limit s; stopping everything" >&2
    exit 1
  fi
  sleep 2
done
echo "done: $workdir"
