"""Tabulates ``bench/rerank_seeds.sh``'s runs: per arm (the reranker's labels), the fused
models' held-out metrics after the last round every run reached, mean over the clients, then
mean and sample standard deviation over the seeds; reranked next to retriever-only (the same
models reading the retriever's top candidate).

    python bench/rerank_table.py /tmp/rr [--round N] [--markdown bench/results/rerank_seeds.md]
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import statistics

METRICS = ("answerable_em", "recall@1", "conflict_accuracy")
ARM_NAMES = {"relevance": "relevance (baseline)", "likelihood": "preference (likelihood)",
             "answer": "preference (answer)"}


def fused_means(run: pathlib.Path) -> dict[int, dict[str, float]]:
    """round -> metric -> mean over the clients of the fused models' eval records."""
    by_round = collections.defaultdict(list)
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") == "eval" and r.get("model") == "fused":
            by_round[r["round"]].append(r)
    keys = [*METRICS, *(f"retriever_only_{m}" for m in METRICS), "rerank_ms_per_question"]
    return {rnd: {k: statistics.fmean(float(r[k]) for r in rs) for k in keys}
            for rnd, rs in by_round.items()}


def mean_sd(xs: list[float]) -> str:
    if len(xs) < 2:
        return f"{xs[0]:.3f}" if xs else "-"
    return f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=pathlib.Path)
    p.add_argument("--round", type=int, help="this round (default: the last all runs reached)")
    p.add_argument("--markdown", type=pathlib.Path, help="also write the table here")
    args = p.parse_args()
    runs = {d.name: fused_means(d) for d in sorted(args.folder.iterdir())
            if (d / "metrics.jsonl").exists()}
    runs = {k: v for k, v in runs.items() if v}
    if not runs:
        raise SystemExit(f"{args.folder}: no run with an evaluated round")
    rnd = args.round if args.round is not None else min(max(v) for v in runs.values())
    arms = collections.defaultdict(dict)  # arm -> seed -> metrics
    for name, by_round in runs.items():
        arm, seed = name.rsplit("-", 1)
        if rnd in by_round:
            arms[arm][seed] = by_round[rnd]
    lines = [f"Round {rnd}, fused models, held-out questions, mean over clients; mean ± sd "
             "over seeds (reranked / retriever only).", "",
             "| reranker labels | seeds | answerable EM | recall@1 | conflict accuracy | "
             "rerank ms/question |", "|---|---|---:|---:|---:|---:|"]
    for arm in [a for a in ARM_NAMES if a in arms] + sorted(set(arms) - set(ARM_NAMES)):
        seeds = arms[arm]
        cells = [f"{mean_sd([m[k] for m in seeds.values()])} / "
                 f"{mean_sd([m['retriever_only_' + k] for m in seeds.values()])}"
                 for k in METRICS]
        ms = mean_sd([m["rerank_ms_per_question"] for m in seeds.values()])
        lines.append(f"| {ARM_NAMES.get(arm, arm)} | {','.join(sorted(seeds))} | "
                     f"{' | '.join(cells)} | {ms} |")
    lines += ["", "Per seed, answerable EM reranked (retriever only):", ""]
    for arm, seeds in sorted(arms.items()):
        lines.append(f"- {arm}: " + ", ".join(
            f"seed {s} {m['answerable_em']:.3f} ({m['retriever_only_answerable_em']:.3f})"
            for s, m in sorted(seeds.items())))
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
