"""The Flower ClientApp of the federated LoRA job: one client, on the node that holds its
data.

A node keeps what is its own: its data (never sent), its personal adapter (personalised
strategies) and its *view* of the server state: the base weights (as merged so far, for
FLoRA stacking), the global adapter it last downloaded, its own personal row. The view lives
in the node's ``context.state`` between messages; what can be rebuilt from the config (the
tokenizer, the encoded data, compiled steps) is cached per process.

Messages (the server side is :mod:`ffrag_jax.federated.flower.server`):

* ``query``: the node checks its partition against the run's config and answers with its
  partition id, example count and longest sequence (to agree on one padded width);
* ``train``: round ``t``; the node trains from its view (:func:`round_step.train_clients`,
  the same jitted function the local engine vmaps) and sends its trained adapter (with
  secure aggregation, ``fl.flower.secagg``: keeps it for the SecAgg+ stages that follow,
  :mod:`~ffrag_jax.federated.flower.secagg`, and sends its losses only);
* ``evaluate``: after the server's aggregation, what changed (the new global adapter, or for
  stacking the round's received adapters to merge exactly as the server did) and whether the
  node's update was accepted; the node updates its view and sends held-out metrics.

Every message carries the config (JSON) and, when the node may not hold the current view
(its first message, a restarted server), the whole view: any node can answer any message.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ffrag_jax import federated
from ffrag_jax.config_types import LoRASection
from ffrag_jax.data import text
from ffrag_jax.data.clients import client_records, encode_clients, pairs_of
from ffrag_jax.errors import UserError
from ffrag_jax.federated import strategies
from ffrag_jax.federated.flower import records, secagg
from ffrag_jax.jobs import lm_clients

app = ClientApp()

_NODES: dict[tuple[str, int], ClientNode] = {}


def partition_of(context: Context, num_clients: int) -> int:
    """This node's client id from its node config (``partition-id``, ``num-partitions``: set
    by Flower's simulation, or ``flower-supernode --node-config``); a UserError when it does
    not fit the run."""
    node = context.node_config
    if "partition-id" not in node:
        raise UserError("this SuperNode has no partition-id in its --node-config; start it "
                        "with --node-config \"partition-id=K num-partitions=N\"")
    k = int(node["partition-id"])
    count = int(node.get("num-partitions", num_clients))
    if count != num_clients:
        raise UserError(f"node config num-partitions={count} but the server's run has "
                        f"fl.num_clients={num_clients}")
    if not 0 <= k < num_clients:
        raise UserError(f"node config partition-id={k} is outside 0..{num_clients - 1}")
    return k


class ClientNode:
    """Client ``k`` of the run whose config is ``config`` (what a process can rebuild)."""

    task = "federated"

    def __init__(self, config, k: int, base_dir: str):
        from ffrag_jax.jobs.base_model import model_config
        from ffrag_jax.jobs.federated import clients_per_round, init_server
        from ffrag_jax.models import hf
        from ffrag_jax.training.run import compilation_cache, default_cache_dir

        self.config, self.k = config, k
        fl = config.fl
        # A SuperNode starts a new process per message: without the persistent cache every
        # message would compile the client's steps again (on CPU too; the cache changes no
        # result).
        setting = config.get("compilation_cache", "auto")
        compilation_cache(default_cache_dir() if setting == "auto" else setting)
        self.strategy = strategies.from_config(fl)
        self.tokenizer = hf.load_tokenizer(base_dir)
        # A real checkpoint (model.path): every party has it; the tiny model: the server
        # published it once as an HF folder.
        self.cfg, self.base = model_config(config, self.tokenizer)
        if self.base is None:
            self.base = hf.load_llama(base_dir, dtype=config.model.dtype,
                                      param_dtype=config.model.param_dtype)[1]
        adapters = LoRASection.read(config, "generator")
        self.ranks = adapters.client_ranks(fl.num_clients)
        server_rng = jax.random.split(jax.random.key(config.seed), 3)[1]
        self.template = adapters.init(server_rng, self.base, max(self.ranks))
        # What crosses the wire and node state: the base weights only when rounds change
        # them (stacking); otherwise every party has them already.
        self.view_like = jax.eval_shape(lambda: view_of(self.strategy, init_server(
            self.strategy, self.base, self.template, fl.num_clients, clients_per_round(fl),
            max(self.ranks), server_rng), 0))
        if not self.strategy.changes_base:
            del self.view_like["params"]
        names, recs, is_synthetic = client_records(config)
        self.name = names[k]
        self.pairs = pairs_of(recs[k], is_synthetic, config.data)
        # Encoded once, uncut: cut to the width the server announces (every client's longest).
        self.encoded = encode_clients(config, self.tokenizer, [self.pairs], [k],
                                      width=config.data.max_len)
        self.longest = max(text.longest(s[0]) for s in self.encoded)
        self.num_examples = len(self.encoded[0][0]["input_ids"])
        self.data: lm_clients.ClientData | None = None
        self.train_fn = lm_clients.make_train_fn(config, self.cfg, self.strategy)
        self.aggregate_fn = lm_clients.make_aggregate_fn(self.strategy)
        # A secure round (fl.flower.secagg): what a client sums, and the server's rule on
        # the mean (a stacking node replays it on its base weights).
        self.secure_like = jax.eval_shape(self.strategy.secure_form, self.template)
        self.mean_fn = jax.jit(self.strategy.aggregate_mean)
        self.evaluate_fn = lm_clients.make_evaluator(self.cfg)

    def data_at(self, width: int) -> lm_clients.ClientData:
        if self.data is None or self.data.train["input_ids"].shape[1] != width:
            train, held = text.trim_padding([s[0] for s in self.encoded],
                                            self.config.data.max_len, width=width)
            self.data = lm_clients.client_data(self.config, [self.pairs], [self.name],
                                               ([train], [held]), [self.k])[0]
        return self.data


def view_of(strategy: strategies.Strategy, server: dict, k: int) -> dict:
    """Client ``k``'s view of a server state: the base weights, the global adapter (if the
    strategy has one) and its own personal row ``[1, ...]`` (personalised strategies)."""
    view = {"params": server["params"]}
    if "global" in server:
        view["global"] = server["global"]
    if strategy.personalised:
        view["personal"] = jax.tree.map(lambda x: x[k:k + 1], server["personal"])
    return view


def node_for(msg: Message, context: Context):
    """This process's node of the message's run: a :class:`ClientNode` (the federated LoRA
    job) or an FF-RAG node (:mod:`~ffrag_jax.federated.flower.ffrag_node`), built once."""
    meta = msg.content["run"]
    config = records.config_from_json(meta["config"])
    k = partition_of(context, config.fl.num_clients)
    key = (str(meta["fingerprint"]), k)
    if key not in _NODES:
        for other in [o for o in _NODES if o[0] != key[0]]:  # one run per process at a time
            del _NODES[other]
        if config.task == "ffrag":
            from ffrag_jax.federated.flower.ffrag_node import FFRAGNode

            _NODES[key] = FFRAGNode(config, k, str(meta["base"]))
        else:
            _NODES[key] = ClientNode(config, k, str(meta["base"]))
    return _NODES[key]


def _ffrag(node) -> bool:
    return node.task == "ffrag"


def _view(node: ClientNode, msg: Message, context: Context, round_: int) -> dict:
    """The node's view at ``round_``: the one the message brings (a sync), else its own."""
    if "view" in msg.content:
        view = records.from_record(msg.content["view"], node.view_like, who="the server")
    elif "view" in context.state:
        view = records.from_record(context.state["view"], node.view_like, who="node state")
        held = int(context.state["view_meta"]["round"])
        if held != round_:
            raise UserError(f"client {node.k} holds the view of round {held}, not {round_}; "
                            "the server must send the whole view")
    else:
        raise UserError(f"client {node.k} holds no view yet and the message brings none")
    return {"params": node.base, **jax.tree.map(jnp.asarray, view)}


def _store(node: ClientNode, context: Context, view: dict, round_: int) -> None:
    if not node.strategy.changes_base:
        view = {k: v for k, v in view.items() if k != "params"}
    context.state["view"] = records.to_record(view)
    context.state["view_meta"] = ConfigRecord({"round": round_})


def _error(msg: Message, e: Exception) -> Message:
    """The reply that tells the server why this node could not do what it asked (one line;
    the node's log has the traceback of anything but a bad input)."""
    if isinstance(e, (UserError, records.RefusedUpdate)):
        reason = str(e)
    else:
        logging.exception("client failed on a %s message", msg.metadata.message_type)
        reason = f"{type(e).__name__}: {e}"
    return Message(RecordDict({"error": ConfigRecord(
        {"reason": (reason.splitlines() or [""])[0]})}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    try:
        node = node_for(msg, context)
        if _ffrag(node):
            from ffrag_jax.federated.flower import ffrag_node

            return ffrag_node.query(node, msg)
    except Exception as e:  # the server gets the reason; the node goes on
        return _error(msg, e)
    return Message(RecordDict({
        "info": MetricRecord({"partition": node.k, "num_examples": node.num_examples,
                              "longest": node.longest}),
        "name": ConfigRecord({"name": node.name})}), reply_to=msg)


@app.train(mods=[secagg.secagg_mod])
def train(msg: Message, context: Context) -> Message:
    if secagg.asks_secagg(msg):  # SecAgg+'s masked-vectors stage: the kept adapter
        return secagg.masked_reply(msg, context)
    try:
        node = node_for(msg, context)
        if _ffrag(node):
            from ffrag_jax.federated.flower import ffrag_node

            return ffrag_node.train_reply(node, msg, context)
        task = msg.content["task"]
        t, i = int(task["round"]), int(task["index"])
        selected = [int(x) for x in task["selected"]]
        view = _view(node, msg, context, t)
        if "view" in msg.content:
            _store(node, context, view, t)
        data = node.data_at(int(task["width"]))
        fresh, rng, batches = lm_clients.round_inputs(
            node.config, node.strategy, data, node.k, i, t, len(selected),
            int(task["max_steps"]), view["params"], node.template)
        one = lambda x: jax.tree.map(lambda v: jnp.asarray(v)[None], x)  # noqa: E731
        mask = federated.rank_mask(node.ranks[node.k], max(node.ranks))
        updated, metrics = node.train_fn(
            view, None if fresh is None else one(fresh), jnp.zeros((1,), jnp.int32),
            mask[None], one(batches), rng[None], jnp.asarray([data.steps], jnp.int32),
            fusion=str(task["fusion"]))
    except Exception as e:  # the server gets the reason; the node goes on
        return _error(msg, e)
    row = jax.tree.map(lambda x: np.asarray(x[0]), updated)
    context.state["pending"] = records.to_record(row)
    reply = {"metrics": MetricRecord({
        "loss": [float(x) for x in np.asarray(metrics["loss"][0])],
        "active": [int(x) for x in np.asarray(metrics["active"][0])]})}
    if bool(task.get("secagg", False)):  # the adapter leaves only masked, in SecAgg+
        secagg.keep_pending(context, jax.tree.map(np.asarray, node.strategy.secure_form(row)),
                            round_=t, num_examples=node.num_examples,
                            clip=node.config.fl.flower.secagg_clip)
    else:
        reply["update"] = records.encode(row, node.strategy.payload)
    return Message(RecordDict(reply), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    try:
        node = node_for(msg, context)
        if _ffrag(node):
            from ffrag_jax.federated.flower import ffrag_node

            return ffrag_node.evaluate_reply(node, msg)
        task = msg.content["task"]
        t, base = int(task["round"]), bool(task["base"])
        if "view" in msg.content or base:
            view = _view(node, msg, context, t)
        else:  # apply the round's download to the view of round t - 1
            view = apply_download(node, msg, context, _view(node, msg, context, t - 1))
        _store(node, context, view, t)
        out = lm_clients.evaluate_client(
            node.config, node.strategy, node.cfg, node.tokenizer, view,
            [node.data_at(int(task["width"]))], [node.k], node.evaluate_fn, base=base)
    except Exception as e:  # the server gets the reason; the node goes on
        return _error(msg, e)
    return Message(RecordDict({"records": ConfigRecord({"json": json.dumps(out)})}),
                   reply_to=msg)


def apply_download(node: ClientNode, msg: Message, context: Context, view: dict) -> dict:
    """The view after the server's aggregation: stacking replays the server's merge from the
    round's received adapters (exact: the same jitted function on the same arrays); the other
    strategies take the new global adapter; a personal row becomes the node's trained one if
    the server accepted it."""
    task = msg.content["task"]
    if node.strategy.changes_base and "mean" in msg.content:  # a secure round's mean
        mean = records.from_record(msg.content["mean"], node.secure_like, who="the server")
        return node.mean_fn(view, jax.tree.map(jnp.asarray, mean))
    if node.strategy.changes_base:
        count = int(task["count"])
        like = jax.tree.map(lambda x: jax.ShapeDtypeStruct((count,) + x.shape, x.dtype),
                            node.template)
        received = records.decode(msg.content["received"], like, node.strategy.payload,
                                  who="the server")
        weights = np.asarray(task["weights"], np.float32)
        new, _ = node.aggregate_fn(view, jax.tree.map(jnp.asarray, received),
                                   jnp.asarray([int(x) for x in task["selected"]]),
                                   jnp.asarray(weights))
        return new
    out = dict(view)
    if "global" in view:
        out["global"] = jax.tree.map(jnp.asarray, records.decode(
            msg.content["global"], view["global"], node.strategy.payload, who="the server"))
    if node.strategy.personalised and bool(task["accepted"]):
        row = records.from_record(context.state["pending"], jax.tree.map(
            lambda x: x[0], view["personal"]), who="node state")
        out["personal"] = jax.tree.map(lambda x: jnp.asarray(x)[None], row)
    return out


def base_folder(workdir: Path) -> Path:
    """Where the server publishes the tiny base model (tokenizer and weights) for its
    clients."""
    return workdir / "flower" / "base_model"


__all__ = ["app", "ArrayRecord"]
