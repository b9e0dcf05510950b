"""The preference-aligned reranker's objectives (DPA-RAG), pure functions of score arrays.

Notation: ``B`` questions, ``K`` candidate passages each; ``scores`` ``[B, K]`` are the
cross-encoder's logits, ``labels`` ``[B, K]`` 1 where the passage is aligned (the generator
answers right with it; or relevant, for a relevance-trained reranker) and 0 where not,
``valid`` ``[B, K]`` False on padding. Each loss returns ``(per-question loss [B], counted
[B])``: a question without the pairs or positives a loss needs has loss 0 and is not counted
(:func:`batch_mean` averages over the counted ones).

* :func:`pointwise` - binary cross-entropy of ``sigmoid(score)`` against the label, mean over
  the valid passages;
* :func:`pairwise` - RankNet (Burges et al., 2005): ``-log sigmoid(s_i - s_j)`` for every pair
  with ``label_i > label_j``, mean over the pairs;
* :func:`contrastive` - supervised contrastive (Khosla et al., 2020) with the query as the
  anchor: ``-1/|P| sum_{p in P} log softmax(s / tau)_p`` over the valid passages, ``P`` the
  aligned ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

TASKS = ("pointwise", "pairwise", "contrastive")


def batch_mean(loss: jax.Array, counted: jax.Array) -> jax.Array:
    """Mean of ``loss`` ``[B]`` over the ``counted`` questions (0 when none is)."""
    counted = counted.astype(jnp.float32)
    return (loss * counted).sum() / jnp.maximum(counted.sum(), 1.0)


def pointwise(scores: jax.Array, labels: jax.Array, valid: jax.Array
              ) -> tuple[jax.Array, jax.Array]:
    s, y, v = scores.astype(jnp.float32), labels.astype(jnp.float32), valid.astype(jnp.float32)
    # log(1 + exp(-|s|)) form: stable for large |s| (as torch's BCE-with-logits)
    bce = jnp.maximum(s, 0.0) - s * y + jnp.log1p(jnp.exp(-jnp.abs(s)))
    n = v.sum(-1)
    return (bce * v).sum(-1) / jnp.maximum(n, 1.0), n > 0


def pairwise(scores: jax.Array, labels: jax.Array, valid: jax.Array
             ) -> tuple[jax.Array, jax.Array]:
    s, y = scores.astype(jnp.float32), labels.astype(jnp.float32)
    pair = ((y[:, :, None] > y[:, None, :]) & valid[:, :, None] & valid[:, None, :]
            ).astype(jnp.float32)  # [B, K (better), K (worse)]
    diff = s[:, :, None] - s[:, None, :]
    n = pair.sum((1, 2))
    return (jax.nn.softplus(-diff) * pair).sum((1, 2)) / jnp.maximum(n, 1.0), n > 0


def contrastive(scores: jax.Array, labels: jax.Array, valid: jax.Array, *,
                temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    s = jnp.where(valid, scores.astype(jnp.float32) / temperature, -1e9)
    log_p = jax.nn.log_softmax(s, axis=-1)
    pos = ((labels > 0) & valid).astype(jnp.float32)
    n = pos.sum(-1)
    # the question needs a negative too: with positives only, the loss is constant
    has_negative = ((labels <= 0) & valid).any(-1)
    return -(log_p * pos).sum(-1) / jnp.maximum(n, 1.0), (n > 0) & has_negative


def task_losses(scores: jax.Array, labels: jax.Array, valid: jax.Array, *,
                temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """The three batch losses ``[3]`` in :data:`TASKS` order, and whether each has a question
    to learn from ``[3]``."""
    parts = [pointwise(scores, labels, valid), pairwise(scores, labels, valid),
             contrastive(scores, labels, valid, temperature=temperature)]
    return (jnp.stack([batch_mean(*p) for p in parts]),
            jnp.stack([counted.any() for _, counted in parts]))
