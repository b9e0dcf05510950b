"""The reranker inside a federated RAG round: reranking a client's candidates, and a client's
reranker training data and local steps (DPA-RAG's preference-aligned reranker, issue 17).

A client's round, after its generator and query encoder trained:

1. ``rerank.questions`` of its training questions (not the unanswerable ones) are drawn and
   augmented (:mod:`.augment`, ``rerank.augment``); every query retrieves its candidates;
2. the client's updated generator answers each query with each candidate alone: the aligned
   passages (:mod:`.preferences`); an augmented query whose aligned passages differ from its
   origin's is dropped (the consistency filter);
3. the labels are those preferences (``rerank.labels = "preference"``) or the relevance labels
   of the same queries (``"relevance"``: the baseline, the same data size);
4. ``rerank.local_steps`` reranker steps (:func:`~ffrag_jax.rerank.step.rerank_step`) on
   batches drawn from them; the adapter goes to the server like the other two.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ffrag_jax.errors import UserError
from ffrag_jax.rerank import augment, preferences
from ffrag_jax.rerank.cross_encoder import Reranker, retriever_prior
from ffrag_jax.rerank.step import COMBINE, RerankLossConfig, rerank_step
from ffrag_jax.training import train

LABELS = {"preference": "the generator's own answers", "relevance": "gold fact and case note"}
PREFERENCES = ("answer", "likelihood")  # how the generator's preference is read


def validate(config) -> None:
    """The ``rerank`` section's checks (the pre-aligned stage's, and with ``rerank.enabled``
    the reranker's)."""
    r = config.rerank
    if r.pre_align_steps < 0:
        raise UserError(f"rerank.pre_align_steps must be >= 0, got {r.pre_align_steps}")
    for name in ("questions", "pre_align_len"):
        if r[name] < 1:
            raise UserError(f"rerank.{name} must be at least 1, got {r[name]}")
    if not r.enabled:
        return
    if r.labels not in LABELS:
        raise UserError(f"rerank.labels={r.labels!r}; choose {' or '.join(LABELS)}")
    if r.preference not in PREFERENCES:
        raise UserError(f"rerank.preference={r.preference!r}; choose "
                        f"{' or '.join(PREFERENCES)}")
    for name in ("local_steps", "batch_size", "max_len"):
        if r[name] < 1:
            raise UserError(f"rerank.{name} must be at least 1, got {r[name]}")
    if r.lr <= 0:
        raise UserError(f"rerank.lr must be positive, got {r.lr}")
    if r.combine not in COMBINE:
        raise UserError(f"rerank.combine={r.combine!r}; choose {' or '.join(COMBINE)}")
    for name in strategies(config):
        if name not in augment.STRATEGIES:
            raise UserError(f"rerank.augment names {name!r}; strategies: "
                            f"{', '.join(augment.STRATEGIES)}")
    loss_config(config)


def strategies(config) -> list[str]:
    return [x.strip() for x in (config.rerank.augment or "").split(",") if x.strip()]


def loss_config(config) -> RerankLossConfig:
    r = config.rerank
    return RerankLossConfig(weights=tuple((k, float(v)) for k, v in r.losses.items()),
                            combine=r.combine, temperature=r.temperature)


def rerank_ids(reranker: Reranker, questions: Sequence[str], ids: np.ndarray,
               texts: Sequence[str], retriever_scores: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, scores)`` ``[N, K]``: each row's candidates reordered by the reranker (a
    residual one adds its prior of ``retriever_scores`` ``[N, K]``), best first (stable for
    ties; padding -1 stays last, score -inf)."""
    rows, cols = np.nonzero(ids >= 0)
    scores = np.full(ids.shape, -np.inf, np.float32)
    if len(rows):
        scores[rows, cols] = reranker.score_pairs([questions[i] for i in rows],
                                                  [texts[ids[i, j]] for i, j in
                                                   zip(rows, cols, strict=True)])
        # padding stays -inf: its prior is 0
        scores = reranker.with_prior(scores, retriever_scores, ids >= 0)
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)


@dataclasses.dataclass
class ClientData:
    """A client's reranker training set for one round and how it was made."""

    batch: dict  # preferences.reranker_batch arrays over every kept query
    kept: int  # queries kept (originals + augmented that passed the filter)
    augmented: int  # augmented queries made
    filtered: int  # of those, dropped by the consistency filter
    no_aligned: int  # kept queries without an aligned passage
    seconds: float


def client_data(config, questions: Sequence[dict], domain: str, search, texts, label_fn,
                reranker: Reranker, seed: Sequence[int]) -> ClientData:
    """The reranker's training set of one client round (steps 1-3 of the module docstring).
    ``search(list of question texts) -> (scores, ids) [N, K]``; ``texts``: the passages as
    the reranker scores them (after their source tags);
    ``label_fn(questions, ids) -> [N, K]`` preference labels (the client's generator)."""
    started = time.perf_counter()
    r = config.rerank
    pool = [q for q in questions if q.get("type") != "unanswerable"]
    if not pool:
        raise UserError("rerank: the client has no answerable training question")
    rng = random.Random(f"rerank:{config.seed}:{':'.join(map(str, seed))}")
    picked = [pool[rng.randrange(len(pool))] for _ in range(r.questions)]
    made = []
    for i, q in enumerate(picked):
        for name in strategies(config):
            aug = augment.augment(q, domain, name, rng, pool)
            if aug is not None:
                origin = aug.pop("origin", None)
                made.append((i if origin is None else None, origin, aug))
    # Entity swaps point at another pool question: label that one too, as their origin.
    extra = sorted({o for _, o, _ in made if o is not None})
    originals = picked + [pool[j] for j in extra]
    origin_row = {j: len(picked) + n for n, j in enumerate(extra)}  # pool index -> its row
    queries = originals + [a for _, _, a in made]
    retrieved, ids = search([q["question"] for q in queries])
    prefs = label_fn(queries, ids)
    kept_rows = list(range(len(picked)))
    filtered = 0
    for n, (i, origin, _) in enumerate(made):
        row = len(originals) + n
        src = i if origin is None else origin_row[origin]
        if augment.consistent(prefs[src], ids[src], prefs[row], ids[row]):
            kept_rows.append(row)
        else:
            filtered += 1
    kept = [queries[i] for i in kept_rows]
    kept_ids = ids[kept_rows]
    labels = prefs[kept_rows] if r.labels == "preference" else preferences.relevance_labels(
        kept, kept_ids)
    prior = None if reranker.prior_scale <= 0 else retriever_prior(
        retrieved[kept_rows], kept_ids >= 0, reranker.prior_scale)
    batch = preferences.reranker_batch(reranker.tokenizer, kept, kept_ids, texts, labels,
                                       reranker.max_len, prior)
    return ClientData(batch, len(kept), len(made), filtered,
                      int((~labels.astype(bool)).all(1).sum()),
                      time.perf_counter() - started)


def local_steps(config, adapter, reranker: Reranker, data: ClientData, rngs,
                seed: Sequence[int], client_optimizer=None) -> tuple[object, list[dict]]:
    """``rerank.local_steps`` steps of the reranker's adapter on batches of
    ``rerank.batch_size`` queries drawn (with replacement only when fewer) from ``data``.
    Returns the trained adapter and every step's metrics (host floats). ``client_optimizer``:
    the federated strategy's change to the optimizer (``Strategy.client_optimizer``)."""
    r = config.rerank
    optimizer = train.make_optimizer(r.lr, r.local_steps, warmup_steps=0)
    if client_optimizer is not None:
        optimizer = client_optimizer(optimizer)
    state = train.init_train_state({"lora": adapter}, optimizer)
    n = data.batch["labels"].shape[0]
    pick_rng = np.random.default_rng([config.seed, *seed])
    frozen = {"params": reranker.params}
    out = []
    for step in range(r.local_steps):
        rows = pick_rng.choice(n, r.batch_size, replace=n < r.batch_size)
        batch = {k: jnp.asarray(v[rows]) for k, v in data.batch.items()}
        state, m = rerank_step(state, frozen, batch, rngs[step], cfg=reranker.cfg,
                               loss_cfg=loss_config(config), optimizer=optimizer)
        out.append({k: float(v) for k, v in jax.device_get(m).items()})
    return state.trainable["lora"], out


__all__ = ["LABELS", "ClientData", "client_data", "local_steps", "rerank_ids",
           "validate"]
