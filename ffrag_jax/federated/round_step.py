"""One federated round of the language-model job as one jitted pure function: vmapped client
updates (:func:`~ffrag_jax.federated.clients.update_clients`), server checks, and the
strategy's aggregation (:mod:`ffrag_jax.federated.strategies`).

A client update that is not finite is rejected: its weight becomes 0 (its values are zeroed
before any arithmetic, since ``0 * NaN`` is NaN), the round goes on without it, and if no
client is accepted the state is left as it was.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ffrag_jax.federated import privacy, strategies
from ffrag_jax.federated.aggregation import finite_clients, zero_rejected
from ffrag_jax.federated.clients import update_clients
from ffrag_jax.models.lora import LoRA


def accept(updated: LoRA, weights: jax.Array) -> tuple[LoRA, jax.Array, jax.Array]:
    """The server's check of a round's client updates ``[K, ...]`` with weights ``[K]``:
    ``(updates with the rejected zeroed, normalised weights [K] (0 for the rejected),
    accepted [K])``. A client is rejected when its update is not finite or its weight is 0."""
    accepted = finite_clients(updated) & (weights > 0)
    total = jnp.sum(jnp.where(accepted, weights, 0.0))
    w = jnp.where(accepted, weights, 0.0) / jnp.where(total > 0, total, 1.0)
    return zero_rejected(updated, accepted), w, accepted


def train_clients(
    server: dict,
    fresh: LoRA | None,
    selected: jax.Array,
    masks: jax.Array,
    batches: dict,
    rngs: jax.Array,
    num_steps: jax.Array,
    *,
    cfg,
    optimizer,
    strategy: strategies.Strategy,
    fusion: str | None = None,
    dp: privacy.ClientDP | None = None,
) -> tuple[LoRA, dict]:
    """The clients' half of a round: each selected client's start
    (:meth:`~strategies.Strategy.client_start`) trained on its batches. Arguments as
    :func:`run_round`; ``server`` may be a client's own view of the server state (the Flower
    engine: one row, ``selected = [0]``). With ``dp``, each client's update is clipped and
    noised before it leaves (:mod:`~ffrag_jax.federated.privacy`). Returns ``(client
    adapters [K], per-step metrics [K, S])``."""
    optimizer = strategy.client_optimizer(optimizer)
    start = strategy.client_start(server, selected, fresh)
    params, chain_global = strategy.round_params(server, fusion or strategy.fusion)
    updated, metrics = update_clients(start, masks, params, batches, rngs, cfg=cfg,
                                      optimizer=optimizer, num_steps=num_steps,
                                      chain_global=chain_global)
    if dp is not None:
        noise_rngs = jax.vmap(lambda r: jax.random.fold_in(r, 7919))(rngs)
        updated = privacy.privatise(updated, start, masks, noise_rngs, dp)
    return updated, metrics


def aggregate_clients(server: dict, updated: LoRA, selected: jax.Array, weights: jax.Array, *,
                      strategy: strategies.Strategy) -> tuple[dict, jax.Array]:
    """The server's half of a round: :func:`accept` the client adapters ``updated``
    ``[K, ...]``, then the strategy's update; the state is left as it was when no client is
    accepted. Returns ``(server, accepted [K])``."""
    safe, w, accepted = accept(updated, weights)
    new = strategy.server_update(server, safe, w, accepted, selected)
    any_accepted = jnp.any(accepted)
    new = jax.tree.map(lambda n, o: jnp.where(any_accepted, n, o), new, server)
    return new, accepted


def run_round(
    server: dict,
    fresh: LoRA | None,
    selected: jax.Array,
    weights: jax.Array,
    masks: jax.Array,
    batches: dict,
    rngs: jax.Array,
    num_steps: jax.Array,
    *,
    cfg,
    optimizer,
    strategy: strategies.Strategy | str,
    fusion: str | None = None,
    dp: privacy.ClientDP | None = None,
) -> tuple[dict, LoRA, dict]:
    """One round. ``selected`` ``[K]`` client ids, ``weights`` ``[K]`` their ``p_k`` (0 for
    clients without data), ``masks`` ``[K, R]`` rank masks, ``batches`` ``[K, S, A, B, T]``,
    ``rngs`` ``[K]``, ``num_steps`` ``[K]``; ``fresh`` ``[K, ...]`` new adapters (strategies
    that start from them; None otherwise). ``strategy`` a :class:`strategies.Strategy` (or its
    name); ``fusion`` how clients see the global adapter this round (default: the
    strategy's); ``dp`` clients' differential privacy (None: off). Returns ``(server, client
    adapters [K], info)`` where ``info`` has
    ``accepted`` ``[K]`` and the per-step client metrics ``[K, S]``."""
    if isinstance(strategy, str):
        strategy = strategies.get(strategy)
    updated, metrics = train_clients(server, fresh, selected, masks, batches, rngs, num_steps,
                                     cfg=cfg, optimizer=optimizer, strategy=strategy,
                                     fusion=fusion, dp=dp)
    new, accepted = aggregate_clients(server, updated, selected, weights, strategy=strategy)
    return new, updated, {"accepted": accepted, **metrics}
