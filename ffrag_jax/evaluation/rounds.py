"""Evaluation of a federated round's models on every client's held-out split: the base model
(before round 1), the global model and, for personalised strategies, each client's fused model
(held-out loss and perplexity, exact match of generated answers), and their summary."""

from __future__ import annotations

import math

import jax
import numpy as np

from ffrag_jax import evaluation
from ffrag_jax.federated.strategies import Strategy
from ffrag_jax.training import train as train_lib


def eval_batches(split: dict, batch_size: int) -> list[dict]:
    """Held-out examples in ``[batch_size, T]`` chunks, the last padded with masked rows."""
    n = len(split["input_ids"])
    chunks = []
    for start in range(0, n, batch_size):
        chunk = {k: split[k][start:start + batch_size]
                 for k in ("input_ids", "attention_mask", "loss_mask")}
        pad = batch_size - len(chunk["input_ids"])
        chunks.append({k: np.pad(v, ((0, pad), (0, 0))) for k, v in chunk.items()})
    return chunks


def make_evaluator(cfg):
    sums = jax.jit(lambda params, adapter, batch: train_lib.causal_lm_loss(
        params, cfg, batch, adapter))

    def evaluate(params, adapter, batches: list[dict]) -> float:
        total, count = 0.0, 0.0
        for batch in batches:
            s, c = sums(params, adapter, batch)
            total, count = total + float(s), count + float(c)
        return total / max(count, 1.0)

    return evaluate


def round_models(strategy: Strategy, server: dict, base: bool):
    """``(name, params, adapter)`` of the models evaluated for every client, as a function of
    the client: the base model (``base``: before any round), or the global model and
    (personalised strategies) the client's fused one, as one adapter on the base weights
    (:meth:`Strategy.fused_adapter`: no merged copy of the base per round)."""
    if base:
        return lambda k: [("base", server["params"], None)]
    params, adapter = strategy.global_model(server)
    if not strategy.personalised:
        return lambda k: [("global", params, adapter)]
    return lambda k: [("global", params, adapter),
                      ("fused", server["params"], strategy.fused_adapter(server, k))]


def evaluate_round(strategy: Strategy, server, held_batches, names, evaluate, *,
                   base: bool = False) -> list[dict]:
    """Held-out loss and perplexity per client of the models of :func:`round_models`."""
    models_of = round_models(strategy, server, base)
    out = []
    for k, batches in enumerate(held_batches):
        if not batches:
            continue
        for model, model_params, ad in models_of(k):
            loss = evaluate(model_params, ad, batches)
            out.append({"client": k, "name": names[k], "model": model, "loss": loss,
                        "ppl": math.exp(min(loss, 50.0))})
    return out


def exact_match_round(config, strategy: Strategy, cfg, tokenizer, server, held_pairs, names,
                      *, base: bool = False) -> list[dict]:
    """Exact match of generated answers on each client's held-out split, for the models of
    :func:`round_models`."""
    e = config.eval
    max_prompt_len = min(config.data.max_len, cfg.max_position_embeddings) - e.max_new_tokens
    models_of = round_models(strategy, server, base)
    out = []
    for k, (prompts, responses) in enumerate(held_pairs):
        if not prompts:
            continue
        for model, model_params, ad in models_of(k):
            answers = evaluation.generate_answers(
                model_params, cfg, tokenizer, prompts, lora=ad, max_prompt_len=max_prompt_len,
                max_new_tokens=e.max_new_tokens, batch_size=e.generate_batch_size)
            out.append({"client": k, "name": names[k], "model": model,
                        "exact_match": evaluation.exact_match_score(answers, responses)})
    return out


def exact_match_summary(records: list[dict], rounds: int) -> dict:
    """Per client exact match of the base (before round 1), global and fused models (last
    round), and their means; empty when exact match was not evaluated."""
    em = [r for r in records if r.get("kind") == "exact_match"
          and (r["round"] == rounds or r["model"] == "base")]
    if not em:
        return {}
    per_client: dict[str, dict] = {}
    for r in em:
        per_client.setdefault(r["name"], {})[r["model"]] = round(r["exact_match"], 4)
    models = sorted({r["model"] for r in em})
    return {"exact_match": per_client,
            **{f"mean_exact_match_{m}": round(mean([r["exact_match"] for r in em
                                                      if r["model"] == m]), 4) for m in models}}


def mean(values) -> float:
    """The mean of the values that are numbers (NaN: a client without the split)."""
    values = [v for v in values if v == v]
    return float(np.mean(values)) if values else float("nan")
