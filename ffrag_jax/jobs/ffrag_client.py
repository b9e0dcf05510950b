"""One FF-RAG client's side of a round (:mod:`ffrag_jax.jobs.ffrag` runs the rounds): the
questions it trains on (with a knowledge boundary, the dual task's targets and its
insufficient-evidence examples), its local training (:func:`train_client`), the arrays of one
step (retrieval, the reranked order when the reader reads several passages, source tags, the
dual task's token weights), and its evaluation (reranked and retriever-only when it has a
reranker)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ffrag_jax import rag
from ffrag_jax.data import boundary
from ffrag_jax.data.knowledge import Client, boundary_enabled
from ffrag_jax.errors import UserError
from ffrag_jax.evaluation import boundary as boundary_eval
from ffrag_jax.rag import evaluate as rag_eval
from ffrag_jax.rag import prompts
from ffrag_jax.rerank import rounds as rerank_rounds
from ffrag_jax.rerank.cross_encoder import Reranker
from ffrag_jax.retrieval.encoder import TextEncoder
from ffrag_jax.retrieval.multi_source import Sources
from ffrag_jax.training import sharding, train


def train_client(config, client: Client, sources: Sources, enc: TextEncoder, tokenizer,
                 seed: tuple[int, int], frozen: dict, static: dict, gen_start, ret_start,
                 rngs: Sequence[jax.Array], *, reranker: Reranker | None = None,
                 on_step: Callable[[int, dict], None] | None = None):
    """A client's local training in round ``seed = (round, client)``: ``fl.local_steps``
    steps of :func:`rag.rag_step` from its starting generator adapter ``gen_start`` (at its
    rank) and query-encoder adapter ``ret_start``, each step's batch retrieved by its current
    query encoder (``frozen["retriever"]`` + the adapter so far) from ``sources``.
    ``frozen``: the round's frozen ``generator`` and ``retriever`` weights; ``static``:
    ``rag_step``'s static arguments (its ``optimizers`` too); ``rngs``: one key a step;
    ``on_step(step, out)`` after each (1-based) step. Returns the trained adapters
    ``(generator, retriever)``."""
    opt_gen, opt_ret = static["optimizers"]
    states = sharding.on_one_device({"generator": train.init_train_state(gen_start, opt_gen),
                                     "retriever": train.init_train_state(ret_start, opt_ret)})
    for step in range(config.fl.local_steps):
        query_enc = dataclasses.replace(enc, params=frozen["retriever"],
                                        lora=states["retriever"].trainable)
        batch = client_batch(config, tokenizer, query_enc, sources, client, (*seed, step),
                             reranker)
        states, out = rag.rag_step(states, frozen, {n: jnp.asarray(v) for n, v in batch.items()},
                                   rngs[step], **static)
        if on_step is not None:
            on_step(step + 1, out)
    return states["generator"].trainable, states["retriever"].trainable


def evaluate_client(config, client: Client, sources: Sources, query_enc: TextEncoder,
                    gen_params: dict, gen_lora, gen_cfg, tokenizer, *, closed_book: bool,
                    predictions: list | None = None, reranker: Reranker | None = None) -> dict:
    """Retrieval and answer metrics on the client's held-out questions
    (:func:`rag_eval.evaluate`; ``predictions``: the per-question records). With a
    ``reranker`` the candidates are reranked before the reader reads them, and the reader's
    scores with the retriever's order alone are added as ``retriever_only_<metric>``, with
    the reranking cost (``rerank_ms_per_question``)."""
    questions = [q["question"] for q in client.test]
    retrieved, ids = sources.search(query_enc.embed(questions))

    def run(ids, predictions=None, closed_book=closed_book):
        return rag_eval.evaluate(gen_params, gen_cfg, tokenizer, client.test, ids,
                                 sources.texts, closed_book=closed_book, lora=gen_lora,
                                 prompt_len=config.rag.prompt_len,
                                 max_new_tokens=config.eval.max_new_tokens,
                                 batch_size=config.eval.batch_size, predictions=predictions,
                                 contexts=contexts(config, sources, ids),
                                 boundary=boundary_enabled(config),
                                 candidates=candidate_contexts(config, sources, ids),
                                 reading=reading(config),
                                 abstain=abstain_gate(config, tokenizer))

    if reranker is None:
        return run(ids, predictions)
    reranked, _ = rerank_rounds.rerank_ids(reranker, questions, ids, sources.tagged_texts,
                                           retrieved)
    # The cost of a second, identical pass: the first one compiled the shapes it needed.
    started = time.perf_counter()
    rerank_rounds.rerank_ids(reranker, questions, ids, sources.tagged_texts, retrieved)
    cost = (time.perf_counter() - started) * 1000 / max(len(questions), 1)
    plain = run(ids, closed_book=False)
    out = run(reranked, predictions)
    out.update({f"retriever_only_{k}": v for k, v in plain.items() if k != "questions"})
    out["rerank_ms_per_question"] = cost
    return out


def contexts(config, sources: Sources, ids: np.ndarray) -> list[str]:
    """What the reader reads per question: the first ``rag.context_passages`` candidates, each
    after its source tag with ``rag.source_tags``."""
    return prompts.contexts(ids, sources.texts, config.rag.context_passages,
                            sources.passage_tags)


def reading(config) -> str:
    """How the reader's answers with each candidate become one (``boundary.reading``; without a
    boundary: the top candidate's)."""
    return config.boundary.reading if boundary_enabled(config) else "top"


def abstain_gate(config, tokenizer) -> tuple[int, float] | None:
    """The decoder's answer-or-abstain rule (``boundary.abstain_threshold``; none without a
    boundary)."""
    if not boundary_enabled(config):
        return None
    return boundary_eval.abstain_gate(tokenizer, config.boundary.get("abstain_threshold"))


def candidate_contexts(config, sources: Sources, ids: np.ndarray) -> list[list[str]] | None:
    """Per question, each candidate's context (after its tag) when the reader reads them one
    at a time (a boundary ``reading`` other than ``top``); None: it reads the top context."""
    if reading(config) == "top" or not single_passage(config):
        return None
    tags = sources.passage_tags
    return [[prompts.tagged_context([sources.texts[i]], None if tags is None else [tags[i]])
             for i in row if i >= 0] or [""] for row in ids]


def single_passage(config) -> bool:
    """The step scores every candidate on its own (the RAG losses' layout), not one context."""
    return config.rag.context_passages == 1


def reranking(config) -> bool:
    return bool(config.get("rerank") and config.rerank.enabled)


def pre_aligning(config) -> bool:
    return bool(config.get("rerank") and config.rerank.pre_align_steps > 0)


def training_questions(config, client: Client) -> list[dict]:
    """The client's training questions with the answers the generator learns: as they are, or
    with a knowledge boundary the tagged answers and abstentions of the dual task
    (``boundary.dual_task``; without it, the answerable questions with plain answers)."""
    if not boundary_enabled(config):
        return client.train
    b = config.boundary
    kept = [q for q in client.train if b.dual_task or q["type"] != "unanswerable"]
    return [{**q, "gold": q["answer"], "answer": boundary.target(q, tagged=b.dual_task)}
            for q in kept]


def client_batch(config, tokenizer, query_enc: TextEncoder, sources: Sources, client: Client,
                  seed: tuple[int, int, int], reranker: Reranker | None = None) -> dict:
    """The arrays of one step: ``fl.batch_size`` of the client's training questions (a pure
    function of ``seed`` = (round, client, step); drawn with replacement only when the client
    has fewer), retrieved for by ``query_enc``."""
    n = len(client.train)
    pick = np.random.default_rng([config.seed, *seed]).choice(
        n, config.fl.batch_size, replace=n < config.fl.batch_size)
    questions = [client.train[i] for i in pick]
    vectors = query_enc.embed([q["question"] for q in questions], batch_size=len(questions))
    if not np.isfinite(vectors).all():
        rnd, _, step = seed
        raise UserError(f"round {rnd} client {client.name} step {step}: the query encoder "
                        "gives NaN or inf embeddings: its LoRA diverged; lower "
                        f"fl.retriever_lr (now {config.fl.retriever_lr:g}) or fl.lr "
                        f"(now {config.fl.lr:g})")
    _, ids = sources.search(vectors)
    if boundary_enabled(config) and config.boundary.dual_task:
        questions, ids = without_evidence(config, questions, ids, seed)
    if reranker is not None and not single_passage(config):
        # A context of several passages is read in the reranked order, as at inference. With
        # one passage per prompt the losses see every candidate on its own, in any order: no
        # reranking needed (it would cost a cross-encoder pass per step).
        # The retriever's (inner-product) scores of the candidates without_evidence kept.
        retrieved = np.einsum("nd,nkd->nk", vectors, sources.vectors[np.maximum(ids, 0)])
        ids, _ = rerank_rounds.rerank_ids(reranker, [q["question"] for q in questions], ids,
                                          sources.tagged_texts, retrieved)
    return step_batch(config, tokenizer, query_enc, sources, questions, ids)


def without_evidence(config, questions: list[dict], ids: np.ndarray, seed
                      ) -> tuple[list[dict], np.ndarray]:
    """The dual task's insufficient-evidence examples made from answerable questions: with
    probability ``boundary.negatives`` a question loses the passages that support its answer
    (its gold fact and the case note on it) from its candidates, and its target becomes the
    abstention. The reader so learns to abstain when what it reads does not hold the answer,
    not only on the questions no base answers (a pure function of ``seed``)."""
    rate = config.boundary.negatives
    if rate <= 0:
        return questions, ids
    rng = np.random.default_rng([config.seed, *seed, 99])
    questions, ids = list(questions), ids.copy()
    for i, q in enumerate(questions):
        if q.get("type") == "unanswerable" or rng.random() >= rate:
            continue
        support = {q["fact"], q.get("case_fact", -1)} - {-1}
        kept = [x for x in ids[i] if x >= 0 and x not in support]
        ids[i] = kept + [-1] * (ids.shape[1] - len(kept))
        questions[i] = {**q, "type": "unanswerable", "source": None,
                        "answer": boundary.ABSTAIN}
    return questions, ids


def step_batch(config, tokenizer, enc, sources: Sources, questions: list[dict], ids: np.ndarray
           ) -> dict:
    """The arrays of one :func:`rag.rag_step` for ``questions`` and their candidates ``ids``."""
    r = config.rag
    if single_passage(config):  # every candidate on its own (after its tag)
        tags = sources.passage_tags
        passages, valid = rag.pad_passages(
            [[prompts.tagged_context([sources.texts[i]], None if tags is None else [tags[i]])
              for i in row if i >= 0] for row in ids], sources.k)
    else:  # one context per question: its first candidates, tagged (the losses' check it)
        passages = [[c] for c in contexts(config, sources, ids)]
        valid = np.ones((len(ids), 1), bool)
        ids = ids[:, :1]
    batch = rag.question_batch(tokenizer, enc.tokenizer, questions, passages,
                               prompt_len=r.prompt_len, answer_len=r.answer_len,
                               query_len=r.query_len)
    emb = np.where((ids >= 0)[..., None], sources.vectors[np.maximum(ids, 0)], 0.0)
    batch = {**batch, "passage_emb": emb.astype(np.float32), "passage_valid": valid}
    if "dual_task" in r.losses:
        b = config.boundary
        batch["target_weight"] = rag.target_weights(
            tokenizer, [q["answer"] for q in questions], r.answer_len, tag_weight=b.tag_weight,
            example_weights=[b.abstain_weight if q.get("type") == "unanswerable" else 1.0
                             for q in questions])
    return batch
