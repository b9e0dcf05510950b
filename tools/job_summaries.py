"""Runs every job shrunk (as the tests shrink them) and writes their ``summary.json`` to one
JSON file, so that a refactor can show that behaviour did not change:

    python tools/job_summaries.py /tmp/before.json          # on the old commit
    python tools/job_summaries.py /tmp/after.json           # on the new one
    python tools/job_summaries.py --compare /tmp/before.json /tmp/after.json

Wall times and absolute paths are left out (they differ between any two runs); everything
else must be identical. ``--only demo,heter_ff`` runs some cases. Run both sides on the same
machine: the numbers are float32 on this CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

# The shared data folder beside the checkout (../shared/data), or $FFRAG_SHARED_DATA.
SHARED_DATA = os.environ.get("FFRAG_SHARED_DATA",
                             Path(__file__).resolve().parents[2] / "shared/data")
SQUAD = Path(SHARED_DATA) / "squad/dev-v1.1.json"

TINY_MODEL = {"model.hidden_size": 32, "model.intermediate_size": 64, "model.num_layers": 2,
              "tokenizer.vocab_size": 400}
DEMO = {"pretrain.steps": 4, "pretrain.num_examples": 64, "pretrain.batch_size": 8,
        "data.domains": "clinic,legal", "data.private_entities": 4, "data.shared_entities": 1,
        "fl.num_clients": 2, "lora.generator.ranks": (4, 2), "fl.rounds": 2, "fl.local_steps": 2,
        "fl.batch_size": 4, "lora.retriever.rank": 2, "rag.k_private": 2, "rag.k_shared": 8,
        "tokenizer.path": None, "log_every": 1, "eval.batch_size": 8, **TINY_MODEL}
FFLORA = {"pretrain.steps": 4, "pretrain.num_examples": 64, "pretrain.batch_size": 8,
          "data.examples_per_client": 30, "fl.rounds": 2, "fl.batch_size": 8,
          "fl.micro_batch_size": 4, "eval.generate_batch_size": 8, "log_every": 2,
          "checkpoint_every": 2, **TINY_MODEL}
RAG = {"pretrain.steps": 4, "pretrain.num_examples": 64, "pretrain.batch_size": 8,
       "data.num_entities": 10, "data.num_test": 10, "train.steps": 2, "train.batch_size": 4,
       "log_every": 1, "checkpoint_every": 1, **TINY_MODEL}
LORA = {"pretrain.steps": 6, "train.steps": 4, "pretrain.num_examples": 64,
        "data.num_task_train": 64, "data.num_eval": 8, "eval.batch_size": 8,
        "pretrain.batch_size": 8, "train.batch_size": 8, "log_every": 2, "checkpoint_every": 2,
        **TINY_MODEL}
HETER = {"fl.num_clients": 4, "lora.generator.ranks": (4, 2, 2, 1), "fl.rounds": 3,
         "fl.batch_size": 8,
         "fl.micro_batch_size": 4, "fl.lr": 3e-3, "data.examples_per_client": 20,
         "data.held_out": 0.2, "eval.batch_size": 8, **TINY_MODEL}
RETRIEVER = {"data.path": str(SQUAD), "data.max_test_questions": 50, "train.steps": 4,
             "train.batch_size": 8, "log_every": 2, "checkpoint_every": 2}

CASES = {
    "demo": ("demo", DEMO),
    "demo_stack": ("demo", {**DEMO, "fl.strategy": "stack"}),
    "demo_vmap": ("demo", {**DEMO, "fl.vmap_clients": True}),
    "fflora": ("fflora", FFLORA),
    "rag_e2e": ("rag_e2e", RAG),
    "rag_e2e_passage_side": ("rag_e2e", {**RAG, "train.passage_side": True,
                                         "rag.refresh_every": 1}),
    "lora": ("lora", LORA),
    "heter_stack": ("heter", HETER),
    "heter_zeropad": ("heter", {**HETER, "fl.strategy": "zeropad"}),
    "heter_ff": ("heter", {**HETER, "fl.strategy": "ff"}),
    "heter_ff_chain": ("heter", {**HETER, "fl.strategy": "ff", "fl.fusion": "chain",
                                 "lora.generator.targets": "q_proj,o_proj"}),
    "homo_fedavg": ("heter", {**HETER, "lora.generator.ranks": (2, 2, 2, 2),
                              "fl.strategy": "fedavg",
                              "fl.fraction": 0.5}),
    "retriever": ("retriever", RETRIEVER),
}
VARIES = {"wall_time_s", "exported"}  # timings; absolute paths of the run's folder


def _load_config(name: str, overrides: dict):
    try:
        from ffrag_jax.cli.launch import load_config
    except ImportError:  # before the cli/ folder
        from ffrag_jax.launch import load_config
    return load_config(name, overrides)


def _run(config, workdir: Path) -> dict:
    try:
        from ffrag_jax.training.run import run
    except ImportError:
        from ffrag_jax.training.run import run
    return run(config, workdir)


def run_cases(names: list[str]) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            config_name, overrides = CASES[name]
            print(f"== {name}", file=sys.stderr, flush=True)
            summary = _run(_load_config(config_name, overrides), Path(tmp) / name)
            out[name] = {k: v for k, v in summary.items() if k not in VARIES}
    return out


def compare(before: dict, after: dict) -> list[str]:
    diffs = []
    for name in sorted(set(before) | set(after)):
        a, b = before.get(name), after.get(name)
        if a != b:
            diffs.append(f"{name}:\n  before {json.dumps(a, sort_keys=True)}\n"
                         f"  after  {json.dumps(b, sort_keys=True)}")
    return diffs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--compare", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated case names")
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(Path(p).read_text()) for p in args.paths)
        diffs = compare(before, after)
        print("\n".join(diffs) if diffs else f"identical: {', '.join(sorted(before))}")
        return 1 if diffs else 0
    names = [n for n in args.only.split(",") if n] or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case {unknown[0]!r}; cases: {', '.join(CASES)}")
    result = run_cases(names)
    Path(args.paths[0]).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
