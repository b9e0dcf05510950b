"""Evaluation of a retriever + reader on questions with known gold passages: retrieval recall,
answer-in-context rate, closed-book and RAG exact match and F1.

Shared by the centralised RAG job, the federated FF-RAG job and the inference CLI.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ffrag_jax import evaluation
from ffrag_jax.data import text
from ffrag_jax.data.boundary import ANSWERABLE
from ffrag_jax.evaluation.boundary import boundary_metrics, parse, read
from ffrag_jax.models.llama import LlamaConfig
from ffrag_jax.rag.prompts import Prompt, fit_prompts


def answer_prompts(gen_params: dict, gen_cfg: LlamaConfig, tokenizer,
                   prompts: Sequence[Prompt], *, lora=None, prompt_len: int,
                   max_new_tokens: int, batch_size: int, **sampling) -> list[str]:
    """Greedy (or sampled, see :func:`evaluation.generate_answers`) answers to prompts fitted
    by :func:`~ffrag_jax.rag.prompts.fit_prompts`."""
    enc = text.pad_prompts(tokenizer, [p.ids for p in prompts], prompt_len)
    return evaluation.generate_encoded(gen_params, gen_cfg, tokenizer, enc, lora=lora,
                                       max_new_tokens=max_new_tokens, batch_size=batch_size,
                                       **sampling)


def answer(gen_params: dict, gen_cfg: LlamaConfig, tokenizer, questions: Sequence[str],
           contexts: Sequence[str], *, prompt_len: int, **kwargs) -> list[str]:
    """:func:`answer_prompts` of ``questions`` reading ``contexts``."""
    return answer_prompts(gen_params, gen_cfg, tokenizer,
                          fit_prompts(tokenizer, questions, contexts, prompt_len),
                          prompt_len=prompt_len, **kwargs)


def answer_each(gen_params: dict, gen_cfg: LlamaConfig, tokenizer, questions: Sequence[str],
                candidates: Sequence[Sequence[str]], **kwargs) -> list[list[str]]:
    """Per question, the reader's answers with each of its candidate contexts alone (best
    first), all generated in one :func:`answer` pass."""
    flat = [(i, c) for i, row in enumerate(candidates) for c in row]
    said = answer(gen_params, gen_cfg, tokenizer, [questions[i] for i, _ in flat],
                  [c for _, c in flat], **kwargs)
    out: list[list[str]] = [[] for _ in questions]
    for (i, _), a in zip(flat, said, strict=True):
        out[i].append(a)
    return out


def retrieval_metrics(ids: np.ndarray, gold: np.ndarray) -> dict:
    """``recall@1`` and ``recall@K`` of retrieved ids ``[N, K]`` (-1: none) against the gold
    passage ids ``[N]``."""
    k = ids.shape[1]
    return {"recall@1": float(np.mean(ids[:, 0] == gold)),
            f"recall@{k}": float(np.mean((ids == gold[:, None]).any(1)))}


def answer_metrics(predictions: Sequence[str], answers: Sequence[str], prefix: str) -> dict:
    """``{prefix}_em`` and ``{prefix}_f1`` (SQuAD normalisation)."""
    return {f"{prefix}_em": evaluation.exact_match_score(predictions, answers),
            f"{prefix}_f1": evaluation.f1_score(predictions, answers)}


def evaluate(gen_params: dict, gen_cfg: LlamaConfig, tokenizer, questions: Sequence[dict],
             ids: np.ndarray, passages: Sequence[str], *, closed_book: bool, lora=None,
             prompt_len: int, max_new_tokens: int, batch_size: int,
             predictions: list | None = None, contexts: Sequence[str] | None = None,
             boundary: bool = False, candidates: Sequence[Sequence[str]] | None = None,
             reading: str = "top", abstain: tuple[int, float] | None = None) -> dict:
    """Metrics of ``questions`` (``{question, answer, fact}``, ``fact`` indexing
    ``passages``) whose retrieved passage ids are ``ids`` ``[N, K]`` (best first, -1: none):
    recall, the answer-in-context rate of the top passage, RAG exact match and F1 with the top
    passage in the prompt (or with ``contexts``, one per question: e.g. several tagged
    passages, :func:`~ffrag_jax.rag.prompts.contexts`), and with ``closed_book`` the same
    without a passage.

    With ``boundary`` the questions are knowledge-boundary ones (``type``, answers tagged or
    abstained, :mod:`ffrag_jax.evaluation.boundary`): retrieval, answer-in-context and the
    EM/F1 scores are over the answerable questions, on the answer's value (tag removed), and
    the boundary metrics are added. With a ``predictions`` list, one record per question is
    appended to it: ``{question, answer, retrieved (passage texts, best first), prediction}``
    (+ ``type`` with ``boundary``, + ``per_candidate``: the answers with each candidate).

    With ``candidates`` (per question, the contexts of its candidates, best first; at least
    one) the reader answers with each alone and ``reading``
    (:data:`~ffrag_jax.evaluation.boundary.READINGS`) picks the answer; the scores of the
    first candidate's answers alone are added as ``top1_<metric>``. ``abstain``: the
    decoder's answer-or-abstain rule (:func:`~ffrag_jax.evaluation.boundary.abstain_gate`)."""
    texts = [q["question"] for q in questions]
    answers = [q["answer"] for q in questions]
    top = [passages[i] if i >= 0 else "" for i in ids[:, 0]]
    contexts = top if contexts is None else list(contexts)
    common = dict(lora=lora, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
                  batch_size=batch_size, abstain=abstain)
    extra = {}
    if candidates is None:
        said = answer(gen_params, gen_cfg, tokenizer, texts, contexts, **common)
    else:
        per_question = answer_each(gen_params, gen_cfg, tokenizer, texts, candidates, **common)
        said = read(per_question, reading)
        top1 = [a[0] for a in per_question]
        if boundary:
            extra.update(boundary_metrics(top1, questions))
        scored_top1 = [i for i, q in enumerate(questions)
                       if not boundary or q["type"] in ANSWERABLE]
        extra.update(answer_metrics([parse(top1[i]).value if boundary else top1[i]
                                     for i in scored_top1],
                                    [answers[i] for i in scored_top1], "rag"))
        extra = {f"top1_{k}": v for k, v in extra.items()}
    scored = range(len(questions))
    values = said
    if boundary:
        scored = [i for i, q in enumerate(questions) if q["type"] in ANSWERABLE]
        values = [parse(p).value for p in said]
    pick = lambda xs: [xs[i] for i in scored]  # noqa: E731
    gold = np.asarray([q["fact"] for q in questions], np.int64)
    out = {**retrieval_metrics(ids[list(scored)], gold[list(scored)]),
           "answer_in_context": evaluation.answer_in_context_rate(pick(contexts), pick(answers)),
           **answer_metrics(pick(values), pick(answers), "rag")}
    if boundary:
        out.update(boundary_metrics(said, questions))
    if closed_book:
        book = answer(gen_params, gen_cfg, tokenizer, texts, [""] * len(texts), **common)
        if boundary:
            book = [parse(p).value for p in book]
        out.update(answer_metrics(pick(book), pick(answers), "closed_book"))
    if predictions is not None:
        each = per_question if candidates is not None else [None] * len(texts)
        predictions.extend(
            {"question": t, "answer": a, "retrieved": [passages[i] for i in row if i >= 0],
             "prediction": p, **({"type": q["type"]} if boundary else {}),
             **({} if e is None else {"per_candidate": e})}
            for t, a, row, p, q, e in zip(texts, answers, ids, said, questions, each,
                                          strict=True))
    return {**out, **extra, "questions": len(questions)}
