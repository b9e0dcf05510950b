"""Sentence-encoder throughput: the Flax encoder (``embed_texts``, jitted) against
sentence-transformers (PyTorch) on the same texts, all-MiniLM-L6-v2, CPU.

    python bench/bench_encoder.py            # SQuAD dev paragraphs and questions

Both encode the same texts with the same truncation (256 tokens) and batch size; the JAX
column excludes compilation (a warm-up pass over the same shapes runs first).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import report  # bench/report.py (the script's folder is on sys.path)

from ffrag_jax.retrieval import beir
from ffrag_jax.retrieval.encoder import TextEncoder, default_encoder_path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--texts", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args(argv)
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(os.cpu_count())
    paragraphs, questions = beir.load_squad(DATA / "squad" / "dev-v1.1.json")
    sets = {"paragraphs": [x["text"] for x in paragraphs[: args.texts]],
            "questions": [x["text"] for x in questions[: args.texts]]}
    ours = TextEncoder.load()
    ref = SentenceTransformer(str(default_encoder_path()), device="cpu")
    rows = []
    for name, texts in sets.items():
        lengths = ours.tokenizer(texts, truncation=True, max_length=256)["input_ids"]
        tokens = sum(len(x) for x in lengths)
        ours.embed(texts, batch_size=args.batch)  # compile every bucket shape
        t = time.perf_counter()
        a = ours.embed(texts, batch_size=args.batch)
        jax_s = time.perf_counter() - t
        ref.encode(texts[: args.batch], batch_size=args.batch)
        t = time.perf_counter()
        b = ref.encode(texts, batch_size=args.batch, convert_to_numpy=True)
        torch_s = time.perf_counter() - t
        rows.append({"texts": name, "count": len(texts), "tokens": tokens, "jax_s": jax_s,
                     "torch_s": torch_s, "speedup": torch_s / jax_s,
                     "max_abs_diff": float(np.abs(a - b).max())})
        print(rows[-1], flush=True)
    result = {"machine": report.machine(),
              "args": vars(args), "rows": rows, "command": report.command()}
    lines = [f"# all-MiniLM-L6-v2 encoding, Flax vs sentence-transformers ({os.cpu_count()} "
             "CPU cores)", "", "| texts | count | tokens | JAX s | PyTorch s | JAX speed-up | "
             "max abs diff |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['texts']} | {r['count']} | {r['tokens']} | {r['jax_s']:.2f} | "
                     f"{r['torch_s']:.2f} | {r['speedup']:.2f}x | {r['max_abs_diff']:.1e} |")
    report.save("encoder_cpu", result, lines)


if __name__ == "__main__":
    main()
