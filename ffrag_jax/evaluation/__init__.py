"""Evaluation: answers scored as SQuAD does, and generated in batches (:mod:`.answers`, whose
names are re-exported here); the reference's MMLU harness (:mod:`.mmlu`). RAG metrics are in
:mod:`ffrag_jax.rag.evaluate`."""

from ffrag_jax.evaluation.answers import (
    answer_in_context_rate,
    exact_match,
    exact_match_score,
    f1,
    f1_score,
    generate_answers,
    generate_encoded,
    normalize_answer,
)

__all__ = [
    "answer_in_context_rate", "exact_match", "exact_match_score", "f1", "f1_score",
    "generate_answers", "generate_encoded", "normalize_answer",
]
