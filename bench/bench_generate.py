"""Greedy decoding: ffrag_jax's KV-cached ``generate`` vs a full forward per new token (what it
did before the cache) vs ``transformers`` ``generate`` (PyTorch, with its KV cache), side by
side on the same random Llama and the same prompts.

    python bench/bench_generate.py                       # defaults sized for a 2-core CPU
    python bench/bench_generate.py --hidden 1024 --layers 16 --new 128

Reports new tokens per second (batch x new tokens / wall time of one call, after a warm-up
call that compiles) and checks that the three produce the same tokens. Writes
bench/results/generate_<backend>.{json,md}.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import report  # noqa: E402  (bench/report.py)

from ffrag_jax.models import hf  # noqa: E402
from ffrag_jax.models.generate import generate  # noqa: E402
from ffrag_jax.models.llama import forward  # noqa: E402


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens"))
def generate_uncached(params, cfg, input_ids, prompt_len, max_new_tokens):
    """Greedy decoding with one full forward over the whole buffer per new token."""
    batch = input_ids.shape[0]
    buffer = jnp.pad(input_ids, ((0, 0), (0, max_new_tokens)))
    rows = jnp.arange(batch)

    def body(t, carry):
        buffer, out = carry
        pos = prompt_len + t - 1
        token = jnp.argmax(forward(params, cfg, buffer)[rows, pos], -1).astype(buffer.dtype)
        return buffer.at[rows, pos + 1].set(token), out.at[:, t].set(token)

    out = jnp.zeros((batch, max_new_tokens), input_ids.dtype)
    return jax.lax.fori_loop(0, max_new_tokens, body, (buffer, out))[1]


def timed(fn, repeats: int) -> tuple[float, np.ndarray]:
    out = np.asarray(fn())  # warm-up (compiles)
    start = time.perf_counter()
    for _ in range(repeats):
        out = np.asarray(fn())
    return (time.perf_counter() - start) / repeats, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf_cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=int(2.75 * args.hidden) // 64 * 64,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads,
                         max_position_embeddings=args.prompt + args.new, tie_word_embeddings=False)
    model = LlamaForCausalLM(hf_cfg).eval()
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        cfg, params = hf.load_llama(folder)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, args.vocab, (args.batch, args.prompt)).astype(np.int32)
    lens = np.full((args.batch,), args.prompt, np.int32)  # full prompts: HF needs no padding
    new_tokens = args.batch * args.new
    rows = []

    def add(name, seconds, tokens):
        rows.append({"decoder": name, "seconds": seconds, "new_tokens_per_s": new_tokens / seconds})
        print(rows[-1], flush=True)
        return tokens

    cached = add("ffrag_jax generate (KV cache)", *timed(
        lambda: generate(params, cfg, ids, lens, args.new), args.repeats))
    uncached = add("ffrag_jax, full forward per token", *timed(
        lambda: generate_uncached(params, cfg, ids, lens, args.new), args.repeats))
    torch.set_num_threads(os.cpu_count() or 1)
    with torch.no_grad():
        def hf_generate():
            out = model.generate(torch.as_tensor(ids, dtype=torch.long), do_sample=False,
                                 max_new_tokens=args.new, min_new_tokens=args.new,
                                 pad_token_id=0)
            return out[:, args.prompt:].numpy()
        reference = add("transformers generate (KV cache)", *timed(hf_generate, args.repeats))
    same = {"uncached": float(np.mean(cached == uncached)),
            "transformers": float(np.mean(cached == reference))}
    base = rows[0]["new_tokens_per_s"]
    result = {"machine": report.machine(), "backend": jax.default_backend(),
              "args": vars(args), "rows": rows, "token_agreement_with_cached": same,
              "command": report.command()}
    lines = [f"# Greedy decoding, batch {args.batch}, prompt {args.prompt}, {args.new} new "
             f"tokens (Llama d={args.hidden}, {args.layers} layers, GQA {args.heads}/"
             f"{args.kv_heads}, vocab {args.vocab}; {jax.default_backend()})", "",
             "| decoder | s per call | new tokens/s | KV-cached JAX is x faster |",
             "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['decoder']} | {r['seconds']:.3f} | {r['new_tokens_per_s']:.0f} | "
                     f"{base / r['new_tokens_per_s']:.2f} |")
    lines += ["", f"Same tokens as the cached decoder: uncached {same['uncached']:.3f}, "
              f"transformers {same['transformers']:.3f} (fraction of positions; float32 "
              "argmax ties can differ)."]
    report.save(f"generate_{jax.default_backend()}", result, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
