"""Evaluation of a retriever + reader on questions with known gold passages: retrieval recall,
answer-in-context rate, closed-book and RAG exact match and F1.

Shared by the centralised RAG job, the federated FF-RAG job and the inference CLI.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ffrag_jax import evaluation
from ffrag_jax.data import text
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
             predictions: list | None = None) -> dict:
    """Metrics of ``questions`` (``{question, answer, fact}``, ``fact`` indexing
    ``passages``) whose retrieved passage ids are ``ids`` ``[N, K]`` (best first, -1: none):
    recall, the answer-in-context rate of the top passage, RAG exact match and F1 with the top
    passage in the prompt, and with ``closed_book`` the same without a passage. With a
    ``predictions`` list, one record per question is appended to it: ``{question, answer,
    retrieved (passage texts, best first), prediction}``."""
    texts = [q["question"] for q in questions]
    answers = [q["answer"] for q in questions]
    top = [passages[i] if i >= 0 else "" for i in ids[:, 0]]
    common = dict(lora=lora, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
                  batch_size=batch_size)
    said = answer(gen_params, gen_cfg, tokenizer, texts, top, **common)
    out = {**retrieval_metrics(ids, np.asarray([q["fact"] for q in questions])),
           "answer_in_context": evaluation.answer_in_context_rate(top, answers),
           **answer_metrics(said, answers, "rag")}
    if closed_book:
        out.update(answer_metrics(
            answer(gen_params, gen_cfg, tokenizer, texts, [""] * len(texts), **common),
            answers, "closed_book"))
    if predictions is not None:
        predictions.extend(
            {"question": t, "answer": a, "retrieved": [passages[i] for i in row if i >= 0],
             "prediction": p} for t, a, row, p in zip(texts, answers, ids, said, strict=True))
    return {**out, "questions": len(questions)}
