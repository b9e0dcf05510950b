"""Flower's overhead per round: the same federated job on the local engine, through
Flower's simulation runtime (Ray), and on Flower's deployment runtime (a SuperLink and N
SuperNodes as real processes on 127.0.0.1), one after the other in one run.

    python bench/bench_flower.py                       # 3 clients, 4 rounds, the tiny model
    python bench/bench_flower.py --clients 4 --rounds 4 --hidden 128 --layers 4
    python bench/bench_flower.py --job demo --engines local simulation   # FF-RAG, the demo

Every engine runs the same config and must end with the same summary (checked: 1e-6
relative); the table gives each engine's seconds per round (the ``round`` records: training,
aggregation and every client's held-out evaluation), round 1 (compilation, connecting) apart
from the mean of the later rounds. Needs ``pip install -e ".[flower]"`` (Ray for the
simulation). Writes ``bench/results/flower_overhead_cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def flags(args) -> list[str]:
    if args.job == "demo":  # the README's first command, as it is
        return ["--config=demo", f"--config.fl.strategy={args.strategy}"]
    ranks = ",".join(str(r) for r in ([4, 2, 1, 2] * 4)[:args.clients])
    return ["--config=heter", f"--config.fl.num_clients={args.clients}",
            f"--config.lora.generator.ranks=({ranks},)", f"--config.fl.rounds={args.rounds}",
            "--config.fl.batch_size=8", "--config.fl.micro_batch_size=4",
            "--config.fl.lr=3e-3", f"--config.data.examples_per_client={args.examples}",
            "--config.data.held_out=0.2", f"--config.model.hidden_size={args.hidden}",
            f"--config.model.intermediate_size={2 * args.hidden}",
            f"--config.model.num_layers={args.layers}", "--config.tokenizer.vocab_size=400",
            "--config.eval.batch_size=8", "--config.export=False",
            f"--config.fl.strategy={args.strategy}"]


def round_seconds(workdir: Path) -> list[float]:
    """Seconds of each round: the LoRA job's ``round`` records; FF-RAG (no such records)
    from its eval records' times, round t's last minus round t - 1's (training, aggregation
    and every client's held-out evaluation)."""
    recs = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    seconds = [r["seconds"] for r in recs if r.get("kind") == "round"]
    if seconds:
        return seconds
    last: dict[int, float] = {}
    for r in recs:
        if r.get("kind") == "eval":
            last[r["round"]] = max(last.get(r["round"], 0.0), r["time"])
    return [round(last[t] - last[t - 1], 1) for t in sorted(last) if t > 0]


def run_launcher(workdir: Path, extra: list[str], args) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ffrag_jax.launch", f"--workdir={workdir}",
                    *flags(args), *extra], check=True, capture_output=True)
    return time.perf_counter() - start


def run_deployment(workdir: Path, args) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ffrag_jax.federated.flower.deployment",
                    str(workdir), str(args.clients), *flags(args)], check=True,
                   capture_output=True)
    return time.perf_counter() - start


def same(a: dict, b: dict) -> bool:
    keys = [k for k in a if k not in ("wall_time_s", "exported")]
    for k in keys:
        x, y = a[k], b[k]
        if isinstance(x, float):
            if abs(x - y) > 1e-6 * max(1.0, abs(x)):
                return False
        elif isinstance(x, dict):
            if not same({**x, "wall_time_s": 0}, {**y, "wall_time_s": 0}):
                return False
        elif x != y:
            return False
    return True


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--job", choices=["lora", "demo"], default="lora",
                   help="lora: the federated LoRA job (the flags below); demo: FF-RAG, the "
                        "demo's config as it is (4 clients, 3 rounds)")
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--examples", type=int, default=20, help="examples per client")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--strategy", default="ff")
    p.add_argument("--engines", nargs="+", default=["local", "simulation", "deployment"])
    args = p.parse_args(argv)
    if args.job == "demo":
        args.clients, args.rounds = 4, 3
    root = Path(tempfile.mkdtemp(prefix="ffrag-bench-flower-"))
    rows = {}
    for engine in args.engines:
        workdir = root / engine
        if engine == "local":
            wall = run_launcher(workdir, [], args)
        elif engine == "simulation":
            wall = run_launcher(workdir, ["--config.fl.engine=flower"], args)
        else:
            wall = run_deployment(workdir, args)
        seconds = round_seconds(workdir)
        rows[engine] = {"wall_s": round(wall, 1), "round_1_s": seconds[0],
                        "later_rounds_mean_s": round(sum(seconds[1:]) / max(len(seconds) - 1, 1),
                                                     2),
                        "summary": json.loads((workdir / "summary.json").read_text())}
        print(engine, {k: v for k, v in rows[engine].items() if k != "summary"}, flush=True)
    base = rows.get("local")
    for row in rows.values():
        row["same_summary_as_local"] = base is not None and same(base["summary"],
                                                                row["summary"])
    machine = f"{platform.machine()}, {__import__('os').cpu_count()} CPU cores"
    out = {"machine": machine, "args": vars(args),
           "engines": {e: {k: v for k, v in r.items() if k != "summary"}
                       for e, r in rows.items()}}
    RESULTS.mkdir(exist_ok=True)
    name = "flower_overhead_cpu" if args.job == "lora" else "flower_overhead_demo_cpu"
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    local = rows.get("local", {}).get("later_rounds_mean_s")
    lines = [f"# Flower overhead per round ({machine})", "",
             f"`python bench/bench_flower.py {' '.join(argv or sys.argv[1:])}`: "
             (f"{args.clients} clients, {args.rounds} rounds, `{args.strategy}`, tiny Llama "
              f"(hidden {args.hidden}, {args.layers} layers)." if args.job == "lora" else
              f"FF-RAG, the demo's config ({args.clients} clients, {args.rounds} rounds, "
              f"`{args.strategy}`)."), "",
             "| engine | round 1 (s) | later rounds, mean (s) | vs local | whole run (s) "
             "| same summary as local |", "|---|---:|---:|---:|---:|---|"]
    for engine, r in rows.items():
        ratio = (f"{r['later_rounds_mean_s'] / local:.{0 if args.job == 'lora' else 2}f}x"
                 if local else "-")
        lines.append(f"| {engine} | {r['round_1_s']:.1f} | {r['later_rounds_mean_s']:.2f} | "
                     f"{ratio} | {r['wall_s']:.0f} | {r['same_summary_as_local']} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
