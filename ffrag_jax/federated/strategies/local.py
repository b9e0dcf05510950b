"""Strategies that change the clients' local training (through
:mod:`~ffrag_jax.federated.client_rules`) or what they share: FedProx, FFA-LoRA, FedSA-LoRA."""

from __future__ import annotations

import dataclasses

import optax

from ffrag_jax.federated import client_rules
from ffrag_jax.federated.aggregation import client, weighted_mean
from ffrag_jax.federated.strategies.base import (
    Strategy,
    _broadcast,
    _put,
    _with_a,
    adapter_bytes,
    setting,
)
from ffrag_jax.federated.strategies.core import FedAvg, ZeroPad


@dataclasses.dataclass(frozen=True)
class FedProx(ZeroPad):
    """FedProx (Li et al., 2020): clients minimise their loss plus ``mu/2 ||w - w_start||^2``,
    which keeps a client with much data or many steps near the global adapter; the server
    averages like FedIT (ranks zero-padded)."""

    name = "fedprox"
    description = "FedProx: mu/2 ||w - global||^2 added in local training (fl.settings.mu)"
    mu: float = setting(0.01, 0.0, float("inf"))

    def client_optimizer(self, optimizer):
        return client_rules.wrap(
            optimizer, lambda tx: optax.chain(client_rules.proximal(self.mu), tx))


class FFA(FedAvg):
    """FFA-LoRA (Sun et al., 2024): every ``a`` stays the random one the global adapter
    started with; clients train ``b`` alone, so each client's product is ``a_0 b_k`` and the
    average of the ``b``s gives exactly the average of the products. Only ``b`` travels."""

    name = "ffa"
    description = "FFA-LoRA: a frozen at its shared random start, b trained and averaged (exact)"

    def client_optimizer(self, optimizer):
        return client_rules.wrap(optimizer, client_rules.freeze_a)

    def client_start(self, server, selected, fresh):
        # Only b travels; every client holds the fixed a already.
        current = server["global"]
        return _broadcast(_with_a(self.downloaded(current), current), selected.shape[0])

    def aggregate_mean(self, server, mean):
        # The server's a, not the average of the clients' (equal) copies: sum_k w_k a is a
        # only up to rounding.
        return {**server, "global": _with_a(mean, server["global"])}

    def global_model(self, server):
        current = server["global"]
        return server["params"], _with_a(self.downloaded(current), current)

    def payload_bytes(self, template, rank, global_rank):
        b = adapter_bytes(template, rank, self.payload, factors=("b",))
        return b, b


class FedSA(Strategy):
    """FedSA-LoRA (Guo et al., 2025): the ``a`` factors (what clients have in common) are
    averaged and shared; every client keeps its own ``b`` (what is its own). A client's model
    is ``(a_global, b_k)``; the global model pairs ``a_global`` with the round's average
    ``b``. One rank for all clients; only ``a`` travels."""

    name = "fedsa"
    description = "FedSA-LoRA: a averaged and shared, b personal to each client"
    personalised = True
    one_rank = True  # a averaged, b kept: one shape for every client

    def init_server(self, params, *, start=None, personal=None, per_round=1, ranks=None):
        # Client 0's random a is everyone's start (b starts at zero for all).
        return {"params": params, "personal": personal, "global": client(personal, 0)}

    def client_start(self, server, selected, fresh):
        # server["global"] is already what clients downloaded (aggregate stores it so).
        return _with_a(client(server["personal"], selected), server["global"])

    def aggregate(self, server, updated, weights, accepted, selected, ranks=None, *,
                  local=None):
        # A rejected client keeps its previous b; the global a is what clients download.
        own = updated if local is None else local
        return {**server, "personal": _put(server["personal"], own, accepted, selected),
                "global": self.downloaded(weighted_mean(updated, weights))}

    def personal_base(self, server):
        return server["params"], None

    def client_adapter(self, server, k, chain_global=None):
        return _with_a(client(server["personal"], k), server["global"])

    def fused_adapter(self, server, k):
        return self.client_adapter(server, k)

    def payload_bytes(self, template, rank, global_rank):
        a = adapter_bytes(template, rank, self.payload, factors=("a",))
        return a, a


