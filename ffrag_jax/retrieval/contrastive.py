"""Retriever training: symmetric in-batch InfoNCE as a jitted step, LoRA or full fine-tuning.

For a batch of ``B`` (query, positive passage) pairs and optional ``H`` hard negatives per
query, with unit embeddings ``q``, ``p`` ``[B, D]`` and ``n`` ``[B, H, D]``:

* query -> passage: ``logits = scale * q @ [p; n]^T`` ``[B, B + B*H]``, target the diagonal;
* passage -> query (symmetric): ``scale * p @ q^T`` ``[B, B]``, target the diagonal;
* loss = mean of the two cross-entropies (just the first when ``symmetric=False``).

Every other passage in the batch is a negative. The logit scale is 100 as in the DALM toolkit
(a temperature of 0.01), configurable.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from ffrag_jax.retrieval.encoder import EncoderConfig, encode
from ffrag_jax.training.train import TrainState, apply_gradients

MODES = ("lora", "full")


def info_nce(queries: jax.Array, passages: jax.Array, negatives: jax.Array | None = None, *,
             scale: float = 100.0, symmetric: bool = True) -> tuple[jax.Array, dict]:
    """Loss (scalar) and ``{"accuracy"}`` (query -> passage top-1 in batch) for embeddings
    ``queries`` ``[B, D]``, ``passages`` ``[B, D]`` and optional ``negatives`` ``[B, H, D]``."""
    batch = queries.shape[0]
    candidates = passages
    if negatives is not None:
        candidates = jnp.concatenate([passages, negatives.reshape(-1, negatives.shape[-1])])
    logits = scale * queries @ candidates.T
    labels = jnp.arange(batch)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    if symmetric:
        back = scale * passages @ queries.T
        loss = 0.5 * (loss + optax.softmax_cross_entropy_with_integer_labels(back, labels).mean())
    accuracy = (jnp.argmax(logits, axis=-1) == labels).mean()
    return loss, {"accuracy": accuracy}


def retriever_loss(trainable, frozen, cfg: EncoderConfig, batch: dict, rng: jax.Array | None, *,
                   mode: str, scale: float, symmetric: bool) -> tuple[jax.Array, dict]:
    """InfoNCE of the encoder on ``batch``: ``query_ids``/``query_mask`` ``[B, Tq]``,
    ``passage_ids``/``passage_mask`` ``[B, Tp]`` and optionally ``negative_ids``/
    ``negative_mask`` ``[B, H, Tp]``. ``trainable`` is a LoRA (``mode='lora'``, ``frozen`` the
    params) or the params (``mode='full'``)."""
    params, adapter = (frozen, trainable) if mode == "lora" else (trainable, None)
    keys = [None] * 3 if rng is None else list(jax.random.split(rng, 3))
    q = encode(params, cfg, batch["query_ids"], batch["query_mask"], adapter,
               dropout_rng=keys[0])
    p = encode(params, cfg, batch["passage_ids"], batch["passage_mask"], adapter,
               dropout_rng=keys[1])
    n = None
    if "negative_ids" in batch:
        b, h, t = batch["negative_ids"].shape
        n = encode(params, cfg, batch["negative_ids"].reshape(b * h, t),
                   batch["negative_mask"].reshape(b * h, t), adapter,
                   dropout_rng=keys[2]).reshape(b, h, -1)
    return info_nce(q, p, n, scale=scale, symmetric=symmetric)


@functools.partial(jax.jit, static_argnames=("cfg", "optimizer", "mode", "scale", "symmetric"),
                   donate_argnums=(0,))
def train_step(state: TrainState, frozen, batch: dict, rng: jax.Array, *, cfg: EncoderConfig,
               optimizer: optax.GradientTransformation, mode: str = "lora",
               scale: float = 100.0, symmetric: bool = True) -> tuple[TrainState, dict]:
    """One optimizer step of :func:`retriever_loss` (the state is donated). Returns the new
    state and ``{loss, accuracy, grad_norm}``."""
    (loss, aux), grads = jax.value_and_grad(retriever_loss, has_aux=True)(
        state.trainable, frozen, cfg, batch, rng, mode=mode, scale=scale, symmetric=symmetric)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), **aux}
    return apply_gradients(state, grads, optimizer), metrics
