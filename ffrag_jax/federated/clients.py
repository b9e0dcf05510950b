"""The client side of a federated round as pure functions: which clients take part
(:func:`select_clients`), their weights (:func:`client_weights`), and local LoRA training of
the language model (:func:`client_update`, vmapped over clients by :func:`update_clients`).

Clients train in one program: the frozen base is shared, and only the small per-client LoRA
state is per client. Heterogeneous ranks share the vmap by zero-padding to the largest rank
with a rank mask that keeps the padded rows and columns exactly zero. Clients with fewer local
steps than the round's longest run padded steps that change nothing, and each builds its
optimizer for its own step count (its learning rate decays to 0 over its own steps, as in the
reference).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from ffrag_jax.errors import UserError
from ffrag_jax.federated.aggregation import apply_rank_mask
from ffrag_jax.models.llama import LlamaConfig
from ffrag_jax.models.lora import LoRA
from ffrag_jax.models.partitioning import client_axis
from ffrag_jax.training import train


def select_clients(round_index: int, num_clients: int, fraction: float) -> list[int]:
    """``max(int(fraction * N), 1)`` distinct clients, seeded by the round index.

    This matches the reference code, which calls ``np.random.seed(round)`` and then
    ``np.random.choice(N, m, replace=False)``.
    """
    if num_clients <= 0:
        raise UserError(f"num_clients must be positive, got {num_clients}")
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"client fraction must be in (0, 1], got {fraction}")
    count = max(int(fraction * num_clients), 1)
    chosen = np.random.RandomState(round_index).choice(np.arange(num_clients), count, replace=False)
    return sorted(int(c) for c in chosen)


def client_weights(num_examples: Sequence[int]) -> np.ndarray:
    """``p_k = n_k / sum(n)`` (float64). A client with no examples gets weight 0, with a
    warning; if no client has any, it is an error."""
    n = np.asarray(num_examples, dtype=np.float64)
    if np.any(n < 0):
        raise UserError(f"negative example counts: {num_examples}")
    for k in np.flatnonzero(n == 0):
        logging.warning("client %d has no training examples: weight 0, skipped", k)
    if n.sum() == 0:
        raise UserError("no selected client has any training examples")
    return n / n.sum()



OptimizerOrFactory = optax.GradientTransformation | Callable[[jax.Array],
                                                             optax.GradientTransformation]


def client_update(
    lo: LoRA,
    mask: jax.Array,
    params: dict,
    batches: train.Batch,
    rng: jax.Array,
    *,
    cfg: LlamaConfig,
    optimizer: OptimizerOrFactory,
    num_steps: jax.Array | int | None = None,
    chain_global: LoRA | None = None,
) -> tuple[LoRA, dict[str, jax.Array]]:
    """One client's local training: ``num_steps`` optimizer steps from a fresh optimizer state.

    ``lo`` is the client's adapter padded to the round's largest rank, ``mask`` ``[r]`` its
    :func:`rank_mask`, ``batches`` leaves ``[S, A, micro_B, T]`` (``S`` steps of ``A``
    micro-batches). Steps from ``num_steps`` (default ``S``) on are skipped, so clients with
    different amounts of data share one vmap. ``optimizer`` is an optax transformation or a
    function of the (traced) step count that builds one, for schedules over the client's own
    steps. With ``chain_global``, the forward uses ``fuse(chain_global, lo, "chain")`` (FF-LoRA
    chain fusion; the global adapter is frozen). Returns the trained adapter (padding still
    exactly zero) and per-step metrics ``[S]`` (``active`` marks the steps that ran).
    """
    max_steps = batches["input_ids"].shape[0]
    num_steps = max_steps if num_steps is None else num_steps
    if not isinstance(optimizer, optax.GradientTransformation):
        optimizer = optimizer(num_steps)
    state = train.init_train_state(apply_rank_mask(lo, mask), optimizer)
    if chain_global is None:
        mode, frozen = "lora", params
    else:
        mode, frozen = "lora_chain", (params, chain_global)

    def step(state, batch, i):
        new, metrics = train.train_step(state, frozen, batch, jax.random.fold_in(rng, i),
                                        cfg=cfg, optimizer=optimizer, mode=mode)
        return new.replace(trainable=apply_rank_mask(new.trainable, mask)), metrics

    state, metrics = train.scan_steps(step, state, batches, num_steps)
    return state.trainable, metrics


def update_clients(
    loras: LoRA,
    masks: jax.Array,
    params: dict,
    batches: train.Batch,
    rngs: jax.Array,
    *,
    cfg: LlamaConfig,
    optimizer: OptimizerOrFactory,
    num_steps: jax.Array | None = None,
    chain_global: LoRA | None = None,
) -> tuple[LoRA, dict[str, jax.Array]]:
    """:func:`client_update` for ``K`` clients at once (``jax.vmap`` over the client axis).

    ``loras`` (from :func:`stack_clients`), ``masks`` ``[K, r]``, ``batches`` ``[K, S, A, B, T]``,
    ``rngs`` ``[K]`` and ``num_steps`` ``[K]`` (default: all ``S``) carry the client axis;
    ``params`` and ``chain_global`` are shared. Under ``jax.jit`` with the client axis sharded
    over the mesh's ``clients`` axis, each device trains its clients.
    """
    if num_steps is None:
        num_steps = jnp.full((masks.shape[0],), batches["input_ids"].shape[1], jnp.int32)

    def one_client(lo, mask, client_batches, rng, steps):
        return client_update(lo, mask, params, client_batches, rng, cfg=cfg, optimizer=optimizer,
                             num_steps=steps, chain_global=chain_global)

    return jax.vmap(one_client, spmd_axis_name=client_axis())(loras, masks, batches, rngs,
                                                             num_steps)
