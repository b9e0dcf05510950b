"""Helpers of the Flower engine's tests (in process and on real processes): the tiny config,
summary comparison, a run's records."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ffrag_jax.cli.launch import load_config
from ffrag_jax.training import run as run_lib

TINY = {
    "fl.num_clients": 3, "lora.generator.ranks": (4, 2, 1), "fl.rounds": 2,
    "fl.batch_size": 8, "fl.micro_batch_size": 4, "fl.lr": 3e-3,
    "data.examples_per_client": 16, "data.held_out": 0.25, "model.hidden_size": 32,
    "model.intermediate_size": 64, "model.num_layers": 2, "tokenizer.vocab_size": 400,
    "eval.batch_size": 8, "export": False,
}


def tiny_config(**overrides):
    return load_config("heter", {**TINY, **{k.replace("__", "."): v
                                           for k, v in overrides.items()}})


def assert_same_summary(a: dict, b: dict, tol: float = 1e-6) -> None:
    """Equal summaries, numbers to ``tol`` relative to their size (the losses are float32
    sums, good to 7 digits: the server optimisers' arithmetic, compiled on its own on the
    Flower server and fused into the round on the local engine, rounds differently)."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[prefix + k] = v
        return out
    fa, fb = flat(a), flat(b)
    fa.pop("wall_time_s"), fb.pop("wall_time_s")
    assert fa.keys() == fb.keys()
    for k in fa:
        if isinstance(fa[k], float) and not math.isnan(fa[k]):
            assert abs(fa[k] - fb[k]) <= tol * max(1.0, abs(fa[k])), (k, fa[k], fb[k])
        else:
            assert fa[k] == fb[k] or (fa[k] != fa[k] and fb[k] != fb[k]), k


def local_summary(config, workdir: Path) -> dict:
    return run_lib.run(config, workdir)


def metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
