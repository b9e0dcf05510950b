"""The reranker's training step, a pure function of pytrees: the cross-encoder scores every
candidate of ``B`` questions (``[B, K]``), the three objectives of :mod:`.losses` are computed,
and they are combined with fixed weights or by MGDA (:mod:`.mgda`: the per-task gradients'
min-norm combination, recomputed every step).

``batch``: ``input_ids``/``attention_mask``/``token_type_ids`` ``[B, K, T]``
(:func:`~ffrag_jax.rerank.cross_encoder.tokenize_pairs`), ``labels`` ``[B, K]`` (1 aligned, 0
not) and ``valid`` ``[B, K]``; optional ``prior`` ``[B, K]``: added to the scores (a residual
reranker, :func:`~ffrag_jax.rerank.cross_encoder.retriever_prior`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ffrag_jax.errors import UserError
from ffrag_jax.models.bert import EncoderConfig
from ffrag_jax.rerank import losses, mgda
from ffrag_jax.rerank.cross_encoder import scores
from ffrag_jax.training.train import apply_gradients, scan_steps

COMBINE = ("mgda", "fixed")


@dataclasses.dataclass(frozen=True)
class RerankLossConfig:
    """Static settings (hashable): the tasks' weights (``fixed``; with ``mgda`` a weight of 0
    leaves a task out), how they are combined, the contrastive temperature."""

    weights: tuple[tuple[str, float], ...] = (("pointwise", 1.0), ("pairwise", 1.0),
                                              ("contrastive", 1.0))
    combine: str = "mgda"
    temperature: float = 1.0

    def __post_init__(self):
        unknown = [name for name, _ in self.weights if name not in losses.TASKS]
        if unknown:
            raise UserError(f"unknown reranker loss {unknown[0]!r}; losses: "
                            f"{', '.join(losses.TASKS)}")
        if self.combine not in COMBINE:
            raise UserError(f"reranker loss combination {self.combine!r}; choose "
                            f"{' or '.join(COMBINE)}")
        if not any(w > 0 for _, w in self.weights):
            raise UserError("the reranker needs a loss with a positive weight")

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(name for name, w in self.weights if w > 0)

    @property
    def fixed(self) -> jax.Array:
        return jnp.asarray([w for _, w in self.weights if w > 0], jnp.float32)


def task_losses(trainable: dict, frozen: dict, batch: dict, rng, *, cfg: EncoderConfig,
                loss_cfg: RerankLossConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(losses [n tasks], active [n tasks], scores [B, K])`` of the reranker
    ``frozen["params"]`` with its adapter ``trainable["lora"]`` (or full weights
    ``trainable["params"]``); ``active``: the task has a question to learn from."""
    params = trainable.get("params", frozen.get("params"))
    s = scores(params, cfg, batch, trainable.get("lora"), dropout_rng=rng)
    if "prior" in batch:
        s = s + batch["prior"]
    all_losses, active = losses.task_losses(s, batch["labels"], batch["valid"],
                                            temperature=loss_cfg.temperature)
    keep = jnp.asarray([losses.TASKS.index(t) for t in loss_cfg.tasks])
    return all_losses[keep], active[keep], s


def update(state, frozen: dict, batch: dict, rng, *, cfg: EncoderConfig,
           loss_cfg: RerankLossConfig, optimizer) -> tuple[object, dict]:
    """One optimizer step of the reranker's trainable tree; metrics: every task's loss, the
    combined loss, the task weights used and top-1 accuracy (the best-scored valid candidate
    is aligned) of the questions with an aligned candidate."""
    def vector(trainable):
        out, active, s = task_losses(trainable, frozen, batch, rng, cfg=cfg,
                                     loss_cfg=loss_cfg)
        return out, (out, active, s)

    if loss_cfg.combine == "fixed" or len(loss_cfg.tasks) == 1:
        weights = loss_cfg.fixed

        def total(trainable):
            out, aux = vector(trainable)
            return weights @ out, aux

        (_, (task, _, s)), grads = jax.value_and_grad(total, has_aux=True)(state.trainable)
    else:
        # Per-task gradients in one reverse pass per task (jacrev of the loss vector); a task
        # with nothing to learn from in this batch (no pair, no positive) is left out.
        jac, (task, active, s) = jax.jacrev(vector, has_aux=True)(state.trainable)
        weights = jax.lax.stop_gradient(mgda.frank_wolfe(mgda.gram(jac), active=active))
        grads = mgda.combine(jac, weights)
    new_state = apply_gradients(state, grads, optimizer)
    valid, labels = batch["valid"], batch["labels"]
    best = jnp.argmax(jnp.where(valid, s, -jnp.inf), axis=-1)
    has_pos = ((labels > 0) & valid).any(-1)
    top1 = jnp.take_along_axis(labels, best[:, None], axis=-1)[:, 0] > 0
    metrics = {"loss": weights @ task,
               "top1_aligned": losses.batch_mean(top1.astype(jnp.float32), has_pos)}
    for i, name in enumerate(loss_cfg.tasks):
        metrics[name] = task[i]
        metrics[f"weight_{name}"] = weights[i]
    return new_state, metrics


rerank_step = jax.jit(update, static_argnames=("cfg", "loss_cfg", "optimizer"),
                      donate_argnums=(0,))
rerank_step.__doc__ = "The jitted :func:`update` (``state`` donated)."


def client_update(state, frozen: dict, batches: dict, rngs, **static):
    """:func:`update` scanned over ``batches`` (leaves ``[S, ...]``) with ``rngs`` ``[S]``."""
    def step(carry, xs, i):
        batch, rng = xs
        return update(carry, frozen, batch, rng, **static)

    return scan_steps(step, state, (batches, rngs))


@functools.partial(jax.jit, static_argnames=("cfg", "loss_cfg", "optimizer"))
def update_clients(states, frozen: dict, batches: dict, rngs, **static):
    """:func:`client_update` of ``C`` clients, vmapped (leaves ``[C, ...]``)."""
    from ffrag_jax.models.partitioning import client_axis

    return jax.vmap(lambda st, b, r: client_update(st, frozen, b, r, **static),
                    spmd_axis_name=client_axis())(states, batches, rngs)
