"""Re-decodes a finished knowledge-boundary run with another reading rule or answer-or-abstain
gate, without training again, and prints the boundary metrics of its fused models (per client
and their mean), as its last evaluation would have written them with those settings:

    python tools/redecode.py WORKDIR                                  # as the run decoded
    python tools/redecode.py WORKDIR --abstain-threshold 0.5          # the gate at 0.5
    python tools/redecode.py WORKDIR --reading first_answer --rerank

Decoding changes no training (the rules act on the held-out answers only), so the numbers
equal those of a run with ``--config.boundary.abstain_threshold`` / ``--config.boundary.
reading`` set. The questions are the run's held-out ones (``predictions.jsonl``); each client's
exported system answers them (:meth:`ffrag_jax.rag.system.RagSystem.ask`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

KEYS = ("answerable_em", "abstain_precision", "abstain_recall", "abstain_f1",
        "hallucination_rate", "conflict_accuracy", "attribution_accuracy")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--reading", default=None,
                        help="top, first_answer or authority_first (default: the run's)")
    parser.add_argument("--abstain-threshold", type=float, default=None,
                        help="the gate's threshold; 0: plain greedy (default: the run's)")
    parser.add_argument("--rerank", action="store_true", help="rerank with the run's reranker")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args(argv)

    from ffrag_jax.errors import UserError
    from ffrag_jax.evaluation.boundary import abstain_gate, boundary_metrics
    from ffrag_jax.rag.system import load_system

    try:
        path = args.workdir / "predictions.jsonl"
        if not path.exists():
            raise UserError(f"{path} does not exist: is {args.workdir} a finished run?")
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        rows = [r for r in rows if r["model"] == "fused"]
        if not rows or "type" not in rows[0]:
            raise UserError(f"{args.workdir}: no fused predictions of a knowledge-boundary run")
        per = {}
        for k in sorted({r["client"] for r in rows}):
            mine = [r for r in rows if r["client"] == k]
            system = load_system(args.workdir, k)
            if args.reading is not None:
                system.reading = args.reading
            if args.abstain_threshold is not None:
                system.abstain = abstain_gate(system.tokenizer, args.abstain_threshold or None)
            out = system.ask([r["question"] for r in mine], rerank=args.rerank,
                             max_new_tokens=args.max_new_tokens, batch_size=50)
            # "wrong" (the conflicting case note's value) is not in the predictions: the
            # conflict case rate is left out.
            questions = [{"type": r["type"], "answer": r["answer"], "wrong": "\0"}
                         for r in mine]
            per[k] = boundary_metrics([o["answer"] for o in out], questions)
            print(json.dumps({"client": k, "name": mine[0]["name"],
                              **{m: round(float(per[k][m]), 4) for m in KEYS}}), flush=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def average(values: list[float]) -> float:  # NaN, not a warning, when every client's is
        values = [v for v in values if not np.isnan(v)]
        return round(float(np.mean(values)), 4) if values else float("nan")

    mean = {m: average([float(per[k][m]) for k in per]) for m in KEYS}
    print(json.dumps({"client": "mean", **mean}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
