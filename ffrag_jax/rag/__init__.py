"""Retrieval-augmented generation: the reader's prompts (:mod:`.prompts`), the arrays of a
step (:mod:`.batches`), the jitted end-to-end retriever-generator step (:mod:`.step`),
multi-source search over a client's bases (:mod:`.search`), evaluation (:mod:`.evaluate`)
and exported systems (:mod:`.system`). The names below are the research API."""

from ffrag_jax.rag.batches import (
    answer_ids,
    drop_long_answers,
    encode_generator_batch,
    pad_passages,
    question_batch,
    target_weights,
)
from ffrag_jax.rag.prompts import (
    MIN_QUESTION_TOKENS,
    TEMPLATE,
    Prompt,
    contexts,
    fit_prompt,
    fit_prompts,
    tagged_context,
)
from ffrag_jax.rag.step import (
    LOSSES,
    RagLossConfig,
    answer_logits,
    client_update,
    doc_scores,
    embeddings,
    rag_loss,
    rag_step,
    update,
    update_clients,
)

__all__ = [
    "LOSSES", "MIN_QUESTION_TOKENS", "TEMPLATE", "Prompt", "RagLossConfig", "answer_ids",
    "answer_logits", "client_update", "doc_scores", "drop_long_answers", "embeddings",
    "encode_generator_batch", "fit_prompt", "fit_prompts", "pad_passages", "question_batch",
    "rag_loss", "rag_step", "tagged_context", "target_weights", "update", "update_clients",
    "contexts",
]
