"""Causal-LM training: loss, optimizer and one jitted step over a trainable pytree.

The step is generic over what is trained: ``mode='lora'`` trains a
:class:`~ffrag_jax.models.lora.LoRA`
with the base params frozen (only the LoRA tree gets gradients and optimizer state);
``mode='full'`` trains the params themselves. Gradient accumulation is a ``lax.scan`` over
micro-batches inside the one jitted call, and the loss is the token-weighted mean over the
whole effective batch (not a mean of micro-batch means, which over-weights short batches).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from ffrag_jax.errors import UserError
from ffrag_jax.models import lora as lora_lib
from ffrag_jax.models.llama import LlamaConfig, forward, lm_head_kernel
from ffrag_jax.models.lm_head import linear_cross_entropy
from ffrag_jax.training import sharding

Batch = dict[str, jax.Array]
MODES = ("lora", "lora_chain", "full")


@struct.dataclass
class TrainState:
    step: jax.Array
    trainable: Any  # a LoRA (mode='lora') or the params (mode='full')
    opt_state: Any


def warmup_linear_decay(lr: float, total_steps, warmup_steps: int = 0) -> optax.Schedule:
    """0 -> ``lr`` over ``warmup_steps``, then linear decay to 0 at ``total_steps``.

    ``total_steps`` may be a traced value (each client of a vmapped round decays over its own
    number of steps)."""
    decay_steps = jnp.maximum(jnp.asarray(total_steps) - warmup_steps, 1)

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        decay = lr * jnp.clip(1.0 - (count - warmup_steps) / decay_steps, 0.0, 1.0)
        if warmup_steps <= 0:
            return decay
        return jnp.where(count < warmup_steps, lr * count / warmup_steps, decay)

    return schedule


def _decay_mask(tree):
    """Weight decay on matrices only, never on norm scales or biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: sharding.path_str(path).rsplit("/", 1)[-1] not in ("scale", "bias"), tree
    )


def make_optimizer(
    lr: float,
    total_steps: int,
    *,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """AdamW with warmup + linear decay and global-norm clipping, as one optax chain."""
    schedule = warmup_linear_decay(lr, total_steps, warmup_steps)
    parts = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm > 0 else []
    parts.append(optax.adamw(schedule, b1, b2, eps, weight_decay=weight_decay, mask=_decay_mask))
    return optax.chain(*parts)


def causal_lm_loss(
    params: dict,
    cfg: LlamaConfig,
    batch: Batch,
    lora=None,
    dropout_rng: jax.Array | None = None,
    *,
    chunked_head: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Summed next-token NLL and the number of scored tokens.

    ``batch``: ``input_ids`` ``[B, T]``, ``attention_mask`` ``[B, T]`` and ``loss_mask``
    ``[B, T]``; token ``t`` is scored (predicted from ``< t``) where ``loss_mask[t]`` and
    ``attention_mask[t]`` are 1. A ``loss_mask`` that is 1 on the answer only gives
    response-only training.

    ``chunked_head=True`` computes the LM head and the loss in token chunks with
    :func:`~ffrag_jax.models.lm_head.linear_cross_entropy`, never holding the ``[B, T, vocab]``
    logits (the same loss and gradients to float rounding). :func:`train_step` uses it, since
    its forward forms the gradient as well; a loss alone (evaluation) is cheaper plain.
    """
    if chunked_head:
        hidden = forward(params, cfg, batch["input_ids"], batch["attention_mask"], lora,
                         dropout_rng=dropout_rng, return_hidden=True)
        # Position t is scored against token t + 1: the targets are shifted (not the logits,
        # which are never formed), and the last position gets weight 0.
        targets = jnp.roll(batch["input_ids"], -1, axis=1)
        scored = batch["loss_mask"] * batch["attention_mask"]
        weights = jnp.roll(scored, -1, axis=1).at[:, -1].set(0).astype(jnp.float32)
        nll_sum = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]),
                                       lm_head_kernel(params, cfg), targets.reshape(-1),
                                       weights.reshape(-1))
        return nll_sum, jnp.sum(weights)
    logits = forward(params, cfg, batch["input_ids"], batch["attention_mask"], lora,
                     dropout_rng=dropout_rng)
    targets = batch["input_ids"][:, 1:]
    weights = (batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]).astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], targets)
    return jnp.sum(nll * weights), jnp.sum(weights)


def split_trainable(trainable, frozen, mode: str):
    """``(params, lora)`` for :func:`causal_lm_loss` from the trained and frozen trees."""
    if mode == "lora":
        return frozen, trainable
    if mode == "lora_chain":  # frozen = (params, global adapter): FF-LoRA chain fusion
        params, outer = frozen
        return params, lora_lib.chain(outer, trainable)
    if mode == "full":
        return trainable, None
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def init_train_state(trainable, optimizer: optax.GradientTransformation) -> TrainState:
    """A step-0 state. ``trainable`` is copied: the jitted step donates the state, and the
    caller's arrays (say, the adapter they started from) must survive that."""
    trainable = jax.tree.map(jnp.copy, trainable)
    return TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable))


def train_step(
    state: TrainState,
    frozen,
    batch: Batch,
    rng: jax.Array,
    *,
    cfg: LlamaConfig,
    optimizer: optax.GradientTransformation,
    mode: str = "lora",
    use_dropout: bool = True,
    chunked_head: bool = True,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on an effective batch of ``A`` micro-batches.

    ``batch`` leaves are ``[A, micro_B, T]``; gradients are summed over the micro-batches and
    divided by the total number of scored tokens. ``frozen`` is the base params in LoRA mode,
    None in full mode. ``chunked_head``: the LM head and loss in token chunks (see
    :func:`causal_lm_loss`). Returns the new state and ``{loss, grad_norm, tokens}``.
    """

    def loss_fn(trainable, micro, key):
        params, lora = split_trainable(trainable, frozen, mode)
        return causal_lm_loss(params, cfg, micro, lora, key if use_dropout else None,
                              chunked_head=chunked_head)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulate(carry, xs):
        grads_sum, loss_sum, count = carry
        micro, i = xs
        (loss, n), grads = grad_fn(state.trainable, micro, jax.random.fold_in(rng, i))
        grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
        return (grads_sum, loss_sum + loss, count + n), None

    num_micro = batch["input_ids"].shape[0]
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), state.trainable)
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    (grads, loss_sum, count), _ = jax.lax.scan(accumulate, init, (batch, jnp.arange(num_micro)))
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.trainable)
    metrics = {"loss": loss_sum / denom, "grad_norm": optax.global_norm(grads), "tokens": count}
    return apply_gradients(state, grads, optimizer), metrics


def apply_gradients(state: TrainState, grads, optimizer: optax.GradientTransformation
                    ) -> TrainState:
    """The one optimizer-update path of every step (the LM, RAG and contrastive steps): the
    optimizer's update of ``state.trainable`` for ``grads``, applied, and the step counted."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    return TrainState(state.step + 1, optax.apply_updates(state.trainable, updates), opt_state)


def scan_steps(step_fn, state, xs, num_steps: jax.Array | int | None = None):
    """A client's local training as one ``lax.scan`` (the one client update of every federated
    job; ``jax.vmap`` of it trains a batch of clients in one program).

    ``state, metrics = step_fn(state, x, i)`` for step ``i`` with ``x`` the ``i``-th slice of
    ``xs`` (every leaf ``[S, ...]``). With ``num_steps``, steps from ``num_steps`` on leave the
    state as it was (a client with less data shares the vmap) and the metrics get ``active``.
    Returns the final state and the per-step metrics ``[S]``."""
    total = jax.tree.leaves(xs)[0].shape[0]

    def body(state, x_i):
        x, i = x_i
        new, metrics = step_fn(state, x, i)
        if num_steps is None:
            return new, metrics
        active = i < num_steps
        state = jax.tree.map(lambda n, o: jnp.where(active, n, o), new, state)
        return state, {**metrics, "active": active}

    return jax.lax.scan(body, state, (xs, jnp.arange(total)))


def jit_train_step(
    cfg: LlamaConfig,
    optimizer: optax.GradientTransformation,
    mode: str,
    mesh: jax.sharding.Mesh,
    state: TrainState,
    frozen=None,
    use_dropout: bool = True,
):
    """:func:`train_step` jitted with explicit shardings on ``mesh`` for ``state``'s layout.

    The state is donated, so the caller must use the returned state.
    """
    state_sh = sharding.tree_shardings(state, mesh)
    frozen_sh = None if frozen is None else sharding.tree_shardings(frozen, mesh)
    batch_sh = sharding.batch_sharding(mesh, 3, batch_dim=1)
    step = functools.partial(
        train_step, cfg=cfg, optimizer=optimizer, mode=mode, use_dropout=use_dropout
    )
    jitted = jax.jit(
        step,
        in_shardings=(state_sh, frozen_sh, batch_sh, sharding.replicated(mesh)),
        out_shardings=(state_sh, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )

    @functools.wraps(jitted)
    def checked(state, frozen, batch, rng):
        check_batch(batch)
        return jitted(state, frozen, batch, rng)

    checked.lower = jitted.lower  # ahead-of-time compilation, as on any jitted function
    return checked


BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask")


def check_batch(batch) -> None:
    """A UserError for a batch that is not ``{input_ids, attention_mask, loss_mask}`` of
    ``[accum, B, T]`` (what :func:`ffrag_jax.data.text.batch_at` returns): otherwise a missing
    key is
    a bare KeyError and a ``[B, T]`` batch a sharding error deep inside jit."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise UserError(f"the batch lacks {', '.join(map(repr, missing))} (it has "
                        f"{sorted(batch)}); a training batch is {{input_ids, attention_mask, "
                        "loss_mask}, each [accum, B, T]: build it with text.batch_at")
    shapes = {k: tuple(batch[k].shape) for k in BATCH_KEYS}
    if len(set(shapes.values())) != 1 or len(shapes["input_ids"]) != 3:
        raise UserError(f"batch shapes {shapes}: a training step takes [accum, B, T] leaves "
                        "(a [B, T] batch is one micro-batch: batch[None] or text.batch_at)")


def eval_loss(params: dict, cfg: LlamaConfig, batch: Batch, lora=None) -> jax.Array:
    """Mean next-token NLL over the scored tokens of ``batch`` (``[B, T]`` leaves)."""
    total, count = causal_lm_loss(params, cfg, batch, lora)
    return total / jnp.maximum(count, 1.0)
