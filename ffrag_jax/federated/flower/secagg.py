"""Secure aggregation on the Flower engine: Flower's SecAgg+ (Bell et al., 2020) between the
server and the clients of a summable strategy, so that the server learns the weighted mean of
the round's adapters and nothing about any single one.

Both halves are Flower's own: the server runs ``SecAggPlusWorkflow``'s four stages (setup,
key sharing, masked vectors, unmasking) over the job's grid, the client answers them with
``secaggplus_mod``. What this module adds is the seam to the job:

* a round's ``train`` message asks the client to keep its trained adapter (``pending``, in
  its node state) and to answer with its losses only;
* the workflow's third stage asks the client for that adapter: :func:`masked_reply` hands it
  to the mod as the legacy ``FitRes`` the mod expects (leaves sorted by tree path, the client's
  example count as its weight), and the mod quantises, masks and sends it;
* :func:`secure_mean` gives the server ``sum_k n_k x_k / sum_k n_k`` over the clients that
  took part, the tree rebuilt in the template's structure, for the strategy's
  :meth:`~ffrag_jax.federated.strategies.Strategy.aggregate_mean`.

A client that drops out after the key sharing is recovered by the protocol (its masks are
rebuilt from the others' secret shares) as long as a threshold of its neighbours answers.
The quantisation is SecAgg+'s: values clipped to ``[-clip, clip]`` (a client refuses to send
an adapter outside it), ``2**22`` levels, sums modulo ``2**32``; the mean is exact to about
``clip / 2**21``.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    bytes_to_ndarray,
    ndarray_to_bytes,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow

# SecAgg+'s fixed point: 2**22 levels over [-clip, clip], sums modulo 2**32 (Flower's defaults).
QUANTIZATION_RANGE = 2**22
MODULUS_RANGE = 2**32


def asks_secagg(msg: Message) -> bool:
    """Whether ``msg`` is a stage of the SecAgg+ protocol."""
    return RECORD_KEY_CONFIGS in msg.content.config_records


def secagg_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``secaggplus_mod`` for the protocol's messages; every other message goes
    straight to the handler (the mod would refuse a ``train`` message without its stage)."""
    from flwr.client.mod import secaggplus_mod

    if asks_secagg(msg):
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def sorted_leaves(record) -> list[np.ndarray]:
    """The arrays of a tree record (:func:`records.to_record`) in the order of their paths:
    the one order both sides agree on without sending names."""
    return [record[key].numpy() for key in sorted(record.keys())]


def keep_pending(context: Context, secure_form, *, round_: int, num_examples: int,
                 clip: float) -> None:
    """A client's half of a secure round's ``train``: it keeps what it will sum
    (``secure_form``, a tree of host arrays) and its weight in its node state, for
    :func:`masked_reply`; nothing of it goes into the ``train`` reply."""
    from ffrag_jax.federated.flower import records

    context.state["pending"] = records.to_record(secure_form)
    context.state["pending_meta"] = ConfigRecord({
        "round": round_, "num_examples": num_examples, "clip": float(clip)})


def masked_reply(msg: Message, context: Context) -> Message:
    """The client's answer to the masked-vectors stage: its pending adapter as the ``FitRes``
    that ``secaggplus_mod`` masks (the plain arrays never leave: the mod clears them). A
    UserError when it holds none for this round or a value lies outside ``[-clip, clip]``."""
    from ffrag_jax.errors import UserError

    round_ = int(msg.content.config_records["fitins.config"]["round"])
    meta = context.state.config_records.get("pending_meta")
    if meta is None or int(meta["round"]) != round_:
        raise UserError(f"holds no trained adapter of round {round_ + 1} to aggregate")
    arrays, clip = sorted_leaves(context.state["pending"]), float(meta["clip"])
    largest = max((float(np.max(np.abs(a))) for a in arrays if a.size), default=0.0)
    if not np.isfinite(largest) or largest > clip:
        raise UserError(f"its adapter holds {largest:g}, outside the secure aggregation's "
                        f"range [-{clip:g}, {clip:g}] (fl.flower.secagg_clip)")
    fitres = FitRes(Status(Code.OK, ""), Parameters(
        tensors=[ndarray_to_bytes(a) for a in arrays], tensor_type="numpy.ndarray"),
        num_examples=int(meta["num_examples"]), metrics={})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


@dataclasses.dataclass
class _Proxy:
    """What the workflow reads of a legacy ClientProxy."""

    node_id: int


class _Capture(LegacyStrategy):
    """The legacy strategy the workflow drives: it configures the chosen nodes and keeps the
    unmasked mean (the workflow hands it to ``aggregate_fit`` as every result's parameters)."""

    def __init__(self, nodes: list[int], round_: int):
        self.nodes, self.round, self.mean, self.contributed = nodes, round_, None, []

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        ins = FitIns(Parameters(tensors=[], tensor_type="numpy.ndarray"),
                     {"round": self.round})
        return [(_Proxy(node), ins) for node in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        if results:
            self.mean = [bytes_to_ndarray(t) for t in results[0][1].parameters.tensors]
            self.contributed = [proxy.node_id for proxy, _ in results]
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def secure_mean(grid, nodes: list[int], template, *, round_: int, max_weight: float,
                clip: float, timeout: float | None, threshold: float = 0.7):
    """SecAgg+ over ``nodes`` (each holding its pending adapter of round ``round_``):
    ``(mean, contributed)``, the weighted mean in ``template``'s structure (host numpy) and
    the node ids it is over; ``(None, [])`` when too few clients answered for the protocol to
    finish. ``max_weight``: at least the largest example count; ``threshold``: the fraction of
    a client's neighbours whose shares rebuild its masks."""
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    context.state["config"] = ConfigRecord({"current_round": round_ + 1})
    context.state["parameters"] = ArrayRecord()
    capture = _Capture(nodes, round_)
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=1), strategy=capture)
    SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=threshold,
                       max_weight=max_weight, clipping_range=clip,
                       quantization_range=QUANTIZATION_RANGE, modulus_range=MODULUS_RANGE,
                       timeout=timeout)(grid, legacy)
    if capture.mean is None:
        return None, []
    paths = sorted(jax.tree_util.keystr(p)
                   for p, _ in jax.tree_util.tree_flatten_with_path(template)[0])
    by_path = dict(zip(paths, capture.mean, strict=True))
    leaves = []
    for p, like in jax.tree_util.tree_flatten_with_path(template)[0]:
        leaves.append(np.asarray(by_path[jax.tree_util.keystr(p)], like.dtype)
                      .reshape(like.shape))
    return jax.tree.unflatten(jax.tree.structure(template), leaves), capture.contributed
