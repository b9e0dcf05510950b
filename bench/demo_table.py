"""The demo's table over seeds: fused RAG exact match and recall@1 of federated FF-RAG (the
README's first command) for each payload, privacy setting and server strategy, mean and
spread over seeds, with the bytes a round.

    python bench/demo_table.py                            # seeds 0 1 2, every row, all cores
    python bench/demo_table.py --seeds 1 --rows ff_fp32 dp8 --cores 1
    python bench/demo_table.py --report-only              # the table of the runs there are

Each run is ``python -m ffrag_jax.launch --config demo --config.seed=S`` with the row's flags,
pinned to one core (``taskset``: XLA's threaded reductions round differently on two cores, so
every run of the table gets one), one run per core at a time. A seed's first row (``ff_fp32``)
pretrains the base model; its other rows start from that base
(``--config.pretrain.from_run``, which checks the base is the one they would pretrain: the
same summary and records, four of ten minutes saved). A run with a ``summary.json`` is not run
again, so the script resumes. Writes ``bench/results/demo_table_cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

# name -> (flags, what the README's table calls it). The first pretrains each seed's base.
ROWS = {
    "ff_fp32": ([], "(none: `ff`, fp32)"),
    "ff_fp16": (["--config.fl.payload=fp16"], "`--config.fl.payload=fp16`"),
    "ff_int8": (["--config.fl.payload=int8"], "`--config.fl.payload=int8`"),
    "dp8": (["--config.fl.dp.clip=1.0", "--config.fl.dp.epsilon=8"],
            "`--config.fl.dp.clip=1.0 --config.fl.dp.epsilon=8`"),
    "dp2": (["--config.fl.dp.clip=1.0", "--config.fl.dp.epsilon=2"],
            "`--config.fl.dp.clip=1.0 --config.fl.dp.epsilon=2`"),
    "stack": (["--config.fl.strategy=stack"], "`--config.fl.strategy=stack`"),
    "zeropad": (["--config.fl.strategy=zeropad"], "`--config.fl.strategy=zeropad`"),
    "median": (["--config.fl.strategy=median"], "`--config.fl.strategy=median`"),
    "fedprox": (["--config.fl.strategy=fedprox"], "`--config.fl.strategy=fedprox`"),
    "fedavgm": (["--config.fl.strategy=fedavgm"], "`--config.fl.strategy=fedavgm`"),
    "fedadam": (["--config.fl.strategy=fedadam"], "`--config.fl.strategy=fedadam`"),
    "fedadam_lr0.01": (["--config.fl.strategy=fedadam", "--config.fl.settings.lr=0.01"],
                       "`--config.fl.strategy=fedadam --config.fl.settings.lr=0.01`"),
    "fedyogi_lr0.01": (["--config.fl.strategy=fedyogi", "--config.fl.settings.lr=0.01"],
                       "`--config.fl.strategy=fedyogi --config.fl.settings.lr=0.01`"),
    "fedsa_r8": (["--config.fl.strategy=fedsa", "--config.lora.generator.ranks=(8,8,8,8)"],
                 "`--config.fl.strategy=fedsa '--config.lora.generator.ranks=(8,8,8,8)'`"),
    "ffa_r8": (["--config.fl.strategy=ffa", "--config.lora.generator.ranks=(8,8,8,8)"],
               "`--config.fl.strategy=ffa '--config.lora.generator.ranks=(8,8,8,8)'`"),
}
FIRST = "ff_fp32"


def workdir(root: Path, seed: int, row: str) -> Path:
    return root / f"s{seed}" / row


def pretrained(root: Path, seed: int, steps: int) -> bool:
    """Whether seed ``seed``'s first run has finished its ``steps`` pretraining steps (its
    base can be reused)."""
    from ffrag_jax.training import checkpoint

    folder = workdir(root, seed, FIRST) / "checkpoints"
    return checkpoint.latest_steps(folder).get("pretrain") == steps


def run_all(root: Path, seeds: list[int], rows: list[str], cores: list[int]) -> None:
    """Every (seed, row) without a summary, one at a time on each core."""
    jobs = [(s, FIRST) for s in seeds if FIRST in rows]
    jobs += [(s, r) for r in rows if r != FIRST for s in seeds]
    jobs = [j for j in jobs if not (workdir(root, *j) / "summary.json").exists()]
    from ffrag_jax.launch import load_config

    steps = load_config("demo", {}).pretrain.steps
    lock = threading.Lock()

    def log(msg: str) -> None:
        with lock:
            print(time.strftime("%H:%M:%S"), msg, flush=True)

    def worker(core: int) -> None:
        while True:
            with lock:
                pick = next((j for j in jobs if j[1] == FIRST or pretrained(root, j[0], steps)),
                            None)
                if pick is None and not jobs:
                    return
                if pick is not None:
                    jobs.remove(pick)
            if pick is None:  # every left row waits for its seed's base
                time.sleep(15)
                continue
            seed, row = pick
            wd = workdir(root, seed, row)
            wd.parent.mkdir(parents=True, exist_ok=True)
            base = ([] if row == FIRST else
                    [f"--config.pretrain.from_run={workdir(root, seed, FIRST)}"])
            cmd = ["taskset", "-c", str(core), sys.executable, "-m", "ffrag_jax.launch",
                   "--config", "demo", "--workdir", str(wd), f"--config.seed={seed}",
                   *ROWS[row][0], *base]
            log(f"core {core}: seed {seed} {row}")
            with open(f"{wd}.log", "w") as out:
                rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT)
            log(f"core {core}: seed {seed} {row} ended ({rc}; log {wd}.log)")

    threads = [threading.Thread(target=worker, args=(c,)) for c in cores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def one_run(wd: Path) -> dict | None:
    """A finished run's numbers: the fused model (global where a strategy keeps no personal
    adapters), the global model, bytes of round 2 (all clients), minutes."""
    if not (wd / "summary.json").exists():
        return None
    s = json.loads((wd / "summary.json").read_text())
    up = down = 0
    for line in (wd / "metrics.jsonl").open():
        r = json.loads(line)
        if r.get("kind") == "payload" and r.get("round") == 2:
            up, down = up + r["upload_bytes"], down + r["download_bytes"]
    model = "fused" if "fused" in s else "global"
    return {"model": model, "em": s[model]["rag_em"], "recall": s[model]["recall@1"],
            "global_em": s["global"]["rag_em"], "global_recall": s["global"]["recall@1"],
            "base_em": s["base"]["rag_em"], "base_recall": s["base"]["recall@1"],
            "up_mb": up / 1e6, "down_mb": down / 1e6, "minutes": s["wall_time_s"] / 60}


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return (f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} "
            f"({min(values):.3f}-{max(values):.3f})")


def report(root: Path, seeds: list[int], rows: list[str]) -> tuple[dict, str]:
    """``(json, markdown)`` of the runs under ``root``."""
    runs = {row: {s: one_run(workdir(root, s, row)) for s in seeds} for row in rows}
    lines = ["| flags | model | seeds | RAG EM | recall@1 | global EM | global recall@1 | "
             "up MB/round | down MB/round |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        done = {s: r for s, r in runs[row].items() if r is not None}
        if not done:
            continue
        got = list(done.values())
        lines.append(
            f"| {ROWS[row][1]} | {got[0]['model']} | {','.join(map(str, done))} | "
            + " | ".join(spread([r[k] for r in got]) for k in ("em", "recall", "global_em",
                                                                "global_recall"))
            + f" | {got[0]['up_mb']:.2f} | {got[0]['down_mb']:.2f} |")
    bases = {s: r for row in rows for s, r in runs[row].items() if r is not None}
    if bases:
        got = list(bases.values())
        lines.append(f"\nThe base model (round 0): RAG EM {spread([r['base_em'] for r in got])}"
                     f", recall@1 {spread([r['base_recall'] for r in got])} (seeds "
                     f"{','.join(map(str, sorted(bases)))}; one value per seed).")
    return {"machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "runs": runs}, "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--cores", type=int, nargs="+",
                        default=sorted(os.sched_getaffinity(0)),
                        help="one run at a time on each (default: every core)")
    parser.add_argument("--root", type=Path, default=Path("runs/demo_table"),
                        help="where the runs go: ROOT/s<seed>/<row>")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if not args.report_only:
        run_all(args.root, args.seeds, args.rows, args.cores)
    data, table = report(args.root, args.seeds, args.rows)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "demo_table_cpu.json").write_text(json.dumps(data, indent=1))
    header = (f"# The demo's table\n\n`python bench/demo_table.py --seeds "
              f"{' '.join(map(str, args.seeds))}`, each run on one core of "
              f"{os.cpu_count()} ({data['machine']}); mean ± sd (range) over the seeds.\n\n")
    (RESULTS / "demo_table_cpu.md").write_text(header + table + "\n")
    print(table)


if __name__ == "__main__":
    main()
