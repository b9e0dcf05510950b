"""One federated round of K clients: vmapped JAX vs a sequential JAX loop vs PyTorch + peft.

Every client runs S local LoRA steps (fresh AdamW, grad clip, q_proj/v_proj) on its own batch
of the same tiny Llama (the demo's size). The three ways to run a round:

  (a) ffrag_jax vmapped: all K clients in one jitted program (``federated.update_clients``);
  (b) ffrag_jax sequential: the jitted ``federated.client_update`` once per client;
  (c) the reference approach: clients one after another in PyTorch + peft (a fresh peft
      wrapper and optimizer per client on the base model in memory; the reference also
      reloads the base from disk per client, which is not counted here).

Each (approach, K) runs in its own subprocess, so its peak memory (max RSS) is its own. The
time is for a warm round (compilation excluded, reported separately).

    python bench/bench_round.py                  # K = 2 4 8 16 on this machine
    python bench/bench_round.py --clients 8 --steps 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
APPROACHES = ("jax_vmapped", "jax_sequential", "torch_peft_sequential")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--steps", type=int, default=4, help="local steps per client")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--worker", nargs=3, metavar=("APPROACH", "K", "MODEL_DIR"),
                   help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _data(args, k):
    import numpy as np

    return np.random.default_rng(0).integers(0, 1536, (k, args.steps, args.batch, args.seq),
                                             np.int32)


def run_jax(args, approach, k, model_dir):
    import jax
    import jax.numpy as jnp

    from ffrag_jax import federated
    from ffrag_jax.models import hf, lora
    from ffrag_jax.training import train

    cfg, params = hf.load_llama(model_dir)
    ids = jnp.asarray(_data(args, k))[:, :, None]  # [K, S, A=1, B, T]
    batches = {"input_ids": ids, "attention_mask": jnp.ones_like(ids),
               "loss_mask": jnp.ones_like(ids)}
    loras = federated.stack_clients([
        lora.init(jax.random.key(i), params, ["q_proj", "v_proj"], args.rank, 2.0 * args.rank,
                  dropout=0.05) for i in range(k)])
    masks = jnp.ones((k, args.rank))
    rngs = jax.random.split(jax.random.key(1), k)
    optimizer = train.make_optimizer(3e-4, args.steps)
    if approach == "jax_vmapped":
        fn = jax.jit(lambda lo, m, b, r: federated.update_clients(
            lo, m, params, b, r, cfg=cfg, optimizer=optimizer))

        def round_():
            return fn(loras, masks, batches, rngs)
    else:
        one = jax.jit(lambda lo, m, b, r: federated.client_update(
            lo, m, params, b, r, cfg=cfg, optimizer=optimizer))
        clients = federated.unstack_clients(loras)

        def round_():
            return [one(clients[i], masks[i], jax.tree.map(lambda x, i=i: x[i], batches),
                        rngs[i]) for i in range(k)]
    t = time.perf_counter()
    jax.block_until_ready(round_())
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    jax.block_until_ready(round_())
    return time.perf_counter() - t, compile_s


def run_torch(args, k, model_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.set_num_threads(os.cpu_count())
    base = LlamaForCausalLM.from_pretrained(model_dir)
    data = torch.as_tensor(_data(args, k), dtype=torch.long)

    def client(i):
        model = get_peft_model(base, LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                lora_dropout=0.05,
                                                target_modules=["q_proj", "v_proj"]))
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=3e-4, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / args.steps)
        for s in range(args.steps):
            x = data[i, s]
            model(input_ids=x, labels=x).loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        model.unload()  # back to the plain base for the next client, as a fresh reload would

    client(0)  # warm-up, as the JAX rows exclude compilation
    t = time.perf_counter()
    for i in range(k):
        client(i)
    return time.perf_counter() - t, 0.0


def worker(args):
    approach, k, model_dir = args.worker[0], int(args.worker[1]), args.worker[2]
    if approach == "torch_peft_sequential":
        seconds, compile_s = run_torch(args, k, model_dir)
    else:
        seconds, compile_s = run_jax(args, approach, k, model_dir)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"approach": approach, "clients": k, "round_s": seconds,
                      "compile_s": compile_s, "peak_rss_mb": peak_mb}))


def main():
    args = parse_args()
    if args.worker:
        return worker(args)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model_dir = tempfile.mkdtemp(prefix="bench_round_")
    LlamaForCausalLM(LlamaConfig(vocab_size=1536, hidden_size=128, intermediate_size=384,
                                 num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=args.seq)
                     ).save_pretrained(model_dir)
    rows = []
    passthrough = ["--steps", str(args.steps), "--batch", str(args.batch), "--seq",
                   str(args.seq), "--rank", str(args.rank)]
    for k in args.clients:
        for approach in APPROACHES:
            out = subprocess.run(
                [sys.executable, __file__, *passthrough, "--worker", approach, str(k), model_dir],
                capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    # Model FLOPs of a round (the same for every approach) against the measured matmul peak:
    # how close each approach is to the machine's limit, and what the 3x target would need.
    from bench_lora_step import matmul_flops_per_s, step_flops

    from ffrag_jax.models import hf

    cfg, _ = hf.load_llama(model_dir)
    lora_params = 4 * args.rank * cfg.hidden_size * cfg.num_layers  # A and B on q and v
    xla_peak, _ = matmul_flops_per_s()
    per_step = step_flops(argparse.Namespace(batch=args.batch, seq=args.seq), cfg, lora_params)
    for r in rows:
        r["model_gflop"] = r["clients"] * args.steps * per_step / 1e9
        r["fraction_of_matmul_peak"] = r["model_gflop"] * 1e9 / r["round_s"] / xla_peak
    by = {(r["approach"], r["clients"]): r for r in rows}
    ratios = {k: by[("torch_peft_sequential", k)]["round_s"] / by[("jax_vmapped", k)]["round_s"]
              for k in args.clients}
    vs_seq = {k: by[("jax_sequential", k)]["round_s"] / by[("jax_vmapped", k)]["round_s"]
              for k in args.clients}
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "args": {k: v for k, v in vars(args).items() if k != "worker"},
        "rows": rows,
        "vmapped_speedup_over_torch_peft": ratios,
        "vmapped_speedup_over_jax_sequential": vs_seq,
        "matmul_peak_flops_per_s": xla_peak,
        "command": " ".join(["python"] + sys.argv),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "round_cpu.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# One federated round ({os.cpu_count()} CPU cores)",
        "",
        f"Tiny Llama (d=128, 4 layers, vocab 1536); each client: {args.steps} LoRA steps "
        f"(r={args.rank}, q/v) on {args.batch} x {args.seq} tokens, fresh AdamW.",
        "",
        f"Measured fp32 matmul peak (XLA, 2048^3): {xla_peak / 1e9:.0f} GFLOP/s.",
        "",
        "| clients | approach | round s | compile s | peak RSS MB | model GFLOP | of matmul peak |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['approach']} | {r['round_s']:.2f} | "
                     f"{r['compile_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['model_gflop']:.0f} | "
                     f"{r['fraction_of_matmul_peak']:.0%} |")
    if 8 in ratios:
        need = by[("torch_peft_sequential", 8)]["fraction_of_matmul_peak"] * 3
        lines += ["", f"3x over PyTorch + peft at K=8 would need {need:.0%} of the matmul peak "
                  "for the whole round (forward, backward, attention, AdamW)."]
    lines += ["", "vmapped JAX speed-up over sequential PyTorch + peft: "
              + ", ".join(f"K={k}: {v:.1f}x" for k, v in ratios.items()),
              "vmapped JAX speed-up over the sequential JAX loop: "
              + ", ".join(f"K={k}: {v:.1f}x" for k, v in vs_seq.items()),
              "", f"Command: `{result['command']}`"]
    (RESULTS / "round_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
