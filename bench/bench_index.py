"""ScaNN vs exact search on 384-d MiniLM vectors at n = 100k and 1M: recall@10 of ScaNN
against exact search, queries/s of each, build time, index memory.

    python bench/bench_index.py                     # n = 100k and 1M; results in bench/results/
    python bench/bench_index.py --sizes 100000 --queries 500

Vectors: the real all-MiniLM-L6-v2 (Flax encoder) embeddings of the 7,067 SQuAD dev
paragraphs and DBpedia-subset documents, and, to reach n, synthetic clustered vectors: a real
passage embedding plus Gaussian noise (norm ~0.3-0.7), renormalised, so the synthetic points
sit in clusters around real ones. Queries are real: embeddings of SQuAD dev questions. Both
indexes use the dot product on unit vectors (cosine). Exact search is the jitted blocked
top-k of ``ffrag_jax.retrieval.index``; ScaNN is built with the library's defaults
(num_leaves ~ sqrt(n), AH 2 dims/block, anisotropic 0.2, reorder 100) and searched with a
sweep of leaves-to-search, the default (10% of leaves) first.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import report  # bench/report.py (the script's folder is on sys.path)

from ffrag_jax.retrieval import beir
from ffrag_jax.retrieval import index as index_lib
from ffrag_jax.retrieval.encoder import TextEncoder

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CACHE = Path(os.environ.get("FFRAG_BENCH_CACHE", Path(tempfile.gettempdir()) / "ffrag_bench"))


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def real_vectors(data: Path, num_queries: int) -> tuple[np.ndarray, np.ndarray]:
    """(passage embeddings, question embeddings), cached between runs."""
    CACHE.mkdir(parents=True, exist_ok=True)
    cached = CACHE / "minilm_squad_dbpedia.npz"
    if cached.exists():
        z = np.load(cached)
        if len(z["queries"]) >= num_queries:
            return z["passages"], z["queries"][:num_queries]
    encoder = TextEncoder.load()
    paragraphs, questions = beir.load_squad(data / "squad" / "dev-v1.1.json")
    docs, _, _ = beir.load_beir(data / "beir-dbpedia-subset")
    passages = encoder.embed([p["text"] for p in paragraphs] + [d["text"] for d in docs],
                             progress=True)
    rng = np.random.default_rng(0)
    picked = rng.choice(len(questions), num_queries, replace=False)
    queries = encoder.embed([questions[i]["text"] for i in picked], progress=True)
    np.savez(cached, passages=passages, queries=queries)
    return passages, queries


def corpus(passages: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, passages.shape[1]), np.float32)
    real = min(n, len(passages))
    out[:real] = passages[:real]
    for start in range(real, n, 200_000):
        m = min(200_000, n - start)
        centers = passages[rng.integers(0, len(passages), m)]
        sigma = rng.uniform(0.015, 0.035, (m, 1)).astype(np.float32)
        noisy = centers + sigma * rng.standard_normal((m, passages.shape[1]), np.float32)
        out[start : start + m] = index_lib.normalize(noisy)
    return out


def recall_at_10(ids: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth, strict=True)]))


def timed_search(index, queries, repeats=3, **kwargs) -> tuple[float, tuple]:
    index.search(queries[:64], 10, **kwargs)  # warm-up (compilation, thread pools)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = index.search(queries, 10, **kwargs)
        best = min(best, time.perf_counter() - t)
    return len(queries) / best, out


def bench_size(n: int, passages, queries) -> list[dict]:
    vectors = corpus(passages, n)
    rows = []
    before = rss_mb()
    t = time.perf_counter()
    exact = index_lib.ExactIndex(vectors, "dot")
    exact_build = time.perf_counter() - t
    exact_qps, (_, truth) = timed_search(exact, queries, repeats=2)
    rows.append({"n": n, "index": "exact", "leaves_to_search": None, "recall@10": 1.0,
                 "qps": exact_qps, "build_s": exact_build, "index_mb": vectors.nbytes / 2**20,
                 "rss_growth_mb": rss_mb() - before})
    print(rows[-1], flush=True)
    del exact
    before = rss_mb()
    t = time.perf_counter()
    scann = index_lib.ScannIndex(vectors, "dot")
    build = time.perf_counter() - t
    growth = rss_mb() - before
    folder = Path(tempfile.mkdtemp())
    scann.save(folder)
    disk = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20
    shutil.rmtree(folder)
    leaves = scann.settings["num_leaves"]
    default = scann.settings["num_leaves_to_search"]
    for search in sorted({default, max(1, leaves // 40), max(1, leaves // 20),
                          max(1, leaves // 5)}, key=lambda s: (s != default, s)):
        qps, _ = timed_search(scann, queries, leaves_to_search=search)
        _, ids = scann.search(queries, 10, leaves_to_search=search)
        rows.append({"n": n, "index": "scann", "leaves_to_search": search, "num_leaves": leaves,
                     "recall@10": recall_at_10(ids, truth), "qps": qps, "build_s": build,
                     "index_mb": disk, "rss_growth_mb": growth,
                     "speedup_over_exact": qps / exact_qps})
        print(rows[-1], flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--data", type=Path, default=DATA)
    args = p.parse_args(argv)
    passages, queries = real_vectors(args.data, args.queries)
    rows = [row for n in args.sizes for row in bench_size(n, passages, queries)]
    result = {"machine": report.machine(),
              "args": vars(args) | {"data": str(args.data)}, "rows": rows,
              "command": report.command()}
    lines = [f"# ScaNN vs exact search, 384-d MiniLM vectors ({os.cpu_count()} CPU cores)", "",
             f"{args.queries} real query embeddings (SQuAD dev questions), k = 10.", "",
             "| n | index | leaves searched | recall@10 | queries/s | vs exact | build s | "
             "index MB | RSS growth MB |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        leaves = "" if r["leaves_to_search"] is None else \
            f"{r['leaves_to_search']} of {r['num_leaves']}"
        lines.append(f"| {r['n']:,} | {r['index']} | {leaves} | {r['recall@10']:.3f} | "
                     f"{r['qps']:.0f} | {r.get('speedup_over_exact', 1.0):.1f}x | "
                     f"{r['build_s']:.1f} | {r['index_mb']:.0f} | {r['rss_growth_mb']:.0f} |")
    report.save("index_cpu", result, lines)


if __name__ == "__main__":
    main()
