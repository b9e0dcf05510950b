"""The preference-aligned reranker (DPA-RAG, issue 17): a cross-encoder (:mod:`.cross_encoder`),
its point-wise, pair-wise and contrastive objectives (:mod:`.losses`) balanced by MGDA
(:mod:`.mgda`), and its training step (:mod:`.step`). The names below are the research API."""

from ffrag_jax.rerank.cross_encoder import (
    CrossEncoder,
    Reranker,
    init_params,
    load,
    retriever_prior,
    save,
    scores,
    tokenize_pairs,
)
from ffrag_jax.rerank.losses import TASKS, contrastive, pairwise, pointwise, task_losses
from ffrag_jax.rerank.mgda import combine, frank_wolfe, gram, two_task_weight
from ffrag_jax.rerank.step import RerankLossConfig, rerank_step, update, update_clients

__all__ = [
    "TASKS", "CrossEncoder", "RerankLossConfig", "Reranker", "combine", "contrastive",
    "frank_wolfe", "gram", "init_params", "load", "pairwise", "pointwise", "rerank_step",
    "retriever_prior", "save", "scores", "task_losses", "tokenize_pairs", "two_task_weight",
    "update", "update_clients",
]
