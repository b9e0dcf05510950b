"""What a strategy changes in the clients' local training, as optax transformations wrapped
around the job's client optimizer (``Strategy.client_optimizer`` in
:mod:`~ffrag_jax.federated.strategies`): the loss and the step stay the job's, so every
strategy runs on the one client update.

* :func:`proximal`: FedProx's term ``mu/2 ||w - w_start||^2`` (Li et al., 2020), added as its
  gradient ``mu (w - w_start)`` before the optimizer (clipping included) sees the gradients;
  ``w_start`` is the adapter the client started the round from (held in the optimizer state,
  which every round builds afresh).
* :func:`freeze_a`: FFA-LoRA (Sun et al., 2024): the ``a`` factors never move, so every
  client's product is ``a_0 b_k`` with one shared ``a_0`` and averaging ``b`` is exact.

A client optimizer is an optax transformation or a function of the client's step count that
builds one (:data:`~ffrag_jax.federated.clients.OptimizerOrFactory`); :func:`wrap` applies a
rule to either.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class ProximalState(NamedTuple):
    anchor: Any  # the adapter the client started from


def proximal(mu: float) -> optax.GradientTransformation:
    """Adds ``mu (params - anchor)`` to the gradients; the anchor is the params at init."""
    def init(params):
        # A copy: a train state holding the params and this anchor as one buffer cannot be
        # donated to a jitted step (FF-RAG's rag_step donates its state).
        return ProximalState(anchor=jax.tree.map(jnp.copy, params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("the proximal term needs the params (optimizer.update(g, s, p))")
        return jax.tree.map(lambda g, p, a: g + mu * (p - a), updates, params,
                            state.anchor), state

    return optax.GradientTransformation(init, update)


def is_a(path) -> bool:
    """Whether a pytree path (``jax.tree_util`` keys) ends at an ``a`` factor."""
    return getattr(path[-1], "key", None) == "a"


def freeze_a(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """``optimizer`` on the ``b`` factors; the ``a`` factors get exactly zero updates (and
    no optimizer state)."""
    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "frozen" if is_a(path) else "trained", params)

    return optax.multi_transform({"trained": optimizer, "frozen": optax.set_to_zero()}, labels)


def wrap(optimizer, rule: Callable[[optax.GradientTransformation],
                                   optax.GradientTransformation]):
    """``rule`` applied to a client optimizer, or to what a factory of one builds."""
    if isinstance(optimizer, optax.GradientTransformation):
        return rule(optimizer)
    return lambda num_steps: rule(optimizer(num_steps))
