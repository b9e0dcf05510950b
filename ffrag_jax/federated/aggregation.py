"""The aggregation rules of federated LoRA as pure functions of :class:`~ffrag_jax.models.lora.LoRA`
pytrees (``a`` ``[..., in, r]``, ``b`` ``[..., r, out]``): each rule is written once here and
used by every job through :mod:`ffrag_jax.federated.strategies`.

* :func:`stack`: FLoRA's exact aggregation. The stacked adapter's product equals the weighted
  sum of the clients' products, ``sum_k p_k s_k a_k b_k``, for any mix of ranks and scales.
  :func:`stack_padded` is the same rule on a client batch ``[K, ...]`` inside jit.
* :func:`weighted_mean`: FedIT's average of ``a`` and ``b`` separately (``fedavg``; with the
  clients zero-padded to one rank, the HetLoRA-style ``zeropad``). This is not the average of
  the products.
* :func:`fuse`: FF-LoRA's fusion of the global and a personal adapter, as one exact adapter.
* :func:`coordinate_median` and :func:`trimmed_mean`: the robust rules (Yin et al., 2018),
  coordinate by coordinate over the accepted clients of a batch, unweighted (a client's
  example count is what a bad client would lie about).

:func:`fedavg` and :func:`zeropad` take lists of clients of any ranks: the readable reference
forms of the rules that tests check the jitted ones against.

Heterogeneous ranks share one client batch by zero-padding to the largest rank
(:func:`pad_rank`) with a rank mask (:func:`rank_mask`) that keeps the padded rows and
columns exactly zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import traverse_util

from ffrag_jax.errors import UserError
from ffrag_jax.models.lora import LoRA, chain, module_weights


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


def stack(loras: Sequence[LoRA], weights, *, drop_zero: bool = True) -> LoRA:
    """FLoRA stacking: ``a = [p_1 s_1 a_1 | ... | p_K s_K a_K]`` along the rank axis and
    ``b = [b_1; ...; b_K]``, so ``a @ b = sum_k p_k s_k a_k b_k`` exactly.

    Each client's scale is folded into its ``a`` and the result has scale 1 and rank
    ``sum_k r_k``. ``weights`` may be traced (inside jit); with ``drop_zero`` (host side only)
    clients with weight 0 are left out.
    """
    paths = _check_same_modules(loras)
    if len(weights) != len(loras):
        raise UserError(f"{len(weights)} weights for {len(loras)} client adapters")
    if drop_zero:
        kept = [(lo, float(w)) for lo, w in zip(loras, weights, strict=True) if w != 0]
        if not kept:
            raise UserError("every client weight is 0")
    else:
        kept = [(lo, weights[k]) for k, lo in enumerate(loras)]
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


def stack_padded(clients: LoRA, weights: jax.Array, ranks: Sequence[int] | None = None
                 ) -> LoRA:
    """:func:`stack` of a client batch (leaves ``[K, ..., R]``, every client padded to ``R``)
    with ``weights`` ``[K]`` (may be traced). Without ``ranks`` the result has rank ``K*R``
    (its padding columns are exactly zero: a shape that does not depend on which clients a
    round selected); with the clients' static ``ranks`` the padding is cut first (rank
    ``sum_k r_k``)."""
    loras = unstack_clients(clients)
    if ranks is not None:
        loras = [unpad_rank(lo, r) for lo, r in zip(loras, ranks, strict=True)]
    return stack(loras, weights, drop_zero=False)


def weighted_mean(clients: LoRA, weights: jax.Array) -> LoRA:
    """``sum_k w_k x_k`` leaf by leaf over a client batch ``[K, ...]`` (FedIT's average of
    ``a`` and of ``b``)."""
    return jax.tree.map(lambda x: jnp.tensordot(weights, x, axes=1), clients)


def _sorted_accepted(x: jax.Array, accepted: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x`` ``[K, ...]`` sorted along the client axis with the rejected clients last (as
    ``+inf``), and the number of accepted clients (traced)."""
    mask = accepted.reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.sort(jnp.where(mask, x, jnp.inf), axis=0), jnp.sum(accepted.astype(jnp.int32))


def coordinate_median(clients: LoRA, accepted: jax.Array) -> LoRA:
    """The coordinate-wise median of the accepted clients ``[K, ...]`` (``accepted`` ``[K]``
    bool; an even count averages the two middle values), leaf by leaf. Inside jit."""
    def median(x):
        s, n = _sorted_accepted(x, accepted)
        lo, hi = jnp.maximum(n - 1, 0) // 2, n // 2
        return (jnp.take(s, lo, axis=0) + jnp.take(s, hi, axis=0)) / 2

    return jax.tree.map(median, clients)


def trimmed_mean(clients: LoRA, accepted: jax.Array, fraction: float) -> LoRA:
    """The coordinate-wise trimmed mean of the accepted clients ``[K, ...]``: of the ``n``
    accepted values of a coordinate, the ``floor(fraction * n)`` largest and smallest are
    dropped and the rest averaged (``fraction`` in ``[0, 0.5)``; scipy's ``trim_mean``)."""
    if not 0 <= fraction < 0.5:
        raise UserError(f"trimmed mean: fraction must be in [0, 0.5), got {fraction}")

    def mean(x):
        s, n = _sorted_accepted(x, accepted)
        cut = jnp.floor(fraction * n).astype(jnp.int32)
        i = jnp.arange(x.shape[0]).reshape((-1,) + (1,) * (x.ndim - 1))
        kept = (i >= cut) & (i < n - cut)
        return jnp.sum(jnp.where(kept, s, 0.0), axis=0) / jnp.maximum(n - 2 * cut, 1)

    return jax.tree.map(mean, clients)


def _same_scale(loras: Sequence[LoRA], what: str) -> float:
    scales = {lo.scale for lo in loras}
    if len(scales) != 1:
        raise UserError(f"{what} needs one LoRA scale for all clients, got {sorted(scales)}")
    return scales.pop()


def fedavg(loras: Sequence[LoRA], weights: Sequence[float]) -> LoRA:
    """FedIT (reference form): ``a = sum_k p_k a_k`` and ``b = sum_k p_k b_k``. All clients
    must have the same ranks and scale."""
    _check_same_modules(loras)
    scale = _same_scale(loras, "averaging a and b")
    shapes = {tuple(x.shape for x in jax.tree.leaves(lo.weights)) for lo in loras}
    if len(shapes) != 1:
        raise UserError("fedavg needs equal ranks for all clients; stack them (exact) or "
                        "zero-pad them to one rank first")
    w = [float(x) for x in weights]
    weights_tree = jax.tree.map(
        lambda *leaves: sum(wk * leaf for wk, leaf in zip(w, leaves, strict=True)),
        *[lo.weights for lo in loras],
    )
    return LoRA(weights_tree, scale=scale, dropout=loras[0].dropout)


def zeropad(loras: Sequence[LoRA], weights: Sequence[float]) -> LoRA:
    """Pad every client to the largest rank with zeros, then :func:`fedavg` (reference
    form)."""
    _check_same_modules(loras)
    _same_scale(loras, "zero-padded averaging")
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


def zero_rejected(clients: LoRA, accepted: jax.Array) -> LoRA:
    """The client batch with every rejected client's values set to 0 (not multiplied by 0:
    ``NaN * 0`` is NaN)."""
    return jax.tree.map(
        lambda x: jnp.where(accepted.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0.0), clients)


# --------------------------------------------------------------------------------------------
# Heterogeneous ranks in one client batch


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
    return [client(stacked, i) for i in range(count)]


def client(stacked: LoRA, k) -> LoRA:
    """Client ``k`` of a client batch."""
    return jax.tree.map(lambda x: x[k], stacked)


def pad_and_stack(loras: Sequence[LoRA], rank: int | None = None) -> LoRA:
    """A client batch ``[K, ...]`` of adapters of any ranks, padded to ``rank`` (default: the
    largest)."""
    rank = rank or max(r for lo in loras for r in lo.ranks.values())
    return stack_clients([pad_rank(lo, rank) for lo in loras])
