"""One federated round as one jitted pure function: vmapped client updates, server checks and
aggregation, for every strategy.

The server state is a dict of fixed-shape pytrees, so a round compiles once and an orbax
checkpoint restores into the same structure:

* ``params``: the base weights. ``stack`` merges each round's stacked adapter into them.
* ``global``: ``fedavg``/``zeropad``: the carried global adapter (rank ``R``, the largest
  client rank). ``ff``: the global stacked adapter of the last round, ``[..., K*R]`` (``K``
  clients per round, each padded to ``R``; padding columns are exactly zero, so the product is
  FLoRA's ``sum_k p_k s a_k b_k``). Absent for ``stack``.
* ``personal``: ``ff`` only: every client's personal adapter, ``[N, ..., R]``.

A client update that is not finite is rejected: its weight becomes 0 (its values are masked
out before any arithmetic, since ``0 * NaN`` is NaN), the round goes on without it, and if no
client is accepted the state is left as it was.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import traverse_util

from ffrag_jax import federated, lora
from ffrag_jax.lora import LoRA, module_weights

STRATEGIES = ("stack", "fedavg", "zeropad", "ff")


def stack_padded(clients: LoRA, weights: jax.Array) -> LoRA:
    """FLoRA stacking of ``K`` clients padded to one rank ``R`` (leaves ``[K, ..., R]``):
    ``a = [w_1 s a_1 | ... | w_K s a_K]`` ``[..., in, K*R]``, ``b`` ``[..., K*R, out]``; scale 1.
    Exact: ``a @ b = sum_k w_k s a_k b_k`` (the zero padding adds nothing)."""
    out = {}
    for path, ab in module_weights(clients.weights).items():
        a = ab["a"] * (weights * clients.scale).reshape((-1,) + (1,) * (ab["a"].ndim - 1))
        a = jnp.moveaxis(a, 0, -2)  # [..., in, K, R]
        b = jnp.moveaxis(ab["b"], 0, -3)  # [..., K, R, out]
        out[path + ("a",)] = a.reshape(a.shape[:-2] + (-1,))
        out[path + ("b",)] = b.reshape(b.shape[:-3] + (-1, b.shape[-1]))
    return clients.replace(weights=traverse_util.unflatten_dict(out), scale=1.0)


def weighted_mean(clients: LoRA, weights: jax.Array) -> LoRA:
    """``sum_k w_k x_k`` leaf by leaf (FedIT's average of ``a`` and of ``b``)."""
    return jax.tree.map(lambda x: jnp.tensordot(weights, x, axes=1), clients)


def _select(flag, new, old):
    return jax.tree.map(lambda n, o: jnp.where(flag, n, o), new, old)


def client_start(server: dict, selected: jax.Array, fresh: LoRA | None, strategy: str) -> LoRA:
    """Each selected client's starting adapter ``[K, ...]`` (padded to ``R``)."""
    if strategy == "stack":
        return fresh  # a fresh adapter every round
    if strategy in ("fedavg", "zeropad"):  # the global adapter (zeropad: truncated by mask)
        count = selected.shape[0]
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (count,) + x.shape), server["global"])
    return jax.tree.map(lambda x: x[selected], server["personal"])


def round_params(server: dict, strategy: str, fusion: str) -> tuple[dict, LoRA | None]:
    """``(params, chain_global)`` the clients train on. ``ff`` with additive fusion merges the
    frozen global adapter into the base once (``W + s_g b_g a_g``), shared by all clients."""
    if strategy == "ff" and fusion == "add":
        return lora.merge(server["params"], server["global"]), None
    if strategy == "ff":
        return server["params"], server["global"]
    return server["params"], None  # fedavg/zeropad: the carried adapter is the trainable start


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
    strategy: str,
    fusion: str = "add",
) -> tuple[dict, LoRA, dict]:
    """One round. ``selected`` ``[K]`` client ids, ``weights`` ``[K]`` their ``p_k`` (0 for
    clients without data), ``masks`` ``[K, R]`` rank masks, ``batches`` ``[K, S, A, B, T]``,
    ``rngs`` ``[K]``, ``num_steps`` ``[K]``; ``fresh`` ``[K, ...]`` new adapters (``stack``
    only; None otherwise). Returns ``(server, client adapters [K], info)`` where ``info`` has
    ``accepted`` ``[K]`` and the per-step client metrics ``[K, S]``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    start = client_start(server, selected, fresh, strategy)
    params, chain_global = round_params(server, strategy, fusion)
    updated, metrics = federated.update_clients(
        start, masks, params, batches, rngs, cfg=cfg, optimizer=optimizer,
        num_steps=num_steps, chain_global=chain_global)
    accepted = federated.finite_clients(updated) & (weights > 0)
    # Rejected clients are zeroed, not multiplied by 0 (NaN * 0 is NaN).
    safe = jax.tree.map(
        lambda x: jnp.where(accepted.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0.0), updated)
    total = jnp.sum(jnp.where(accepted, weights, 0.0))
    any_accepted = total > 0
    w = jnp.where(accepted, weights, 0.0) / jnp.where(any_accepted, total, 1.0)

    new = dict(server)
    if strategy == "stack":
        new["params"] = lora.merge(server["params"], stack_padded(safe, w))
    elif strategy in ("fedavg", "zeropad"):
        new["global"] = weighted_mean(safe, w)
    else:
        new["personal"] = jax.tree.map(
            lambda every, upd: every.at[selected].set(
                jnp.where(accepted.reshape((-1,) + (1,) * (upd.ndim - 1)), upd, every[selected])),
            server["personal"], updated)
        new["global"] = stack_padded(safe, w)
    new = _select(any_accepted, new, server)
    return new, updated, {"accepted": accepted, **metrics}
