"""The jitted end-to-end retriever-generator step.

Inputs (host side): ``B`` questions with answers and, per question, the ``K`` passages the
current index returned. Inside one jit:

1. the query encoder (frozen weights + its LoRA) embeds the questions; the passages' vectors
   are given (the index's, frozen passage encoder: the default, no index refresh needed) or,
   when ``passage_ids`` are in the batch, embedded by the same encoder (then passage-side
   training changes the corpus vectors and the index must be refreshed);
2. ``doc_scores = scale * q . p`` ``[B, K]`` carry gradients to the retriever's LoRA;
3. the generator (frozen weights + its LoRA) scores the answer given each (passage, question)
   in one batched forward over ``B*K`` sequences;
4. the loss is a weighted sum of RAG-sequence, RAG-token, LSR (retriever only, LM side
   stop-gradient), RALT (generator only: the response-only NLL, mean over the K passages) and
   the knowledge-boundary dual task (RAG-sequence with the batch's per-token
   ``target_weight`` ``[B, T]``: source tags and abstentions weighted, issue 17; the passage
   that supports the target, the authority's in a conflict, takes the mass),
   :mod:`ffrag_jax.rag.losses`.

The batch layout (answers aligned at one position for every passage) is in
:mod:`ffrag_jax.rag.batches`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from ffrag_jax.errors import UserError
from ffrag_jax.models.llama import LlamaConfig, forward
from ffrag_jax.models.partitioning import client_axis
from ffrag_jax.rag import losses
from ffrag_jax.retrieval.encoder import EncoderConfig, encode
from ffrag_jax.training.train import apply_gradients, scan_steps

LOSSES = ("rag_sequence", "rag_token", "lsr", "ralt", "dual_task")


@dataclasses.dataclass(frozen=True)
class RagLossConfig:
    """Static loss settings (hashable). ``weights`` pairs loss names with weights."""

    weights: tuple[tuple[str, float], ...] = (("rag_sequence", 1.0),)
    score_scale: float = 20.0  # doc_scores = scale * cosine (MiniLM cosines are in [-1, 1])
    epsilon: float = 0.0
    tau_r: float = 1.0
    tau_lm: float = 1.0
    lsr_direction: str = "lm_to_retriever"
    length_normalize: bool = True  # LSR's LM scores: mean log-prob per answer token
    # LSR over all B*K passages of the batch: other questions' passages join as negatives the
    # LM gives zero weight. Without them, LSR only reorders each question's own top-K and can
    # drift the query encoder away from everything else (measured: recall falls).
    in_batch_negatives: bool = True

    def __post_init__(self):
        unknown = [name for name, _ in self.weights if name not in LOSSES]
        if unknown:
            raise UserError(f"unknown RAG loss {unknown[0]!r}; losses: {', '.join(LOSSES)}")


def answer_logits(gen_params: dict, gen_cfg: LlamaConfig, batch: dict, gen_lora=None,
                  dropout_rng=None) -> jax.Array:
    """Generator logits aligned with the answer tokens: ``[B, K, T, V]``."""
    b, k, length = batch["gen_ids"].shape
    t = batch["targets"].shape[1]
    ids = batch["gen_ids"].reshape(b * k, length)
    mask = batch["gen_mask"].reshape(b * k, length)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)  # left padding: real tokens only
    logits = forward(gen_params, gen_cfg, ids, mask, gen_lora, positions=positions,
                     dropout_rng=dropout_rng)
    prompt_len = length - t
    return logits[:, prompt_len - 1 : length - 1].reshape(b, k, t, -1)


def embeddings(enc_params: dict, enc_cfg: EncoderConfig, batch: dict, enc_lora
               ) -> tuple[jax.Array, jax.Array]:
    """Query ``[B, D]`` and passage ``[B, K, D]`` embeddings (see :func:`doc_scores`)."""
    q = encode(enc_params, enc_cfg, batch["query_ids"], batch["query_mask"], enc_lora)
    if "passage_ids" in batch:
        b, k, tp = batch["passage_ids"].shape
        p = encode(enc_params, enc_cfg, batch["passage_ids"].reshape(b * k, tp),
                   batch["passage_mask"].reshape(b * k, tp), enc_lora).reshape(b, k, -1)
    else:
        p = batch["passage_emb"]
    return q, p


def doc_scores(enc_params: dict, enc_cfg: EncoderConfig, batch: dict, enc_lora,
               scale: float) -> jax.Array:
    """``scale * q . p`` ``[B, K]``: questions embedded by the (LoRA) encoder; passages from
    ``passage_emb`` ``[B, K, D]`` or, with ``passage_ids``/``passage_mask`` ``[B, K, Tp]``,
    embedded by the same encoder. Padded passages (``passage_valid`` False) score -1e9."""
    q, p = embeddings(enc_params, enc_cfg, batch, enc_lora)
    return _mask_invalid(scale * jnp.einsum("bd,bkd->bk", q, p), batch)


def _mask_invalid(scores: jax.Array, batch: dict) -> jax.Array:
    if "passage_valid" in batch:
        scores = jnp.where(batch["passage_valid"], scores, -1e9)
    return scores


def rag_loss(trainable: dict, frozen: dict, batch: dict, rng: jax.Array | None, *,
             gen_cfg: LlamaConfig, enc_cfg: EncoderConfig, loss_cfg: RagLossConfig
             ) -> tuple[jax.Array, dict]:
    """Mean weighted loss over the batch and its parts. ``trainable`` holds the LoRAs
    ``{"generator": LoRA | None, "retriever": LoRA | None}`` (None: not trained), ``frozen``
    the base weights ``{"generator": params, "retriever": params}``."""
    if any(name == "dual_task" for name, _ in loss_cfg.weights) and "target_weight" not in batch:
        raise UserError("the dual_task loss needs the batch's target_weight [B, T] "
                        "(rag.batches.target_weights)")
    q, p = embeddings(frozen["retriever"], enc_cfg, batch, trainable.get("retriever"))
    scores = _mask_invalid(loss_cfg.score_scale * jnp.einsum("bd,bkd->bk", q, p), batch)
    logits = answer_logits(frozen["generator"], gen_cfg, batch, trainable.get("generator"),
                           dropout_rng=rng)
    targets, mask = batch["targets"], batch["answer_mask"]
    target_lp, vocab_sums = losses.answer_logprobs(logits, targets)
    parts = {}
    for name, _ in loss_cfg.weights:
        if name == "rag_sequence":
            parts[name] = losses.rag_sequence_nll(
                target_lp, scores, mask, epsilon=loss_cfg.epsilon,
                vocab_logprob_sums=vocab_sums, vocab_size=logits.shape[-1])
        elif name == "rag_token":
            parts[name] = losses.rag_token_nll(logits, scores, targets, mask,
                                               epsilon=loss_cfg.epsilon)
        elif name == "lsr":
            lm = losses.sequence_logprob(target_lp, mask,
                                         length_normalize=loss_cfg.length_normalize)
            if "passage_valid" in batch:
                lm = jnp.where(batch["passage_valid"], lm, -1e9)
            retriever = scores
            if loss_cfg.in_batch_negatives:
                # [B, B*K]: every passage of the batch; the LM weighs only the question's own
                # (the -1e9 logits are finite, so the zero-weight terms stay 0, never NaN).
                b, k = scores.shape
                own = jnp.eye(b, dtype=bool)[:, :, None].repeat(k, axis=2).reshape(b, b * k)
                retriever = loss_cfg.score_scale * q @ p.reshape(b * k, -1).T
                valid = batch.get("passage_valid", jnp.ones((b, k), bool)).reshape(1, b * k)
                retriever = jnp.where(valid, retriever, -1e9)
                lm = jnp.where(own, jnp.tile(lm, (1, b)), -1e9)
            parts[name] = losses.lsr_loss(retriever, lm, tau_r=loss_cfg.tau_r,
                                          tau_lm=loss_cfg.tau_lm,
                                          direction=loss_cfg.lsr_direction)
        elif name == "dual_task":  # RAG-sequence over the weighted answer tokens
            parts[name] = losses.rag_sequence_nll(target_lp, scores, batch["target_weight"])
        elif name == "ralt":  # generator only: each passage's prompt scored on its own
            parts[name] = losses.weighted_response_nll(target_lp, mask, mask,
                                                       batch.get("passage_valid"))
    total = sum(weight * parts[name].mean() for name, weight in loss_cfg.weights)
    metrics = {name: value.mean() for name, value in parts.items()}
    metrics["retrieval_top1_is_lm_best"] = (
        jnp.argmax(scores, -1) == jnp.argmax(losses.sequence_logprob(target_lp, mask), -1)
    ).mean()
    return total, metrics


def update(states: dict, frozen: dict, batch: dict, rng: jax.Array, *, gen_cfg: LlamaConfig,
           enc_cfg: EncoderConfig, loss_cfg: RagLossConfig, optimizers: tuple
           ) -> tuple[dict, dict]:
    """One update of both LoRAs with their own optimizers (pure; :func:`rag_step` is its
    jitted form). ``states`` ``{"generator": TrainState | None, "retriever": TrainState |
    None}``; ``optimizers`` the ``(generator, retriever)`` optax transformations (None for a
    tree not trained). Returns the new states and ``{loss, <parts>, grad_norm_<tree>}``."""
    trainable = {name: None if s is None else s.trainable for name, s in states.items()}

    def loss_fn(trees):
        return rag_loss({**trainable, **trees}, frozen, batch, rng, gen_cfg=gen_cfg,
                        enc_cfg=enc_cfg, loss_cfg=loss_cfg)

    trained = {name: t for name, t in trainable.items() if t is not None}
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained)
    new_states = dict(states)
    for name, optimizer in zip(("generator", "retriever"), optimizers, strict=True):
        if name not in trained:
            continue
        new_states[name] = apply_gradients(states[name], grads[name], optimizer)
        metrics[f"grad_norm_{name}"] = optax.global_norm(grads[name])
    return new_states, {"loss": loss, **metrics}


rag_step = jax.jit(update, static_argnames=("gen_cfg", "enc_cfg", "loss_cfg", "optimizers"),
                   donate_argnums=(0,))
rag_step.__doc__ = "The jitted :func:`update` (``states`` donated)."


def client_update(states: dict, frozen: dict, batches: dict, rngs: jax.Array, **static
                  ) -> tuple[dict, dict]:
    """A client's local training as one pure function: :func:`update` scanned over the steps
    of ``batches`` (every leaf ``[S, ...]``) with ``rngs`` ``[S]``. Returns the final states
    and the per-step metrics ``[S]``. The batches are made before the scan, so retrieval for
    all of them uses the encoder of the round's start (a stale index within the round)."""
    def step(carry, xs, i):
        batch, rng = xs
        return update(carry, frozen, batch, rng, **static)

    return scan_steps(step, states, (batches, rngs))


@functools.partial(jax.jit, static_argnames=("gen_cfg", "enc_cfg", "loss_cfg", "optimizers"))
def update_clients(states: dict, frozen: dict, batches: dict, rngs: jax.Array, **static
                   ) -> tuple[dict, dict]:
    """:func:`client_update` of ``C`` clients at once, vmapped: ``states`` leaves ``[C, ...]``
    (heterogeneous LoRA ranks zero-padded to one: padded rank components get zero gradients,
    so they stay exactly zero), ``batches`` ``[C, S, ...]``, ``rngs`` ``[C, S]``; ``frozen``
    is shared. Returns ``([C, ...] states, [C, S] metrics)``."""
    return jax.vmap(lambda st, b, r: client_update(st, frozen, b, r, **static),
                    spmd_axis_name=client_axis())(states, batches, rngs)
