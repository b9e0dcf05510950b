"""Federated strategies as objects: each variant is a small class behind one interface, chosen
once by name (:func:`get`) from ``fl.strategy``; every job calls the same implementation of
each rule.

The server state is a dict of fixed-shape pytrees, so a round compiles once and an orbax
checkpoint restores into the same structure:

* ``params``: the base weights (:class:`Stack` merges each round's stacked adapter into them);
* ``global``: the carried global adapter (:class:`FedAvg`, :class:`ZeroPad`: rank ``R``, the
  largest client rank), or the last round's stacked one (:class:`FF`);
* ``personal``: :class:`FF` only: every client's personal adapter, ``[N, ..., R]``;
* ``server_opt``: the server optimisers (:class:`FedAvgM`, :class:`FedAdam`,
  :class:`FedYogi`) only: the optax state of the optimiser that steps the global adapter.

Strategies with settings (a server learning rate, a trim fraction) read them from the
``fl.settings`` section (:func:`from_config`); each class declares the ones it uses as fields.

Client adapters travel as a client batch: leaves ``[K, ...]``, every client zero-padded to
``R``. ``ranks`` (static client ranks), where a job gives them, lets stacking cut the padding
first; without them a stacked adapter has rank ``K*R`` whatever clients a round selected.

The interface is pure and engine-neutral (no I/O, no loop, no device placement): a round in
one jit (:func:`ffrag_jax.federated.round_step.run_round`), clients trained one by one on the host,
or a federation engine whose clients are other processes all call the same methods.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ffrag_jax.errors import UserError
from ffrag_jax.federated import client_rules, compression
from ffrag_jax.federated.aggregation import (
    client,
    coordinate_median,
    fuse,
    stack_padded,
    trimmed_mean,
    weighted_mean,
)
from ffrag_jax.models import lora
from ffrag_jax.models.lora import LoRA, module_weights

FUSIONS = ("add", "chain")


def _leaf_bytes(count: int, dtype, codec: compression.Codec | None) -> int:
    return count * np.dtype(dtype).itemsize if codec is None else codec.value_bytes(count)


def adapter_bytes(template: LoRA, rank: int, codec: compression.Codec | None = None,
                  factors: tuple[str, ...] = ("a", "b")) -> int:
    """Bytes of an adapter with ``template``'s modules at ``rank`` (``r in`` for ``a`` and
    ``r out`` for ``b``, per module and layer), as ``codec`` sends them (None: the arrays'
    own dtype); ``factors``: the factors that travel."""
    total = 0
    for ab in module_weights(template.weights).values():
        a = ab["a"]
        layers = int(np.prod(a.shape[:-2]))
        sizes = {"a": layers * rank * a.shape[-2], "b": layers * rank * ab["b"].shape[-1]}
        total += sum(_leaf_bytes(sizes[f], a.dtype, codec) for f in factors)
    return total


def _with_a(lo: LoRA, a_from: LoRA) -> LoRA:
    """``lo`` with its ``a`` factors taken from ``a_from`` (same tree; ``a_from`` may lack
    the leading client axis: it is broadcast)."""
    def pick(path, x, y):
        return jnp.broadcast_to(y, x.shape) if getattr(path[-1], "key", None) == "a" else x
    return jax.tree_util.tree_map_with_path(pick, lo, a_from)


def _put(every: LoRA, updated: LoRA, accepted: jax.Array, selected: jax.Array) -> LoRA:
    """``every`` ``[N, ...]`` with the selected clients' rows set to ``updated`` ``[K, ...]``;
    a rejected client keeps its previous row."""
    def put(old, upd):
        mask = accepted.reshape((-1,) + (1,) * (upd.ndim - 1))
        return old.at[selected].set(jnp.where(mask, upd, old[selected]))
    return jax.tree.map(put, every, updated)


def _broadcast(tree, count: int):
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (count,) + x.shape), tree)


@dataclasses.dataclass(frozen=True)
class Strategy:
    """The interface. Frozen and hashable: a jitted round takes it as a static argument."""

    name: ClassVar[str]
    description: ClassVar[str]
    personalised: ClassVar[bool] = False  # keeps one adapter per client across rounds
    fresh_adapters: ClassVar[bool] = False  # clients start every round from new adapters
    changes_base: ClassVar[bool] = False  # aggregation merges into the base weights
    fusion: str = "add"
    # How adapters travel (fl.payload): the server computes with what it would receive, and
    # clients with what they would download.
    payload: compression.Codec = compression.FP32()

    def __post_init__(self):
        if self.fusion not in FUSIONS:
            raise UserError(f"fl.fusion={self.fusion!r}; choose one of {', '.join(FUSIONS)}")

    # -- checks ---------------------------------------------------------------------------

    def check(self, ranks: Sequence[int], template: LoRA | None = None) -> None:
        """A UserError for client ranks (or an adapter ``template``, shapes only) that the
        strategy cannot aggregate."""

    # -- server state ---------------------------------------------------------------------

    def init_server(self, params: dict, *, start: LoRA | None = None,
                    personal: LoRA | None = None, per_round: int = 1,
                    ranks: Sequence[int] | None = None) -> dict:
        """The round-0 server state. ``start``: the initial global adapter (strategies that
        carry one); ``personal``: every client's initial adapter ``[N, ...]`` (personalised
        strategies)."""
        return {"params": params}

    def checkpointed(self, server: dict) -> dict:
        """The part of the server state that rounds change (what a checkpoint must hold; the
        base weights only when aggregation merges into them)."""
        if self.changes_base:
            return server
        return {k: v for k, v in server.items() if k != "params"}

    # -- a round --------------------------------------------------------------------------

    def client_start(self, server: dict, selected: jax.Array, fresh: LoRA | None) -> LoRA:
        """Each selected client's starting adapter ``[K, ...]`` (``fresh``: new adapters,
        for strategies that start from them)."""
        raise NotImplementedError

    def client_optimizer(self, optimizer):
        """The clients' optimizer (an optax transformation or a factory of one) with what
        this strategy changes in local training (:mod:`~ffrag_jax.federated.client_rules`)."""
        return optimizer

    def training_fusion(self, has_global: bool) -> str:
        """How clients see the global adapter this round."""
        return "add"

    def round_params(self, server: dict, fusion: str = "add") -> tuple[dict, LoRA | None]:
        """``(params, chain_global)`` the clients train on (``chain_global``: a frozen global
        adapter the trained one is chained through)."""
        return server["params"], None

    def server_update(self, server: dict, updated: LoRA, weights: jax.Array,
                      accepted: jax.Array, selected: jax.Array,
                      ranks: Sequence[int] | None = None) -> dict:
        """The next server state from the selected clients' trained adapters ``[K, ...]``
        as they trained them (rejected clients already zeroed), their normalised weights
        ``[K]`` (0 for the rejected) and ``accepted`` ``[K]``: :meth:`aggregate` of what the
        server receives (the payload codec's round trip), the clients' own adapters beside
        it for strategies that keep them. What every job calls."""
        return self.aggregate(server, self.payload.roundtrip(updated), weights, accepted,
                              selected, ranks, local=updated)

    def aggregate(self, server: dict, updated: LoRA, weights: jax.Array, accepted: jax.Array,
                  selected: jax.Array, ranks: Sequence[int] | None = None, *,
                  local: LoRA | None = None) -> dict:
        """The strategy's rule: the next server state from the adapters ``[K, ...]`` the
        server received (``local``: the clients' own, uncompressed, for strategies that keep
        them; default ``updated``)."""
        raise NotImplementedError

    def downloaded(self, tree):
        """What clients compute with when the server sends ``tree``."""
        return self.payload.roundtrip(tree)

    # -- models ---------------------------------------------------------------------------

    def global_model(self, server: dict) -> tuple[dict, LoRA | None]:
        """``(params, adapter)`` of the global model."""
        return server["params"], server.get("global")

    def personal_base(self, server: dict) -> tuple[dict, LoRA | None]:
        """Personalised strategies: ``(params, chain_global)`` under every client's personal
        adapter (computed once per round: at 7B a merge is not free)."""
        raise NotImplementedError(f"{self.name} keeps no personal adapters")

    def client_adapter(self, server: dict, k: int, chain_global: LoRA | None = None) -> LoRA:
        """Client ``k``'s adapter on :meth:`personal_base`: its personal one (additive fusion,
        the global adapter merged into the base) or ``chain(global, personal)``."""
        raise NotImplementedError(f"{self.name} keeps no personal adapters")

    def fused_adapter(self, server: dict, k: int) -> LoRA:
        """Client ``k``'s whole personal model as one adapter on the base weights (the same
        function as :meth:`personal_base` + :meth:`client_adapter`, which is how it is
        exported and served; this form needs no merged copy of the base)."""
        raise NotImplementedError(f"{self.name} keeps no personal adapters")

    # -- communication --------------------------------------------------------------------

    def payload_bytes(self, template: LoRA, rank: int, global_rank: int) -> tuple[int, int]:
        """``(upload, download)`` bytes of one client in one round (in :attr:`payload`'s
        format): the client's trained adapter at its own rank up; the global adapter it
        starts from down."""
        up = adapter_bytes(template, rank, self.payload)
        return up, up


class Stack(Strategy):
    """FLoRA: fresh adapters every round, stacked exactly (any mix of ranks) and merged into
    the base weights."""

    name = "stack"
    description = "FLoRA: fresh adapters each round, stacked exactly and merged into the base"
    fresh_adapters = True
    changes_base = True

    def client_start(self, server, selected, fresh):
        return fresh

    def aggregate(self, server, updated, weights, accepted, selected, ranks=None, *,
                  local=None):
        # Clients download the stacked adapter and merge it: the server merges the same.
        stacked = self.downloaded(stack_padded(updated, weights, ranks))
        return {**server, "params": lora.merge(server["params"], stacked)}

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

    def check(self, ranks, template=None):
        if len(set(ranks)) > 1:
            raise UserError(f"fl.strategy={self.name!r} needs one rank for all clients; use "
                            f"{', '.join(repr(n) for n in REGISTRY if n != self.name)} for "
                            "heterogeneous ranks")

    def init_server(self, params, *, start=None, personal=None, per_round=1, ranks=None):
        return {"params": params, "global": start}

    def client_start(self, server, selected, fresh):
        return _broadcast(self.downloaded(server["global"]), selected.shape[0])

    def aggregate(self, server, updated, weights, accepted, selected, ranks=None, *,
                  local=None):
        return {**server, "global": weighted_mean(updated, weights)}


class ZeroPad(FedAvg):
    """HetLoRA-style baseline: every client padded to the largest rank, then averaged like
    FedIT; a client of rank ``r`` trains (and downloads) the global adapter's first ``r``
    components."""

    name = "zeropad"
    description = "HetLoRA-style: clients zero-padded to the largest rank, then averaged"

    def check(self, ranks, template=None):
        pass


# --------------------------------------------------------------------------------------------
# Robust aggregation and server optimisers: the global adapter of FedIT/zero-padding, combined
# or stepped differently. Ranks are zero-padded as in ZeroPad.


class Median(ZeroPad):
    """The coordinate-wise median of the accepted clients' ``a`` and ``b`` (Yin et al., 2018):
    one client, however far off, cannot move a coordinate past the other clients' values.
    Unweighted: example counts are what a bad client would lie about."""

    name = "median"
    description = "coordinate-wise median of the clients' a and b (robust to a bad client)"

    def aggregate(self, server, updated, weights, accepted, selected, ranks=None, *,
                  local=None):
        return {**server, "global": coordinate_median(updated, accepted)}


def _check_range(key: str, value: float, low: float, high: float, *, closed_low: bool = True
                 ) -> None:
    ok = (value >= low if closed_low else value > low) and value < high
    if not ok:
        lower = "[" if closed_low else "("
        raise UserError(f"fl.settings.{key}={value!r}: must be in {lower}{low}, {high})")


@dataclasses.dataclass(frozen=True)
class TrimmedMean(ZeroPad):
    """The coordinate-wise trimmed mean (Yin et al., 2018): per coordinate, the ``trim``
    fraction of largest and of smallest client values dropped, the rest averaged
    (unweighted)."""

    name = "trimmed_mean"
    description = "coordinate-wise trimmed mean of a and b (fl.settings.trim of each end dropped)"
    trim: float = 0.2

    def __post_init__(self):
        super().__post_init__()
        _check_range("trim", self.trim, 0.0, 0.5)

    def aggregate(self, server, updated, weights, accepted, selected, ranks=None, *,
                  local=None):
        return {**server, "global": trimmed_mean(updated, accepted, self.trim)}


@dataclasses.dataclass(frozen=True)
class FedOpt(ZeroPad):
    """Adaptive federated optimisation (Reddi et al., 2021): the server treats ``global -
    mean(clients)`` (the FedIT average) as a gradient and steps the global adapter with an
    optax optimiser (:meth:`transform`) whose state it keeps across rounds. With ``lr=1`` and
    no momentum it is FedIT."""

    lr: float = 1.0  # the server's learning rate (fl.settings.lr), not the clients'

    def __post_init__(self):
        super().__post_init__()
        _check_range("lr", self.lr, 0.0, float("inf"), closed_low=False)

    def transform(self) -> optax.GradientTransformation:
        raise NotImplementedError

    def init_server(self, params, *, start=None, personal=None, per_round=1, ranks=None):
        return {"params": params, "global": start, "server_opt": self.transform().init(start)}

    def aggregate(self, server, updated, weights, accepted, selected, ranks=None, *,
                  local=None):
        current = server["global"]
        pseudo_grad = jax.tree.map(jnp.subtract, current, weighted_mean(updated, weights))
        step, opt = self.transform().update(pseudo_grad, server["server_opt"], current)
        return {**server, "global": optax.apply_updates(current, step), "server_opt": opt}


@dataclasses.dataclass(frozen=True)
class FedAvgM(FedOpt):
    """FedAvgM (Hsu et al., 2019): server momentum, ``v = momentum v + g``, ``x -= lr v``
    (``optax.sgd``)."""

    name = "fedavgm"
    description = "FedAvgM: server momentum on the FedIT average (fl.settings.lr, .momentum)"
    momentum: float = 0.9

    def __post_init__(self):
        super().__post_init__()
        _check_range("momentum", self.momentum, 0.0, 1.0)

    def transform(self):
        return optax.sgd(self.lr, self.momentum or None)


@dataclasses.dataclass(frozen=True)
class FedAdam(FedOpt):
    """FedAdam (Reddi et al., 2021): Adam on the server, ``tau`` its epsilon
    (``optax.adam``, bias-corrected moments)."""

    name = "fedadam"
    description = "FedAdam: Adam on the server (fl.settings.lr, .b1, .b2, .tau)"
    b1: float = 0.9
    b2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self):
        super().__post_init__()
        _check_range("b1", self.b1, 0.0, 1.0)
        _check_range("b2", self.b2, 0.0, 1.0)
        _check_range("tau", self.tau, 0.0, float("inf"), closed_low=False)

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


class FF(Strategy):
    """FF-LoRA: every client keeps a personal adapter; the server stacks them (FLoRA, exact)
    into the next round's frozen global adapter, which clients fuse with their own (``add``:
    ``W + G + P_k``; ``chain``: the reference's literal variant)."""

    name = "ff"
    description = "FF-LoRA: personal adapters fused with the stacked global one"
    personalised = True

    def check(self, ranks, template=None):
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


# --------------------------------------------------------------------------------------------
# Strategies that change the clients' training (client_rules)


@dataclasses.dataclass(frozen=True)
class FedProx(ZeroPad):
    """FedProx (Li et al., 2020): clients minimise their loss plus ``mu/2 ||w - w_start||^2``,
    which keeps a client with much data or many steps near the global adapter; the server
    averages like FedIT (ranks zero-padded)."""

    name = "fedprox"
    description = "FedProx: mu/2 ||w - global||^2 added in local training (fl.settings.mu)"
    mu: float = 0.01

    def __post_init__(self):
        super().__post_init__()
        _check_range("mu", self.mu, 0.0, float("inf"))

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

    def aggregate(self, server, updated, weights, accepted, selected, ranks=None, *,
                  local=None):
        # The server's a, not the average of the clients' (equal) copies: sum_k w_k a is a
        # only up to rounding.
        return {**server, "global": _with_a(weighted_mean(updated, weights), server["global"])}

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

    def check(self, ranks, template=None):
        FedAvg.check(self, ranks, template)

    def init_server(self, params, *, start=None, personal=None, per_round=1, ranks=None):
        # Client 0's random a is everyone's start (b starts at zero for all).
        return {"params": params, "personal": personal, "global": client(personal, 0)}

    def client_start(self, server, selected, fresh):
        return _with_a(client(server["personal"], selected), self.downloaded(server["global"]))

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


REGISTRY: dict[str, type[Strategy]] = {cls.name: cls for cls in (
    Stack, FedAvg, ZeroPad, FF, FedAvgM, FedAdam, FedYogi, Median, TrimmedMean, FedProx, FFA,
    FedSA)}

# fl.settings: the settings of the strategies that have any (each class takes the ones it uses)
SETTINGS_KEYS = ("lr", "momentum", "b1", "b2", "tau", "trim", "mu")


def get(name: str, fusion: str = "add", *, allowed: Sequence[type[Strategy]] | None = None,
        job: str | None = None, settings: Mapping | None = None,
        payload: compression.Codec | None = None) -> Strategy:
    """The strategy called ``name`` (``fl.strategy``); a UserError naming it and the valid
    ones otherwise (``allowed``: the classes a job runs, ``job`` its name for the message).
    ``settings``: ``fl.settings`` values; each strategy takes the ones it declares;
    ``payload``: how adapters travel (default: as they are)."""
    options = {cls.name: cls for cls in (allowed or REGISTRY.values())}
    if name not in options:
        if job:
            raise UserError(f"fl.strategy={name!r}; {job} runs {' or '.join(options)}")
        raise UserError(f"fl.strategy={name!r}; choose one of {', '.join(options)} ("
                        + "; ".join(f"{n}: {c.description}" for n, c in options.items()) + ")")
    cls = options[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(fusion=fusion, payload=payload or compression.FP32(),
               **{k: v for k, v in (settings or {}).items() if k in fields})


def from_config(fl, *, allowed: Sequence[type[Strategy]] | None = None,
                job: str | None = None) -> Strategy:
    """The strategy of a config's ``fl`` section: ``fl.strategy``, ``fl.fusion``, the
    ``fl.settings`` settings (an unknown key there is an error naming it) and the payload
    codec (``fl.payload``, ``fl.payload_block``)."""
    settings = dict(fl.get("settings") or {})
    unknown = sorted(set(settings) - set(SETTINGS_KEYS))
    if unknown:
        raise UserError(f"unknown key fl.settings.{unknown[0]}; fl.settings keys: "
                        f"{', '.join(SETTINGS_KEYS)}")
    payload = compression.get(fl.get("payload", "fp32"), fl.get("payload_block", 64))
    return get(fl.strategy, fl.get("fusion", "add"), allowed=allowed, job=job,
               settings=settings, payload=payload)
