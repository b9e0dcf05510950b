"""Retrieval quality of the packaged all-MiniLM-L6-v2 (Flax encoder), BM25 and their hybrid on
the shared BEIR DBpedia subset and on SQuAD v1.1 dev as a retrieval task.

    python bench/bench_retrieval.py            # both datasets; results in bench/results/

Every query is scored; SQuAD uses all 10,570 dev questions against the 2,067 paragraphs
(each question's own paragraph is its one relevant document). Documents longer than the
encoder's 256 tokens are chunked (200 tokens, overlap 32) and ranked by their best chunk.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import report  # bench/report.py (the script's folder is on sys.path)

from ffrag_jax.retrieval import beir
from ffrag_jax.retrieval.encoder import TextEncoder
from ffrag_jax.retrieval.knowledge_base import KnowledgeBase

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def evaluate(name, docs, queries, qrels, encoder, depth=100):
    t = time.perf_counter()
    kb = KnowledgeBase.build(name, docs, encoder, progress=True)
    build_s = time.perf_counter() - t
    qids = list(queries)
    t = time.perf_counter()
    embedded = encoder.embed([queries[q] for q in qids], progress=True)
    embed_s = time.perf_counter() - t
    rows = []
    for mode in ("dense", "bm25", "hybrid"):
        t = time.perf_counter()
        hits = kb.search_ids([queries[q] for q in qids], depth, mode,
                             query_embeddings=None if mode == "bm25" else embedded)
        search_s = time.perf_counter() - t
        ranked = {q: beir.dedupe_docs([kb.chunks[i]["doc_id"] for i, _ in row], depth)
                  for q, row in zip(qids, hits, strict=True)}
        rows.append({"dataset": name, "mode": mode, **beir.scores(ranked, qrels),
                     "search_s": search_s})
        print(rows[-1], flush=True)
    return rows, {"dataset": name, "documents": len(docs), "chunks": len(kb),
                  "queries": len(qids), "build_s": build_s, "query_embed_s": embed_s}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DATA)
    args = p.parse_args(argv)
    encoder = TextEncoder.load()
    rows, sizes = [], []
    docs, queries, qrels = beir.load_beir(args.data / "beir-dbpedia-subset")
    r, s = evaluate("dbpedia-subset", docs, queries, qrels, encoder)
    rows += r
    sizes.append(s)
    paragraphs, questions = beir.load_squad(args.data / "squad" / "dev-v1.1.json")
    r, s = evaluate("squad-dev", paragraphs, {q["id"]: q["text"] for q in questions},
                    {q["id"]: {q["paragraph"]: 1} for q in questions}, encoder)
    rows += r
    sizes.append(s)
    result = {"machine": report.machine(),
              "encoder": encoder.identity, "rows": rows, "sizes": sizes,
              "command": report.command()}
    lines = ["# Retrieval quality: all-MiniLM-L6-v2 (Flax), BM25 (bm25s), hybrid (RRF)", "",
             "| dataset | mode | recall@1 | recall@10 | recall@100 | MRR@10 | nDCG@10 | queries |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['mode']} | {r['recall@1']:.3f} | "
                     f"{r['recall@10']:.3f} | {r['recall@100']:.3f} | {r['mrr@10']:.3f} | "
                     f"{r['ndcg@10']:.3f} | {r['queries']} |")
    lines += ["", "| dataset | documents | chunks | build s (chunk, embed, index) | "
              "query embedding s |", "|---|---:|---:|---:|---:|"]
    for s in sizes:
        lines.append(f"| {s['dataset']} | {s['documents']} | {s['chunks']} | "
                     f"{s['build_s']:.1f} | {s['query_embed_s']:.1f} |")
    report.save("retrieval_cpu", result, lines)


if __name__ == "__main__":
    main()
