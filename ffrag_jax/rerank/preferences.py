"""DPA-RAG's preference knowledge: which retrieved passages the generator actually answers
right with, and the reranker's training arrays built from it.

For a training question and its ``K`` candidates, the generator answers the question with each
passage alone in its prompt (greedy); a passage is **aligned** when that answer's value is the
gold one (:func:`preference_labels`). A generator too weak to answer many questions right yet
(early rounds) labels almost nothing so; :func:`likelihood_labels` then takes the generator's
softer preference: the candidate under which the gold answer is likeliest, when it is likelier
there than with no passage at all. A **relevance** label instead marks the passages a
dataset would call relevant: the gold fact and, when the case base holds a note on the same
fact (agreeing or contradicting), that note, and any long record stating either
(``boundary.digest_rate``) (:func:`relevance_labels`); a reranker trained on
them is the baseline a preference-aligned one must beat.

Unanswerable questions carry no gold passage: they are left out of both. A question whose every
passage is answered wrongly (or abstained on) has no aligned passage: the point-wise loss still
learns from it (all negatives); the pair-wise and contrastive losses skip it
(:mod:`ffrag_jax.rerank.losses`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ffrag_jax.evaluation import exact_match
from ffrag_jax.evaluation.boundary import parse
from ffrag_jax.rag.batches import encode_generator_batch
from ffrag_jax.rag.evaluate import answer
from ffrag_jax.rag.prompts import tagged_context
from ffrag_jax.rerank.cross_encoder import tokenize_pairs


def gold(question: dict) -> str:
    """The value a right answer holds (``gold`` when the ``answer`` is a training target)."""
    return question.get("gold", question["answer"])


def labelled(questions: Sequence[dict]) -> list[int]:
    """Indices of the questions that can be labelled (not unanswerable)."""
    return [i for i, q in enumerate(questions) if q.get("type") != "unanswerable"]


def preference_labels(gen_params: dict, gen_cfg, tokenizer, questions: Sequence[dict],
                      ids: np.ndarray, texts: Sequence[str], *, tags=None, lora=None,
                      prompt_len: int, max_new_tokens: int, batch_size: int
                      ) -> np.ndarray:
    """``[N, K]`` 1.0 where the generator (``gen_params`` + ``lora``) answers question ``i``
    right reading candidate ``ids[i, k]`` alone (tagged by ``tags[id]`` when given), else 0
    (padding -1 and unanswerable questions: 0)."""
    rows, contexts, questions_text = [], [], []
    for i in labelled(questions):
        for k, pid in enumerate(ids[i]):
            if pid >= 0:
                rows.append((i, k))
                contexts.append(tagged_context([texts[pid]],
                                               None if tags is None else [tags[pid]]))
                questions_text.append(questions[i]["question"])
    labels = np.zeros(ids.shape, np.float32)
    if not rows:
        return labels
    said = answer(gen_params, gen_cfg, tokenizer, questions_text, contexts, lora=lora,
                  prompt_len=prompt_len, max_new_tokens=max_new_tokens, batch_size=batch_size)
    for (i, k), prediction in zip(rows, said, strict=True):
        p = parse(prediction)
        labels[i, k] = float(not p.abstained and exact_match(p.value, gold(questions[i])) > 0)
    none = sum(1 for i in labelled(questions) if not labels[i].any())
    if none:
        logging.info("preference labels: %d of %d questions have no aligned passage (the "
                     "pair-wise and contrastive losses skip them)", none, len(labelled(questions)))
    return labels


def likelihood_labels(gen_params: dict, gen_cfg, tokenizer, questions: Sequence[dict],
                      ids: np.ndarray, texts: Sequence[str], *, tags=None, lora=None,
                      prompt_len: int, answer_len: int, batch_size: int) -> np.ndarray:
    """``[N, K]`` 1.0 at the candidate ``ids[i, k]`` (read alone, tagged by ``tags``) under
    which the generator gives question ``i``'s ``answer`` (the target it trains on: tagged
    in the dual task) the highest mean log-probability per token, if that beats the
    closed-book one; else 0 (padding and unanswerable: 0)."""
    rows = labelled(questions)
    labels = np.zeros(ids.shape, np.float32)
    if not rows:
        return labels
    k = ids.shape[1]
    passages = [[""] + [tagged_context([texts[p]], None if tags is None else [tags[p]])
                        if p >= 0 else "" for p in ids[i]] for i in rows]
    scores = np.zeros((len(rows), k + 1), np.float32)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        enc = encode_generator_batch(tokenizer, [questions[i]["question"] for i in chunk],
                                     [questions[i]["answer"] for i in chunk],
                                     passages[start : start + batch_size], prompt_len,
                                     answer_len)
        scores[start : start + len(chunk)] = np.asarray(_answer_logprob(
            gen_params, gen_cfg, {n: jnp.asarray(v) for n, v in enc.items()}, lora))
    for n, i in enumerate(rows):
        valid = ids[i] >= 0
        if not valid.any():
            continue
        cand = np.where(valid, scores[n, 1:], -np.inf)
        best = int(np.argmax(cand))
        labels[i, best] = float(cand[best] > scores[n, 0])
    return labels


@functools.partial(jax.jit, static_argnames="gen_cfg")
def _answer_logprob(gen_params, gen_cfg, batch, lora):
    """Mean log-probability per answer token ``[B, K]`` (:mod:`ffrag_jax.rag.step`'s layout)."""
    from ffrag_jax.rag.losses import answer_logprobs, sequence_logprob
    from ffrag_jax.rag.step import answer_logits

    target_lp, _ = answer_logprobs(answer_logits(gen_params, gen_cfg, batch, lora),
                                   batch["targets"])
    return sequence_logprob(target_lp, batch["answer_mask"], length_normalize=True)


def relevance_labels(questions: Sequence[dict], ids: np.ndarray) -> np.ndarray:
    """``[N, K]`` 1.0 where candidate ``ids[i, k]`` is question ``i``'s gold fact, the case
    note on it (``case_fact``) or a record stating either (``digests``)."""
    out = np.zeros(ids.shape, np.float32)
    for i in labelled(questions):
        q = questions[i]
        relevant = {q["fact"], q.get("case_fact", -1), *q.get("digests", ())} - {-1}
        out[i] = np.isin(ids[i], list(relevant))
    return out


def reranker_batch(tokenizer, questions: Sequence[dict], ids: np.ndarray,
                   texts: Sequence[str], labels: np.ndarray, max_len: int,
                   prior: np.ndarray | None = None) -> dict:
    """The reranker step's arrays (:mod:`ffrag_jax.rerank.step`) for the labelled questions:
    ``input_ids``/``attention_mask``/``token_type_ids`` ``[B, K, T]``, ``labels`` and
    ``valid`` ``[B, K]`` (+ ``prior`` ``[B, K]`` when given for every question)."""
    keep = labelled(questions)
    b, k = len(keep), ids.shape[1]
    pairs_q = [questions[i]["question"] for i in keep for _ in range(k)]
    pairs_p = [texts[pid] if pid >= 0 else "" for i in keep for pid in ids[i]]
    enc = tokenize_pairs(tokenizer, pairs_q, pairs_p, max_len)
    batch = {name: v.reshape(b, k, max_len) for name, v in enc.items()}
    batch["labels"] = labels[keep].astype(np.float32)
    batch["valid"] = ids[keep] >= 0
    if prior is not None:
        batch["prior"] = np.asarray(prior, np.float32)[keep]
    return batch
