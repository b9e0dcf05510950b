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

from ffrag_jax.errors import UserError
from ffrag_jax.federated import compression
from ffrag_jax.federated.strategies.base import FUSIONS as FUSIONS
from ffrag_jax.federated.strategies.base import Strategy as Strategy
from ffrag_jax.federated.strategies.base import adapter_bytes as adapter_bytes
from ffrag_jax.federated.strategies.core import FF as FF
from ffrag_jax.federated.strategies.core import FedAvg as FedAvg
from ffrag_jax.federated.strategies.core import Stack as Stack
from ffrag_jax.federated.strategies.core import ZeroPad as ZeroPad
from ffrag_jax.federated.strategies.local import FFA as FFA
from ffrag_jax.federated.strategies.local import FedProx as FedProx
from ffrag_jax.federated.strategies.local import FedSA as FedSA
from ffrag_jax.federated.strategies.server import FedAdam as FedAdam
from ffrag_jax.federated.strategies.server import FedAvgM as FedAvgM
from ffrag_jax.federated.strategies.server import FedOpt as FedOpt
from ffrag_jax.federated.strategies.server import FedYogi as FedYogi
from ffrag_jax.federated.strategies.server import Median as Median
from ffrag_jax.federated.strategies.server import TrimmedMean as TrimmedMean

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
