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
    python bench/bench_round.py --device gpu --model 1b --clients 10 --ranks 64 32 16 16 8 8 4 4 4 4

``--ranks`` gives the clients heterogeneous ranks (cycled over K): the vmapped round pads them
to the largest with rank masks (as the federated job does), the sequential ones train each at
its own rank. ``--model 1b`` is Llama-3.2-1B's shape. ``--device gpu``: JAX's GPU backend and
PyTorch on CUDA, frozen weights and compute in bfloat16 on both (LoRA and AdamW in float32),
the matmul peak measured in bfloat16; results go to ``round_gpu*``.
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
MODELS = {  # transformers LlamaConfig fields
    "tiny": dict(vocab_size=1536, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
               num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               tie_word_embeddings=True, rope_theta=500000.0),
}


def client_ranks(args, k: int) -> list[int]:
    ranks = args.ranks or [args.rank]
    return [ranks[i % len(ranks)] for i in range(k)]
APPROACHES = ("jax_vmapped", "jax_sequential", "torch_peft_sequential")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--steps", type=int, default=4, help="local steps per client")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--ranks", type=int, nargs="+", default=None,
                   help="per-client ranks, cycled over the K clients (default: --rank for all)")
    p.add_argument("--model", choices=sorted(MODELS), default="tiny")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--tag", default="", help="suffix of the result files")
    p.add_argument("--worker", nargs=3, metavar=("APPROACH", "K", "MODEL_DIR"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "gpu":
        import jax

        if jax.default_backend() != "gpu":
            p.error(f"--device gpu, but JAX runs on {jax.default_backend()} "
                    "(install jax[cuda13])")
    return args


def _data(args, k):
    import numpy as np

    vocab = MODELS[args.model]["vocab_size"]
    return np.random.default_rng(0).integers(0, vocab, (k, args.steps, args.batch, args.seq),
                                             np.int32)


def run_jax(args, approach, k, model_dir):
    import jax
    import jax.numpy as jnp

    from ffrag_jax import federated
    from ffrag_jax.models import hf, lora
    from ffrag_jax.training import train

    cfg, params = hf.load_llama(model_dir)
    if args.device == "gpu":  # frozen weights and compute in bfloat16; LoRA, AdamW float32
        cfg = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
        params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    ids = jnp.asarray(_data(args, k))[:, :, None]  # [K, S, A=1, B, T]
    batches = {"input_ids": ids, "attention_mask": jnp.ones_like(ids),
               "loss_mask": jnp.ones_like(ids)}
    ranks = client_ranks(args, k)
    top = max(ranks)
    own = [lora.init(jax.random.key(i), params, ["q_proj", "v_proj"], r, 2.0 * r,
                     dropout=0.05) for i, r in enumerate(ranks)]
    loras = federated.pad_and_stack(own, top)  # heterogeneous ranks zero-padded, masked
    masks = jnp.stack([federated.rank_mask(r, top) for r in ranks])
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

        def round_():  # each client at its own rank (one compilation per distinct rank)
            return [one(own[i], jnp.ones((ranks[i],)),
                        jax.tree.map(lambda x, i=i: x[i], batches), rngs[i])
                    for i in range(k)]
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
    gpu = args.device == "gpu"
    base = LlamaForCausalLM.from_pretrained(model_dir,
                                            dtype=torch.bfloat16 if gpu else torch.float32)
    data = torch.as_tensor(_data(args, k), dtype=torch.long)
    if gpu:
        base, data = base.to("cuda"), data.to("cuda")
    ranks = client_ranks(args, k)

    def client(i):
        r = ranks[i]
        model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05,
                                                target_modules=["q_proj", "v_proj"]))
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        if gpu:  # LoRA (and so AdamW) in float32, as on the JAX side
            for p in trainable:
                p.data = p.data.float()
        opt = torch.optim.AdamW(trainable, lr=3e-4, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / args.steps)
        for s in range(args.steps):
            x = data[i, s]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=gpu):
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        model.unload()  # back to the plain base for the next client, as a fresh reload would

    def sync():
        if gpu:
            torch.cuda.synchronize()

    client(0)  # warm-up, as the JAX rows exclude compilation
    sync()
    t = time.perf_counter()
    for i in range(k):
        client(i)
    sync()
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
    LlamaForCausalLM(LlamaConfig(**MODELS[args.model], max_position_embeddings=args.seq)
                     ).save_pretrained(model_dir)
    rows = []
    passthrough = ["--steps", str(args.steps), "--batch", str(args.batch), "--seq",
                   str(args.seq), "--rank", str(args.rank), "--model", args.model,
                   "--device", args.device,
                   *(["--ranks", *map(str, args.ranks)] if args.ranks else [])]
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
    xla_peak, _ = matmul_flops_per_s(args)

    def round_gflop(k: int) -> float:  # each client at its own rank
        total = 0.0
        for rank in client_ranks(args, k):
            lora_params = 4 * rank * cfg.hidden_size * cfg.num_layers  # A and B on q and v
            total += step_flops(argparse.Namespace(batch=args.batch, seq=args.seq), cfg,
                                lora_params)
        return args.steps * total / 1e9

    for r in rows:
        r["model_gflop"] = round_gflop(r["clients"])
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
    name = f"round_{args.device}" + (f"_{args.tag}" if args.tag else "")
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    model = ("Tiny Llama (d=128, 4 layers, vocab 1536)" if args.model == "tiny" else
             "Llama-3.2-1B shape (d=2048, 16 layers, vocab 128256, random weights)")
    ranks = f"ranks {args.ranks} cycled" if args.ranks else f"r={args.rank}"
    precision = "bf16 (LoRA, AdamW fp32)" if args.device == "gpu" else "fp32"
    lines = [
        f"# One federated round ({args.device}, {os.cpu_count()} CPU cores)",
        "",
        f"{model}, {precision}; each client: {args.steps} LoRA steps ({ranks}, q/v) on "
        f"{args.batch} x {args.seq} tokens, fresh AdamW.",
        "",
        f"Measured matmul peak (XLA, {'bf16 8192' if args.device == 'gpu' else 'fp32 2048'}"
        f"^3): {xla_peak / 1e9:.0f} GFLOP/s.",
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
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
