"""Server-side federated LoRA: client selection, weights and aggregation as pure functions.

Every function takes and returns :class:`~ffrag_jax.lora.LoRA` pytrees (``a`` ``[..., in, r]``,
``b`` ``[..., r, out]``), so they compose with ``jax.jit`` and run on whatever devices hold the
adapters.

* :func:`stack`: FLoRA's exact aggregation. The stacked adapter's product equals the weighted
  sum of the clients' products, ``sum_k p_k s_k a_k b_k``, for any mix of ranks and scales.
* :func:`fedavg`: FedIT's average of ``a`` and ``b`` separately (same ranks only). This is not
  the average of the products.
* :func:`zeropad`: the HetLoRA-style baseline that zero-pads every client to the largest rank,
  then averages ``a`` and ``b`` separately.
* :func:`fuse`: FF-LoRA's additive fusion of the global and a personal adapter,
  ``s_g b_g a_g + s_k b_k a_k``, again as one exact stacked adapter.

Clients train in one program: :func:`client_update` is one client's local training (a fresh
optimizer, ``S`` steps in a ``lax.scan``), and :func:`update_clients` vmaps it over the client
axis. The frozen base is shared, and only the small per-client LoRA state is per client.
Heterogeneous ranks share the vmap by zero-padding to the largest rank with a rank mask that
keeps the padded rows and columns exactly zero.

Clients with fewer local steps than the round's longest run padded steps that change nothing,
and each builds its optimizer for its own step count (its learning rate decays to 0 over its
own steps, as in the reference). The round loop, with data, checkpoints and evaluation, is in
:mod:`ffrag_jax.fl`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import traverse_util

from ffrag_jax import train
from ffrag_jax.errors import UserError
from ffrag_jax.lora import LoRA, chain, module_weights
from ffrag_jax.models.llama import LlamaConfig


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


def _check_same_modules(loras: Sequence[LoRA]) -> list[tuple[str, ...]]:
    if not loras:
        raise UserError("no client adapters to aggregate")
    paths = sorted(module_weights(loras[0].weights))
    for i, lo in enumerate(loras[1:], 1):
        if sorted(module_weights(lo.weights)) != paths:
            raise UserError(f"client adapter {i} targets other modules than client 0")
    return paths


def _unflatten(flat: dict[tuple[str, ...], dict]) -> dict:
    return traverse_util.unflatten_dict(
        {path + (leaf,): value for path, ab in flat.items() for leaf, value in ab.items()}
    )


def stack(loras: Sequence[LoRA], weights: Sequence[float]) -> LoRA:
    """FLoRA stacking: ``a = [p_1 s_1 a_1 | ... | p_K s_K a_K]`` along the rank axis and
    ``b = [b_1; ...; b_K]``, so ``a @ b = sum_k p_k s_k a_k b_k`` exactly.

    Each client's scale is folded into its ``a`` and the result has scale 1 and rank
    ``sum_k r_k``. Clients with weight 0 are left out.
    """
    paths = _check_same_modules(loras)
    if len(weights) != len(loras):
        raise UserError(f"{len(weights)} weights for {len(loras)} client adapters")
    kept = [(lo, float(w)) for lo, w in zip(loras, weights, strict=True) if w != 0]
    if not kept:
        raise UserError("every client weight is 0")
    modules = [module_weights(lo.weights) for lo, _ in kept]
    out = {}
    for path in paths:
        a = jnp.concatenate(
            [m[path]["a"] * (w * lo.scale) for m, (lo, w) in zip(modules, kept, strict=True)],
            axis=-1,
        )
        b = jnp.concatenate([m[path]["b"] for m in modules], axis=-2)
        out[path] = {"a": a, "b": b}
    return LoRA(_unflatten(out), scale=1.0, dropout=kept[0][0].dropout)


def _same_scale(loras: Sequence[LoRA], what: str) -> float:
    scales = {lo.scale for lo in loras}
    if len(scales) != 1:
        raise UserError(f"{what} needs one LoRA scale for all clients, got {sorted(scales)}")
    return scales.pop()


def fedavg(loras: Sequence[LoRA], weights: Sequence[float]) -> LoRA:
    """FedIT: ``a = sum_k p_k a_k`` and ``b = sum_k p_k b_k``. All clients must have the same
    ranks and scale."""
    _check_same_modules(loras)
    scale = _same_scale(loras, "fedavg")
    shapes = {tuple(x.shape for x in jax.tree.leaves(lo.weights)) for lo in loras}
    if len(shapes) != 1:
        raise UserError("fedavg needs equal ranks for all clients; use 'stack' or 'zeropad'")
    w = [float(x) for x in weights]
    weights_tree = jax.tree.map(
        lambda *leaves: sum(wk * leaf for wk, leaf in zip(w, leaves, strict=True)),
        *[lo.weights for lo in loras],
    )
    return LoRA(weights_tree, scale=scale, dropout=loras[0].dropout)


def zeropad(loras: Sequence[LoRA], weights: Sequence[float]) -> LoRA:
    """Pad every client to the largest rank with zeros, then :func:`fedavg`."""
    _check_same_modules(loras)
    _same_scale(loras, "zeropad")
    max_rank = max(r for lo in loras for r in lo.ranks.values())
    return fedavg([pad_rank(lo, max_rank) for lo in loras], weights)


def fuse(global_lora: LoRA, personal: LoRA, fusion: str = "add") -> LoRA:
    """FF-LoRA fusion of the global and a personal adapter, as one exact adapter.

    ``"add"`` (default): ``W + s_g a_g b_g + s_k a_k b_k`` (a stacked adapter).
    ``"chain"``: the reference's literal variant, ``W + s_k s_g (a_k b_k)(a_g b_g)``: the
    personal adapter's output goes through the global one (in PyTorch's layout
    ``delta = s D C B_k A_k`` with ``C = A_glob``, ``D = B_glob``). Only defined where a module's
    input and output widths are equal; the result has the personal adapter's rank.
    """
    if fusion == "add":
        return stack([global_lora, personal], [1.0, 1.0])
    if fusion != "chain":
        raise UserError(f"fusion must be 'add' or 'chain', got {fusion!r}")
    _check_same_modules([global_lora, personal])
    return chain(global_lora, personal)


def finite_clients(loras: LoRA) -> jax.Array:
    """``[K]`` bool: whether every weight of each client (leading axis) is finite."""
    leaves = [jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)
              for x in jax.tree.leaves(loras.weights)]
    return jnp.all(jnp.stack(leaves), axis=0)


# --------------------------------------------------------------------------------------------
# Heterogeneous ranks in one vmap


def pad_rank(lo: LoRA, rank: int) -> LoRA:
    """Zero-pads ``a`` ``[..., in, r]`` and ``b`` ``[..., r, out]`` to ``rank``."""
    flat = {}
    for path, ab in module_weights(lo.weights).items():
        extra = rank - ab["a"].shape[-1]
        if extra < 0:
            raise UserError(f"cannot pad rank {ab['a'].shape[-1]} down to {rank}")
        a_pad = [(0, 0)] * (ab["a"].ndim - 1) + [(0, extra)]
        b_pad = [(0, 0)] * (ab["b"].ndim - 2) + [(0, extra), (0, 0)]
        flat[path] = {"a": jnp.pad(ab["a"], a_pad), "b": jnp.pad(ab["b"], b_pad)}
    return lo.replace(weights=_unflatten(flat))


def unpad_rank(lo: LoRA, rank: int) -> LoRA:
    """The first ``rank`` rank components of a padded adapter."""
    flat = {path: {"a": ab["a"][..., :rank], "b": ab["b"][..., :rank, :]}
            for path, ab in module_weights(lo.weights).items()}
    return lo.replace(weights=_unflatten(flat))


def rank_mask(rank: int, max_rank: int) -> jax.Array:
    """``[max_rank]`` float mask: 1 for the client's own rank components, 0 for padding."""
    return (jnp.arange(max_rank) < rank).astype(jnp.float32)


def apply_rank_mask(lo: LoRA, mask: jax.Array) -> LoRA:
    """Zeroes the padded columns of ``a`` and rows of ``b`` (exactly: multiplied by 0)."""
    flat = {path: {"a": ab["a"] * mask, "b": ab["b"] * mask[:, None]}
            for path, ab in module_weights(lo.weights).items()}
    return lo.replace(weights=_unflatten(flat))


def stack_clients(loras: Sequence[LoRA]) -> LoRA:
    """One LoRA whose leaves have a leading client axis ``[K, ...]`` (same shapes needed)."""
    _same_scale(loras, "a client batch")
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *loras)


def unstack_clients(stacked: LoRA) -> list[LoRA]:
    count = jax.tree.leaves(stacked.weights)[0].shape[0]
    return [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(count)]


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

    def step(state, xs):
        batch, i = xs
        new, metrics = train.train_step(state, frozen, batch, jax.random.fold_in(rng, i),
                                        cfg=cfg, optimizer=optimizer, mode=mode)
        new = new.replace(trainable=apply_rank_mask(new.trainable, mask))
        active = i < num_steps
        state = jax.tree.map(lambda n, o: jnp.where(active, n, o), new, state)
        return state, {**metrics, "active": active}

    state, metrics = jax.lax.scan(step, state, (batches, jnp.arange(max_steps)))
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

    return jax.vmap(one_client)(loras, masks, batches, rngs, num_steps)
