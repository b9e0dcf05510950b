"""Retrieval-augmented training losses, pure functions of arrays (shapes in each docstring).

Notation: ``B`` questions, ``K`` retrieved passages per question, ``T`` answer tokens, ``V``
vocabulary. The generator's logits for the answer given (question, passage k) are
``[B, K, T, V]``, already aligned with the answer tokens (position ``t`` scores token ``t``;
the caller does the causal shift). ``mask`` ``[B, T]`` is 1 on answer tokens, 0 on padding.

* :func:`rag_sequence_nll` - RAG-sequence (Lewis et al., 2020): one passage explains the whole
  answer, ``-log sum_k p(d_k|q) prod_t p(y_t|q, d_k, y_<t)``.
* :func:`rag_token_nll` - RAG-token: the passage is marginalised per token,
  ``-sum_t log sum_k p(d_k|q) p(y_t|q, d_k, y_<t)``.
  Both take label smoothing ``epsilon`` exactly as ``transformers``' RAG ``get_nll`` does (and
  are tested against it).
* :func:`lsr_loss` - LM-supervised retrieval (REPLUG, RA-DIT): the retriever's distribution
  over the K passages is pulled towards the LM's preference ``softmax(lm_scores / tau_lm)``,
  with a stop-gradient on the LM side.
* :func:`weighted_response_nll` - the response-only NLL of each passage's prompt, with per-token
  weights (RALT: weights = the answer mask). The knowledge-boundary dual task (issue 17) is
  :func:`rag_sequence_nll` with per-token weights in place of the mask (tags, abstentions).
* ``ffrag_jax.retrieval.contrastive.info_nce`` and
  ``ffrag_jax.training.train.causal_lm_loss`` (response
  only) complete the set: the latter is RALT's loss when the prompt holds retrieved passages.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def answer_logprobs(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(target log-probs [B, K, T], sum over the vocabulary of log-probs [B, K, T])`` from
    aligned generator ``logits`` ``[B, K, T, V]`` and answer ``targets`` ``[B, T]``. The second
    is what label smoothing needs."""
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    idx = jnp.broadcast_to(targets[:, None, :, None], (*logprobs.shape[:3], 1))
    return jnp.take_along_axis(logprobs, idx, axis=-1)[..., 0], logprobs.sum(-1)


def rag_sequence_nll(target_logprobs: jax.Array, doc_scores: jax.Array, mask: jax.Array, *,
                     epsilon: float = 0.0, vocab_logprob_sums: jax.Array | None = None,
                     vocab_size: int | None = None) -> jax.Array:
    """Per-question RAG-sequence loss ``[B]``.

    ``target_logprobs`` ``[B, K, T]`` (log p of each answer token given passage k),
    ``doc_scores`` ``[B, K]`` (retriever scores, softmaxed over K here: the gradient reaches the
    retriever), ``mask`` ``[B, T]``. With ``epsilon > 0`` the loss is
    ``(1 - eps) * nll + eps / V * smooth`` where ``smooth`` is the same marginalisation of the
    per-token sums of all ``V`` log-probs (``vocab_logprob_sums`` ``[B, K, T]``), as in
    ``transformers``' ``RagSequenceForGeneration.get_nll``.
    """
    doc_logprobs = jax.nn.log_softmax(doc_scores.astype(jnp.float32), axis=-1)  # [B, K]
    m = mask.astype(jnp.float32)[:, None, :]
    per_doc = (target_logprobs * m).sum(-1) + doc_logprobs  # [B, K]
    nll = -jax.nn.logsumexp(per_doc, axis=-1)
    if epsilon == 0.0:
        return nll
    if vocab_logprob_sums is None or vocab_size is None:
        raise ValueError("label smoothing needs vocab_logprob_sums and vocab_size")
    smooth_per_doc = (vocab_logprob_sums * m).sum(-1) + vocab_size * doc_logprobs
    smooth = -jax.nn.logsumexp(smooth_per_doc, axis=-1)
    return (1.0 - epsilon) * nll + epsilon / vocab_size * smooth


def rag_token_nll(logits: jax.Array, doc_scores: jax.Array, targets: jax.Array,
                  mask: jax.Array, *, epsilon: float = 0.0) -> jax.Array:
    """Per-question RAG-token loss ``[B]`` from aligned generator ``logits`` ``[B, K, T, V]``,
    ``doc_scores`` ``[B, K]``, answer ``targets`` ``[B, T]`` and ``mask`` ``[B, T]``: each
    token's distribution is ``sum_k p(d_k|q) p(.|q, d_k, y_<t)``; label smoothing ``epsilon``
    as ``transformers``' ``RagTokenForGeneration.get_nll``."""
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    doc_logprobs = jax.nn.log_softmax(doc_scores.astype(jnp.float32), axis=-1)
    marginal = jax.nn.logsumexp(logprobs + doc_logprobs[:, :, None, None], axis=1)  # [B,T,V]
    m = mask.astype(jnp.float32)
    ll = jnp.take_along_axis(marginal, targets[..., None], axis=-1)[..., 0]
    nll = -(ll * m).sum(-1)
    if epsilon == 0.0:
        return nll
    smooth = -(marginal.sum(-1) * m).sum(-1)
    return (1.0 - epsilon) * nll + epsilon / logits.shape[-1] * smooth


def sequence_logprob(target_logprobs: jax.Array, mask: jax.Array, *,
                     length_normalize: bool = False) -> jax.Array:
    """``log p(answer | q, d_k)`` ``[B, K]`` from ``target_logprobs`` ``[B, K, T]``: the sum
    over answer tokens, or their mean with ``length_normalize``."""
    m = mask.astype(jnp.float32)[:, None, :]
    total = (target_logprobs * m).sum(-1)
    if length_normalize:
        total = total / jnp.maximum(m.sum(-1), 1.0)
    return total


def weighted_response_nll(target_logprobs: jax.Array, weights: jax.Array, mask: jax.Array,
                          valid: jax.Array | None = None) -> jax.Array:
    """Per-question ``[B]``: each passage's answer NLL ``-sum_t w_t log p(y_t|q, d_k, y_<t) /
    sum_t mask_t`` (``target_logprobs`` ``[B, K, T]``, ``weights`` and ``mask`` ``[B, T]``),
    averaged over the valid passages (``valid`` ``[B, K]``, default all). With ``weights =
    mask`` it is RALT's token-mean NLL."""
    if valid is None:
        valid = jnp.ones(target_logprobs.shape[:2], bool)
    valid = valid.astype(jnp.float32)
    m = mask.astype(jnp.float32)
    per_doc = -(target_logprobs * weights.astype(jnp.float32)[:, None, :]).sum(-1) / jnp.maximum(
        m.sum(-1, keepdims=True), 1.0)
    return (per_doc * valid).sum(-1) / jnp.maximum(valid.sum(-1), 1.0)


def lsr_loss(retriever_scores: jax.Array, lm_scores: jax.Array, *, tau_r: float = 1.0,
             tau_lm: float = 1.0, direction: str = "lm_to_retriever") -> jax.Array:
    """LM-supervised retrieval loss per question ``[B]``.

    ``P_R = softmax(retriever_scores / tau_r)`` and ``Q_LM = softmax(stop_gradient(lm_scores) /
    tau_lm)`` over the K passages (``[B, K]`` each; ``lm_scores`` are log-likelihoods of the
    answer given each passage, see :func:`sequence_logprob`). ``direction``:

    * ``"lm_to_retriever"``: ``KL(Q_LM || P_R)`` (REPLUG's loss; RA-DIT's);
    * ``"retriever_to_lm"``: ``KL(P_R || Q_LM)``.

    Only the retriever receives gradients.
    """
    log_p = jax.nn.log_softmax(retriever_scores.astype(jnp.float32) / tau_r, axis=-1)
    log_q = jax.nn.log_softmax(jax.lax.stop_gradient(lm_scores).astype(jnp.float32) / tau_lm,
                               axis=-1)
    if direction == "lm_to_retriever":
        return (jnp.exp(log_q) * (log_q - log_p)).sum(-1)
    if direction == "retriever_to_lm":
        return (jnp.exp(log_p) * (log_p - log_q)).sum(-1)
    raise ValueError(f"direction {direction!r}; choose lm_to_retriever or retriever_to_lm")
