#!/usr/bin/env bash
# The issue-16 GPU measurements as one prepared run (the device machine: see
# ../shared/device/README.md; begin with `source .device/env.sh &&` there). Each part has its
# own time cap, so one slow part cannot eat the others' time; results land in bench/results/
# (*_gpu*) and the demo's timings in bench/results/demo_gpu.txt.
#   bash bench/gpu_suite.sh            # all parts
#   PARTS="lora round" bash bench/gpu_suite.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and PyTorch share the GPU in one process
parts=${PARTS:-"lora round rag demo"}
run() {  # name, cap in seconds, command...
  local name=$1 cap=$2; shift 2
  echo "== $name (cap ${cap}s): $*"
  timeout "$cap" "$@" || echo "== $name: exit status $?"
}
for part in $parts; do
  case $part in
    lora)  run lora 240 python bench/bench_lora_step.py --device gpu --llama2-7b --batch 16 \
             --seq 512 --rank 16 --remat none --attention xla --rounds 5 --steps 3 ;;
    round) run round 240 python bench/bench_round.py --device gpu --model 1b --clients 10 \
             --ranks 64 32 16 16 8 8 4 4 4 4 --steps 4 --batch 8 --seq 256 ;;
    rag)   run rag 120 python bench/bench_rag_step.py --device gpu --model 1b --ks 1 4 \
             --batch 8 --prompt-len 256 --answer-len 32 ;;
    demo)  # twice in fresh workdirs: the second run reads the persistent compilation cache
      for i in 1 2; do
        start=$(date +%s.%N)
        run "demo $i" 200 python -m ffrag_jax.launch --config demo --workdir "/tmp/demo-gpu-$i"
        echo "demo run $i: $(echo "$(date +%s.%N) - $start" | bc) s" | tee -a bench/results/demo_gpu.txt
      done ;;
  esac
done
