"""Robust aggregation and server optimisers: the global adapter of FedIT/zero-padding,
combined or stepped differently (ranks zero-padded as in :class:`ZeroPad`)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from ffrag_jax.federated.aggregation import coordinate_median, trimmed_mean
from ffrag_jax.federated.strategies.base import setting
from ffrag_jax.federated.strategies.core import ZeroPad


class Median(ZeroPad):
    """The coordinate-wise median of the accepted clients' ``a`` and ``b`` (Yin et al., 2018):
    one client, however far off, cannot move a coordinate past the other clients' values.
    Unweighted: example counts are what a bad client would lie about."""

    name = "median"
    summable = False  # a median needs every value
    description = "coordinate-wise median of the clients' a and b (robust to a bad client)"

    def aggregate(self, server, updated, weights, accepted, selected, ranks=None, *,
                  local=None):
        return {**server, "global": coordinate_median(updated, accepted)}



@dataclasses.dataclass(frozen=True)
class TrimmedMean(ZeroPad):
    """The coordinate-wise trimmed mean (Yin et al., 2018): per coordinate, the ``trim``
    fraction of largest and of smallest client values dropped, the rest averaged
    (unweighted)."""

    name = "trimmed_mean"
    summable = False  # so does a trimmed mean
    description = "coordinate-wise trimmed mean of a and b (fl.settings.trim of each end dropped)"
    trim: float = setting(0.2, 0.0, 0.5)


    def aggregate(self, server, updated, weights, accepted, selected, ranks=None, *,
                  local=None):
        return {**server, "global": trimmed_mean(updated, accepted, self.trim)}


@dataclasses.dataclass(frozen=True)
class FedOpt(ZeroPad):
    """Adaptive federated optimisation (Reddi et al., 2021): the server treats ``global -
    mean(clients)`` (the FedIT average) as a gradient and steps the global adapter with an
    optax optimiser (:meth:`transform`) whose state it keeps across rounds. With ``lr=1`` and
    no momentum it is FedIT."""

    lr: float = setting(1.0, 0.0, float("inf"), closed_low=False)  # the server's (fl.settings.lr)


    def transform(self) -> optax.GradientTransformation:
        raise NotImplementedError

    def init_server(self, params, *, start=None, personal=None, per_round=1, ranks=None):
        return {"params": params, "global": start, "server_opt": self.transform().init(start)}

    def aggregate_mean(self, server, mean):
        current = server["global"]
        pseudo_grad = jax.tree.map(jnp.subtract, current, mean)
        step, opt = self.transform().update(pseudo_grad, server["server_opt"], current)
        return {**server, "global": optax.apply_updates(current, step), "server_opt": opt}


@dataclasses.dataclass(frozen=True)
class FedAvgM(FedOpt):
    """FedAvgM (Hsu et al., 2019): server momentum, ``v = momentum v + g``, ``x -= lr v``
    (``optax.sgd``)."""

    name = "fedavgm"
    description = "FedAvgM: server momentum on the FedIT average (fl.settings.lr, .momentum)"
    momentum: float = setting(0.9, 0.0, 1.0)


    def transform(self):
        return optax.sgd(self.lr, self.momentum or None)


@dataclasses.dataclass(frozen=True)
class FedAdam(FedOpt):
    """FedAdam (Reddi et al., 2021): Adam on the server, ``tau`` its epsilon
    (``optax.adam``, bias-corrected moments)."""

    name = "fedadam"
    description = "FedAdam: Adam on the server (fl.settings.lr, .b1, .b2, .tau)"
    b1: float = setting(0.9, 0.0, 1.0)
    b2: float = setting(0.99, 0.0, 1.0)
    tau: float = setting(1e-3, 0.0, float("inf"), closed_low=False)  # Adam's epsilon


    def transform(self):
        return optax.adam(self.lr, self.b1, self.b2, eps=self.tau)


@dataclasses.dataclass(frozen=True)
class FedYogi(FedAdam):
    """FedYogi (Reddi et al., 2021): Yogi's additive second moment, ``v -= (1 - b2) g^2
    sign(v - g^2)``, which grows more slowly than Adam's (``optax.yogi``)."""

    name = "fedyogi"
    description = "FedYogi: Yogi on the server (fl.settings.lr, .b1, .b2, .tau)"

    def transform(self):
        return optax.yogi(self.lr, self.b1, self.b2, eps=self.tau)


