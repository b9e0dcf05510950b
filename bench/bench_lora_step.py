"""LoRA training step: jitted JAX (ffrag_jax) vs PyTorch + peft (eager), side by side.

Same random Llama (built with transformers, loaded into JAX with
ffrag_jax.models.hf.load_llama), same
batch, same LoRA (q_proj, v_proj by default), same optimizer (AdamW, grad clip 1.0, linear
decay), timed in interleaved rounds (JAX, torch, torch, JAX, ...) so that a drift in the
machine's speed cannot favour either. Reports tokens/s and model FLOP/s as a fraction of the
machine's measured matmul FLOP/s, and writes bench/results/lora_step_<backend>.{json,md}.

    python bench/bench_lora_step.py                 # defaults sized for a 2-core CPU
    python bench/bench_lora_step.py --batch 16 --seq 512 1024 --hidden 512 --layers 8
    python bench/bench_lora_step.py --device gpu --llama2-7b --batch 16 --seq 512

``--device gpu``: JAX on its GPU backend and PyTorch on CUDA, both in bfloat16 (weights and
compute; LoRA and optimizer state in float32 on both sides), and the matmul peak measured in
bfloat16 (8192^3); results go to ``lora_step_gpu*``. On CPU everything is float32.

Model FLOPs per LoRA step: 2*N per token for the forward through the N frozen matmul params,
2*N more for the input gradients of the backward (frozen weights get no weight gradient),
plus attention (QK^T and AV, forward and backward) and the small LoRA terms.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, nargs="+", default=[128, 256, 512],
                   help="sequence lengths to sweep")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--steps", type=int, default=4, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=5,
                   help="rounds of --steps steps per implementation, interleaved; the median "
                        "round is reported")
    p.add_argument("--remat", default="dots_attn",
                   help="ffrag_jax remat policy: none, dots, dots_attn, full")
    p.add_argument("--attention", default="auto", help="ffrag_jax attention: auto, ffrag, xla")
    p.add_argument("--intermediate", type=int, default=None,
                   help="MLP width (default: 8/3 x hidden, rounded down to 16)")
    p.add_argument("--llama2-7b", action="store_true",
                   help="Llama-2-7B's shape: hidden 4096, MLP 11008, 32 layers, 32 heads, "
                        "vocab 32000")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="gpu: JAX and PyTorch on CUDA, both bfloat16")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--tag", default="", help="suffix of the result files (lora_step_cpu_TAG)")
    args = p.parse_args()
    if args.llama2_7b:
        args.hidden, args.intermediate, args.layers = 4096, 11008, 32
        args.heads, args.kv_heads, args.vocab = 32, 32, 32000
    if args.device == "gpu" and jax.default_backend() != "gpu":
        p.error(f"--device gpu, but JAX runs on {jax.default_backend()} (install jax[cuda13])")
    return args


def on_gpu(args) -> bool:
    return args.device == "gpu"


def matmul_flops_per_s(args, repeats: int = 10) -> tuple[float, float]:
    """Measured matmul FLOP/s of XLA and of torch on this machine: float32 2048^3 on CPU,
    bfloat16 8192^3 on GPU."""
    n, dtype = (8192, jnp.bfloat16) if on_gpu(args) else (2048, jnp.float32)
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(repeats):
        out = mm(a)
    out.block_until_ready()
    xla = 2 * n**3 * repeats / (time.perf_counter() - t)
    try:
        import torch

        ta = (torch.randn(n, n, dtype=torch.bfloat16, device="cuda") if on_gpu(args)
              else torch.randn(n, n))
        ta @ ta
        sync(args)
        t = time.perf_counter()
        for _ in range(repeats):
            ta @ ta
        sync(args)
        torch_rate = 2 * n**3 * repeats / (time.perf_counter() - t)
    except ImportError:
        torch_rate = float("nan")
    return xla, torch_rate


def sync(args) -> None:
    """Waits for PyTorch's queued CUDA work (its calls return before the GPU is done)."""
    if on_gpu(args):
        import torch

        torch.cuda.synchronize()


def step_flops(args, cfg, lora_params: int) -> float:
    tokens = args.batch * args.seq
    d, f, v, layers = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    qkvo = d * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim + cfg.num_heads * \
        cfg.head_dim * d
    matmul_params = layers * (qkvo + 3 * d * f) + d * v
    attention = layers * 2 * 2 * args.batch * args.seq**2 * cfg.num_heads * cfg.head_dim
    forward = 2 * tokens * matmul_params + attention + 2 * tokens * lora_params
    # backward: input gradients everywhere (~forward), weight gradients only for LoRA
    return 2 * forward + 2 * tokens * lora_params


def jax_step(args, folder, ids):
    """``(cfg, lora param count, run(n) -> seconds for n steps, loss(), compile+warm-up s)``."""
    from ffrag_jax.models import hf, lora
    from ffrag_jax.training import sharding, train

    cfg, params = hf.load_llama(folder)
    cfg = cfg.replace(remat=args.remat, attention=args.attention)
    if on_gpu(args):  # frozen weights and compute in bfloat16, LoRA and AdamW in float32
        cfg = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
        params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    adapter = lora.init(jax.random.key(0), params, args.targets, args.rank, 2.0 * args.rank,
                        dropout=0.05)
    optimizer = train.make_optimizer(1e-4, 1000)
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    state = train.init_train_state(adapter, optimizer)
    step = train.jit_train_step(cfg, optimizer, "lora", mesh, state, params)
    batch = {"input_ids": jnp.asarray(ids)[None], "attention_mask": jnp.ones_like(ids)[None],
             "loss_mask": jnp.ones_like(ids)[None]}
    box = {"state": state, "i": 0, "loss": None}

    def run(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            box["state"], metrics = step(box["state"], params, batch, jax.random.key(box["i"]))
            box["i"] += 1
        box["loss"] = float(jax.block_until_ready(metrics)["loss"])  # waits for the last step
        return time.perf_counter() - start

    warmup = run(2)
    return cfg, adapter.num_params(), run, lambda: box["loss"], warmup


def torch_step(args, folder, ids):
    """``(run(n) -> seconds for n steps, loss())`` for the same model, LoRA and optimizer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.set_num_threads(os.cpu_count())
    gpu = on_gpu(args)
    model = LlamaForCausalLM.from_pretrained(
        folder, attn_implementation="sdpa", dtype=torch.bfloat16 if gpu else torch.float32)
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05,
                        target_modules=args.targets.split(","))
    model = get_peft_model(model, config).train()
    if gpu:  # the frozen base in bfloat16, the LoRA weights (and so AdamW) in float32
        model = model.to("cuda")
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / 1000))
    x = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    if gpu:
        x = x.cuda()
    box = {"loss": None}

    def run(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=gpu):
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        box["loss"] = loss.item()  # a host copy: waits for the GPU
        return time.perf_counter() - start

    run(2)
    return run, lambda: box["loss"]


def timed_rounds(runs: dict, rounds: int, steps: int) -> dict[str, list[float]]:
    """Seconds per step of each implementation in ``rounds`` rounds of ``steps`` steps,
    alternating which goes first, so that drift in the machine's speed (a shared VM's
    neighbours, clocks) falls on both alike instead of on whichever ran second."""
    times = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(runs[name](steps) / steps)
    return times


def run_size(args, seq: int, folder: str, xla_peak: float, torch_peak: float) -> list[dict]:
    import torch

    args = argparse.Namespace(**{**vars(args), "seq": seq})
    ids = np.random.default_rng(0).integers(0, args.vocab, (args.batch, seq), np.int32)
    cfg, lora_params, jax_run, jax_loss, jax_warmup = jax_step(args, folder, ids)
    runs = {"jax": jax_run}
    if not args.skip_torch:
        torch_run, torch_loss = torch_step(args, folder, ids)
        runs["torch"] = torch_run
    times = timed_rounds(runs, args.rounds, args.steps)
    flops = step_flops(args, cfg, lora_params)
    tokens = args.batch * seq

    def row(impl, seconds, peak, loss):
        s = statistics.median(seconds)
        return {"seq": seq, "impl": impl, "s_per_step": s, "s_per_step_rounds": seconds,
                "tokens_per_s": tokens / s, "model_flops_per_s": flops / s,
                "fraction_of_matmul_peak": flops / s / peak, "loss_after": loss}

    rows = [row(f"ffrag_jax (jax {jax.__version__}, jit, remat={args.remat}, "
                f"attention={args.attention})", times["jax"], xla_peak, jax_loss())]
    rows[0]["compile_and_warmup_s"] = jax_warmup
    if "torch" in times:
        rows.append(row(f"PyTorch {torch.__version__} + peft (eager, sdpa)", times["torch"],
                        torch_peak, torch_loss()))
    return rows


def main():
    args = parse_args()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf_cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=args.intermediate or int(args.hidden * 8 / 3) // 16 * 16,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=max(args.seq))
    folder = tempfile.mkdtemp(prefix="bench_llama_")
    LlamaForCausalLM(hf_cfg).save_pretrained(folder)
    xla_peak, torch_peak = matmul_flops_per_s(args)
    rows = [row for seq in args.seq for row in run_size(args, seq, folder, xla_peak, torch_peak)]
    speedups, rounds_won = {}, {}
    for seq in args.seq:
        pair = [r for r in rows if r["seq"] == seq]
        if len(pair) == 2:
            speedups[seq] = pair[1]["s_per_step"] / pair[0]["s_per_step"]
            jax_rounds, torch_rounds = (r["s_per_step_rounds"] for r in pair)
            rounds_won[seq] = sum(j < t for j, t in zip(jax_rounds, torch_rounds, strict=True))
    backend = jax.default_backend()
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "jax_backend": backend,
                    "devices": [str(d) for d in jax.devices()]},
        "args": vars(args),
        "matmul_peak_flops_per_s": {"xla": xla_peak, "torch": torch_peak},
        "rows": rows,
        "speedup_jax_over_torch_by_seq": speedups,
        "rounds_jax_faster_by_seq": rounds_won,
        "command": " ".join([Path(sys.executable).name] + sys.argv),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"lora_step_{backend}" + (f"_{args.tag}" if args.tag else "")
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# LoRA training step ({backend}, {os.cpu_count()} cores)",
        "",
        f"Batch {args.batch}, hidden {args.hidden}, {args.layers} layers, {args.heads} heads "
        f"({args.kv_heads} kv), vocab {args.vocab}, LoRA r={args.rank} on {args.targets}, "
        f"AdamW + clip, {'bfloat16 (LoRA and AdamW float32)' if on_gpu(args) else 'float32'}. "
        f"Measured {'bf16 8192' if on_gpu(args) else 'fp32 2048'}^3 matmul peak: XLA "
        f"{xla_peak / 1e9:.1f} GFLOP/s, "
        f"torch {torch_peak / 1e9:.1f} GFLOP/s. Both run in this one process, in "
        f"{args.rounds} interleaved rounds of {args.steps} steps each (after 2 warm-up steps); "
        "s/step is the median round.",
        "",
        "| seq | implementation | s/step | tokens/s | model GFLOP/s | of matmul peak |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['seq']} | {r['impl']} | {r['s_per_step']:.3f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['model_flops_per_s'] / 1e9:.1f} | "
                     f"{r['fraction_of_matmul_peak']:.0%} |")
    if speedups:
        lines += ["", "JAX speed relative to PyTorch + peft (>1: JAX faster): " + ", ".join(
            f"seq {seq}: {v:.2f}x" for seq, v in speedups.items()),
            "Rounds in which the JAX step was the faster: " + ", ".join(
            f"seq {seq}: {won} of {args.rounds}" for seq, won in rounds_won.items())]
    lines += ["", f"Command: `{result['command']}`"]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
