"""The strategy interface (:class:`Strategy`) and the helpers every strategy uses: payload
sizes, a client batch's rows, the range checks of ``fl.settings``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from ffrag_jax.errors import UserError
from ffrag_jax.federated import client_rules, compression
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
        return jnp.broadcast_to(y, x.shape) if client_rules.is_a(path) else x
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
    one_rank: ClassVar[bool] = False  # averages a and b: every client must have one rank
    # The rule needs only the weighted mean of what the clients send (:meth:`aggregate_mean`):
    # secure aggregation can hide every single update from the server.
    summable: ClassVar[bool] = False
    fusion: str = "add"
    # How adapters travel (fl.payload): the server computes with what it would receive, and
    # clients with what they would download.
    payload: compression.Codec = compression.FP32()

    def __post_init__(self):
        if self.fusion not in FUSIONS:
            raise UserError(f"fl.fusion={self.fusion!r}; choose one of {', '.join(FUSIONS)}")
        for f in dataclasses.fields(self):  # the fl.settings a strategy declares with setting()
            if "range" in f.metadata:
                _check_range(f.name, getattr(self, f.name), *f.metadata["range"])

    # -- checks ---------------------------------------------------------------------------

    def check(self, ranks: Sequence[int], template: LoRA | None = None) -> None:
        """A UserError for client ranks (or an adapter ``template``, shapes only) that the
        strategy cannot aggregate."""
        if self.one_rank and len(set(ranks)) > 1:
            from ffrag_jax.federated.strategies import REGISTRY  # the package holds the list

            others = [n for n, c in REGISTRY.items() if not c.one_rank]
            raise UserError(f"fl.strategy={self.name!r} needs one rank for all clients; use "
                            f"{', '.join(map(repr, others))} for heterogeneous ranks")

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
        it for strategies that keep them. What every job calls. Each client encodes its own
        adapter (an int8 block never spans two clients), as it does on the Flower engine."""
        return self.aggregate(server, jax.vmap(self.payload.roundtrip)(updated), weights,
                              accepted, selected, ranks, local=updated)

    def aggregate(self, server: dict, updated: LoRA, weights: jax.Array, accepted: jax.Array,
                  selected: jax.Array, ranks: Sequence[int] | None = None, *,
                  local: LoRA | None = None) -> dict:
        """The strategy's rule: the next server state from the adapters ``[K, ...]`` the
        server received (``local``: the clients' own, uncompressed, for strategies that keep
        them; default ``updated``)."""
        raise NotImplementedError

    def secure_form(self, adapter: LoRA):
        """Summable strategies: what a client puts into a secure sum (a pytree of arrays):
        its adapter, for the strategies that average adapters."""
        return adapter

    def aggregate_mean(self, server: dict, mean) -> dict:
        """Summable strategies: the next server state from ``mean``, the weighted mean
        ``sum_k w_k s_k`` of the accepted clients' :meth:`secure_form` (all that secure
        aggregation reveals). The averaging strategies' :meth:`aggregate` is this of
        :func:`weighted_mean`."""
        raise NotImplementedError(f"{self.name} needs every client's update, not their sum")

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


def setting(default: float, low: float, high: float, closed_low: bool = True):
    """A strategy's ``fl.settings`` field: ``default``, checked to lie in ``[low, high)``
    (``(low, high)`` without ``closed_low``) when the strategy is made."""
    return dataclasses.field(default=default, metadata={"range": (low, high, closed_low)})


def _check_range(key: str, value: float, low: float, high: float, closed_low: bool = True
                 ) -> None:
    ok = (value >= low if closed_low else value > low) and value < high
    if not ok:
        lower = "[" if closed_low else "("
        raise UserError(f"fl.settings.{key}={value!r}: must be in {lower}{low}, {high})")

