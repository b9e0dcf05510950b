"""FLoRA stacking, FedIT averaging, zero-padding and FF-LoRA: the strategies of the
reference code."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ffrag_jax.federated.aggregation import client, fuse, stack_padded, weighted_mean
from ffrag_jax.federated.strategies.base import Strategy, _broadcast, _put, adapter_bytes
from ffrag_jax.models import lora


class Stack(Strategy):
    """FLoRA: fresh adapters every round, stacked exactly (any mix of ranks) and merged into
    the base weights."""

    name = "stack"
    description = "FLoRA: fresh adapters each round, stacked exactly and merged into the base"
    fresh_adapters = True
    changes_base = True
    # Under secure aggregation, the stacked product's summable form: each client's merged
    # delta ``scale * a_k b_k`` per module, dense (d_in x d_out values a module, not r (d_in +
    # d_out)); their weighted sum is the stacked product, which is all the server learns.
    summable = True

    def client_start(self, server, selected, fresh):
        return fresh

    def aggregate(self, server, updated, weights, accepted, selected, ranks=None, *,
                  local=None):
        # Clients download the stacked adapter and merge it: the server merges the same.
        stacked = self.downloaded(stack_padded(updated, weights, ranks))
        return {**server, "params": lora.merge(server["params"], stacked)}

    def secure_form(self, adapter):
        return {"/".join(path): d for path, d in lora.delta(adapter).items()}

    def aggregate_mean(self, server, mean):
        deltas = {tuple(path.split("/")): d for path, d in mean.items()}
        return {**server, "params": lora.add_deltas(server["params"], deltas)}

    def global_model(self, server):
        return server["params"], None

    def payload_bytes(self, template, rank, global_rank):
        return (adapter_bytes(template, rank, self.payload),
                adapter_bytes(template, global_rank, self.payload))


class FedAvg(Strategy):
    """FedIT: one global adapter carried across rounds, ``a`` and ``b`` averaged separately
    (one rank for every client)."""

    name = "fedavg"
    description = "FedIT: a global adapter, a and b averaged separately (equal ranks)"

    one_rank = True
    summable = True

    def init_server(self, params, *, start=None, personal=None, per_round=1, ranks=None):
        return {"params": params, "global": start}

    def client_start(self, server, selected, fresh):
        return _broadcast(self.downloaded(server["global"]), selected.shape[0])

    def aggregate(self, server, updated, weights, accepted, selected, ranks=None, *,
                  local=None):
        return self.aggregate_mean(server, weighted_mean(updated, weights))

    def aggregate_mean(self, server, mean):
        return {**server, "global": mean}

    def global_model(self, server):
        # The server keeps the exact average (a server optimiser steps from it); the global
        # model is what clients have of it: the download, in the payload codec.
        return server["params"], self.downloaded(server["global"])


class ZeroPad(FedAvg):
    """HetLoRA-style baseline: every client padded to the largest rank, then averaged like
    FedIT; a client of rank ``r`` trains (and downloads) the global adapter's first ``r``
    components."""

    name = "zeropad"
    description = "HetLoRA-style: clients zero-padded to the largest rank, then averaged"
    one_rank = False  # padding is what it is for


class FF(Strategy):
    """FF-LoRA: every client keeps a personal adapter; the server stacks them (FLoRA, exact)
    into the next round's frozen global adapter, which clients fuse with their own (``add``:
    ``W + G + P_k``; ``chain``: the reference's literal variant)."""

    name = "ff"
    description = "FF-LoRA: personal adapters fused with the stacked global one"
    personalised = True

    def check(self, ranks, template=None):
        super().check(ranks, template)
        if self.fusion == "chain" and template is not None:
            lora.check_square(template)

    def init_server(self, params, *, start=None, personal=None, per_round=1, ranks=None):
        # An all-zero stacked adapter of the shape every round's will have.
        zeros = jax.tree.map(lambda x: jnp.zeros((per_round,) + x.shape[1:], x.dtype), personal)
        return {"params": params, "personal": personal,
                "global": stack_padded(zeros, jnp.zeros((per_round,)), ranks)}

    def client_start(self, server, selected, fresh):
        return client(server["personal"], selected)

    def training_fusion(self, has_global):
        # Chain fusion through an all-zero global adapter has zero gradient, so clients train
        # plain personal adapters until a global one exists (additive fusion with G = 0).
        return self.fusion if has_global else "add"

    def round_params(self, server, fusion="add"):
        if fusion == "add":  # the frozen global adapter merged once, shared by all clients
            return lora.merge(server["params"], server["global"]), None
        return server["params"], server["global"]

    def aggregate(self, server, updated, weights, accepted, selected, ranks=None, *,
                  local=None):
        # Clients keep their own personal adapters; the global one is what they download.
        return {**server, "personal": _put(server["personal"], updated if local is None
                                           else local, accepted, selected),
                "global": self.downloaded(stack_padded(updated, weights, ranks))}

    def personal_base(self, server):
        return self.round_params(server, self.fusion)

    def client_adapter(self, server, k, chain_global=None):
        personal = client(server["personal"], k)
        return personal if chain_global is None else fuse(chain_global, personal, "chain")

    def fused_adapter(self, server, k):
        return fuse(server["global"], client(server["personal"], k), self.fusion)

    def payload_bytes(self, template, rank, global_rank):
        return (adapter_bytes(template, rank, self.payload),
                adapter_bytes(template, global_rank, self.payload))
