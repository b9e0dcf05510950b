#!/usr/bin/env bash
# Issue 17's reranker comparison over seeds, every run at once (one process per seed and label
# kind; made for the GPU machine, where they share the H200 and its 16 cores; see
# ../shared/device/README.md and begin with `source .device/env.sh &&` there). Each run has a
# time cap; a capped run still leaves the rounds it evaluated. Each run's metrics.jsonl,
# predictions.jsonl, summary.json, config.json and log go to $OUT/<arm>-<seed>/ (its workdir,
# checkpoints included, stays in $WORK/<arm>-<seed>, by default /tmp/rerank-seeds/<OUT's
# name>/); `python bench/rerank_table.py $OUT` tabulates them.
#   OUT=/tmp/rr SEEDS="0 1 2" ARMS="relevance likelihood answer" CAP=500 bash bench/rerank_seeds.sh
#   EXTRA="--config.fl.rounds=1 ..." adds flags to every run (a quick check of the script).
set -uo pipefail
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # the runs share the GPU
out=${OUT:?set OUT to the results folder}
cap=${CAP:-500}
mkdir -p "$out"
work_root=${WORK:-/tmp/rerank-seeds/$(basename "$out")}
for seed in ${SEEDS:-0 1 2}; do
  for arm in ${ARMS:-relevance likelihood answer}; do
    case $arm in  # the labels the reranker learns from (rerank.labels / rerank.preference)
      relevance) labels=(--config.rerank.labels=relevance) ;;
      likelihood) labels=(--config.rerank.labels=preference --config.rerank.preference=likelihood) ;;
      answer) labels=(--config.rerank.labels=preference --config.rerank.preference=answer) ;;
      *) echo "unknown arm $arm" >&2; exit 2 ;;
    esac
    name=$arm-$seed work=$work_root/$arm-$seed
    mkdir -p "$out/$name"
    (
      start=$(date +%s)
      # shellcheck disable=SC2086  # EXTRA is a list of flags
      # --overwrite: a fresh run; the launcher deletes only the files of an ffrag_jax run
      # there and never touches a folder that is not one
      timeout "$cap" python -m ffrag_jax.launch --config boundary --workdir "$work" --overwrite \
        --config.seed="$seed" --config.pretrain.seed="$seed" \
        --config.boundary.dual_task=False --config.rerank.enabled=True "${labels[@]}" \
        --config.boundary.pretrain_abstain_rate=0 --config.pretrain.steps=2400 \
        --config.fl.retriever_lr=0 ${EXTRA:-} > "$out/$name/log.txt" 2>&1
      echo "exit status $? after $(( $(date +%s) - start )) s" >> "$out/$name/log.txt"
      cp "$work"/{metrics.jsonl,predictions.jsonl,summary.json,config.json} "$out/$name/" \
        2>/dev/null
    ) &
  done
done
wait
tail -n 1 "$out"/*/log.txt
