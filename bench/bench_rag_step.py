"""Cost of the end-to-end RAG step against the number of passages K (1, 2, 4, 8).

    python bench/bench_rag_step.py

One jitted ``rag.rag_step`` (RAG-sequence + LSR, generator LoRA and query-encoder LoRA both
trained; passages given as index vectors, as in query-side training) on B questions with K
passages each. The generator is the demo-sized tiny Llama (d=128, 4 layers), the retriever
the packaged all-MiniLM-L6-v2. Each K runs in its own subprocess (its own peak RSS); the time
is a warm step. The generator's work grows with B*K sequences, the encoder's does not, so the
step should cost about K times the K=1 generator part.

``--model 1b`` uses Llama-3.2-1B's shape (random weights) for the generator; ``--device gpu``
runs on JAX's GPU backend with the generator in bfloat16 (LoRA and AdamW float32) and writes
``rag_step_gpu*``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import report  # bench/report.py (the script's folder is on sys.path)

GENERATORS = {
    "tiny": dict(vocab_size=1536, hidden_size=128, intermediate_size=384, num_layers=4,
                 num_heads=4, num_kv_heads=2),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
               num_heads=32, num_kv_heads=8, tie_word_embeddings=True, rope_theta=500000.0),
}


def worker(k: int, args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ffrag_jax import rag
    from ffrag_jax.models import llama, lora
    from ffrag_jax.retrieval.encoder import TextEncoder
    from ffrag_jax.training import train

    enc = TextEncoder.load()
    shape = GENERATORS[args.model]
    dtype = "bfloat16" if args.device == "gpu" else "float32"
    gen_cfg = llama.LlamaConfig(**shape, max_position_embeddings=max(
        256, args.prompt_len + args.answer_len), dtype=dtype, param_dtype=dtype)
    gen_params = llama.init_params(jax.random.key(0), gen_cfg)
    rng = np.random.default_rng(0)
    b, p, t = args.batch, args.prompt_len, args.answer_len
    batch = {
        "gen_ids": rng.integers(3, shape["vocab_size"], (b, k, p + t)).astype(np.int32),
        "gen_mask": np.ones((b, k, p + t), np.int32),
        "targets": rng.integers(3, shape["vocab_size"], (b, t)).astype(np.int32),
        "answer_mask": np.ones((b, t), np.int32),
        "query_ids": rng.integers(1000, 20000, (b, 24)).astype(np.int32),
        "query_mask": np.ones((b, 24), np.int32),
        "passage_emb": rng.normal(size=(b, k, 384)).astype(np.float32),
    }
    batch = {key: jnp.asarray(v) for key, v in batch.items()}
    opt_g, opt_r = train.make_optimizer(1e-3, 100), train.make_optimizer(1e-4, 100)
    states = {"generator": train.init_train_state(
                  lora.init(jax.random.key(1), gen_params, ["q_proj", "v_proj"], 8, 16.0), opt_g),
              "retriever": train.init_train_state(
                  lora.init(jax.random.key(2), enc.params, ["query", "value"], 8, 16.0), opt_r)}
    cfg = rag.RagLossConfig(weights=(("rag_sequence", 1.0), ("lsr", 0.5)))
    frozen = {"generator": gen_params, "retriever": enc.params}

    def step(states, i):
        return rag.rag_step(states, frozen, batch, jax.random.key(i), gen_cfg=gen_cfg,
                            enc_cfg=enc.cfg, loss_cfg=cfg, optimizers=(opt_g, opt_r))

    t0 = time.perf_counter()
    states, m = step(states, 0)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(1, args.repeats + 1):
        t0 = time.perf_counter()
        states, m = step(states, i)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    return {"k": k, "step_s": min(times), "compile_s": compile_s,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=96)
    p.add_argument("--answer-len", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", choices=sorted(GENERATORS), default="tiny")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "gpu":
        import jax

        if jax.default_backend() != "gpu":
            p.error(f"--device gpu, but JAX runs on {jax.default_backend()}")
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    rows = []
    for k in args.ks:
        cmd = [sys.executable, __file__, "--worker", str(k), "--batch", str(args.batch),
               "--prompt-len", str(args.prompt_len), "--answer-len", str(args.answer_len),
               "--repeats", str(args.repeats), "--model", args.model, "--device", args.device]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    base = rows[0]["step_s"] / rows[0]["k"]
    for r in rows:
        r["vs_k_times_k1"] = r["step_s"] / (r["k"] * base)
    result = {"machine": report.machine(),
              "args": {k: v for k, v in vars(args).items() if k != "worker"}, "rows": rows,
              "command": report.command()}
    generator = "tiny Llama" if args.model == "tiny" else "Llama-3.2-1B-shaped"
    lines = [f"# End-to-end RAG step against K ({args.device}, {os.cpu_count()} CPU cores)",
             "", f"B = {args.batch} questions, prompt {args.prompt_len} + answer "
             f"{args.answer_len} tokens per passage; {generator} generator "
             f"({'bf16' if args.device == 'gpu' else 'fp32'}) + MiniLM query encoder, both "
             "LoRA.", "",
             "| K | step s | step / (K x K=1 step) | compile s | peak RSS MB |",
             "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['k']} | {r['step_s']:.3f} | {r['vs_k_times_k1']:.2f} | "
                     f"{r['compile_s']:.1f} | {r['peak_rss_mb']:.0f} |")
    report.save(f"rag_step_{args.device}" + ("" if args.model == "tiny" else f"_{args.model}"),
                result, lines)


if __name__ == "__main__":
    main()
