"""The FF-RAG client on the Flower engine: one client of the demo's job (``task="ffrag"``) on
the node that holds its knowledge, answering the server's ``query``, ``train`` and
``evaluate`` messages (the ClientApp of :mod:`ffrag_jax.federated.flower.client` hands them
here).

The node builds what is its own and never sends it: its case base (embedded by the frozen
passage encoder), the shared authoritative base it may read, its training and held-out
questions. It trains with the same function as the local engine
(:func:`ffrag_jax.jobs.ffrag_client.train_client`) from the starts the strategy gives its
view of the server state, clips and noises its update with client-level DP when the run asks,
and sends only its adapters (generator and query encoder, in the payload codec). It evaluates
the global and its fused model on its held-out questions and sends the metrics, never the
questions or the answers.

Every message carries the node's whole view of the server state (per model: the global
adapter, its own personal row), so a node holds no state between messages and any node can
answer any message (a restarted server, a restarted node).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from ffrag_jax import federated, rag
from ffrag_jax.config_types import LoRASection
from ffrag_jax.data.knowledge import client_knowledge
from ffrag_jax.federated import privacy, strategies
from ffrag_jax.federated.flower import records, secagg
from ffrag_jax.jobs import ffrag as job
from ffrag_jax.jobs.ffrag_client import evaluate_client, train_client, training_questions
from ffrag_jax.models import hf
from ffrag_jax.retrieval.encoder import TextEncoder
from ffrag_jax.training import sharding, train

MODELS = ("generator", "retriever")


class FFRAGNode:
    """Client ``k`` of the FF-RAG run whose config is ``config``: what a process rebuilds
    from the config and the published base model (``base_dir``)."""

    task = "ffrag"

    def __init__(self, config, k: int, base_dir: str):
        from ffrag_jax.jobs.base_model import model_config
        from ffrag_jax.training.run import compilation_cache, default_cache_dir

        self.config, self.k = config, k
        setting = config.get("compilation_cache", "auto")
        compilation_cache(default_cache_dir() if setting == "auto" else setting)
        fl, r = config.fl, config.rag
        self.strategy = job.strategy_of(config)
        self.tokenizer = hf.load_tokenizer(base_dir)
        self.gen_cfg, self.params = model_config(config, self.tokenizer)
        if self.params is None:  # the tiny model, as the server pretrained and published it
            self.params = hf.load_llama(base_dir, dtype=config.model.dtype,
                                        param_dtype=config.model.param_dtype)[1]
        self.params = sharding.on_one_device(self.params)
        self.enc = TextEncoder.load(config.retriever.path)
        shared, clients = client_knowledge(config)
        self.client = clients[k]
        del clients  # a node keeps its own knowledge only
        self.client.train = rag.drop_long_answers(
            self.tokenizer, training_questions(config, self.client), r.answer_len,
            f"client {self.client.name}")
        self.sources = job.client_sources(config, k, self.client,
                                          job.shared_knowledge_base(shared, self.enc), self.enc)
        self.sections = {name: LoRASection.read(config, name) for name in MODELS}
        self.ranks = {name: tuple(s.client_ranks(fl.num_clients))
                      for name, s in self.sections.items()}
        self.bases = {"generator": self.params, "retriever": self.enc.params}
        self.rng = jax.random.key(config.seed)
        loss_cfg = rag.RagLossConfig(weights=tuple((n, float(v)) for n, v in r.losses.items()),
                                     score_scale=r.score_scale, tau_lm=r.tau_lm)
        opt_gen = self.strategy.client_optimizer(
            train.make_optimizer(fl.lr, fl.local_steps, warmup_steps=0))
        opt_ret = self.strategy.client_optimizer(
            train.make_optimizer(fl.retriever_lr, fl.local_steps, warmup_steps=0))
        self.static = dict(gen_cfg=self.gen_cfg, enc_cfg=self.enc.cfg, loss_cfg=loss_cfg,
                           optimizers=(opt_gen, opt_ret))
        self.dp = privacy.from_config(fl)
        self.view_like = jax.eval_shape(lambda: view_like(self))

    # -- the node's view of the server state ----------------------------------------------

    def view(self, msg: Message) -> dict:
        """``{model: server state}`` as the message brings it, with the base weights (which
        every party has) put back; personal rows are ``[1, ...]``."""
        view = records.from_record(msg.content["view"], self.view_like, who="the server")
        return {name: {"params": self.bases[name], **jax.tree.map(jnp.asarray, v)}
                for name, v in view.items()}

    # -- a round --------------------------------------------------------------------------

    def train(self, rnd: int, view: dict) -> tuple[dict, list[dict]]:
        """Round ``rnd``'s local training from ``view``: ``({model: trained adapter at the
        largest rank, as the server stacks it}, train records)``. The same keys, starts and
        steps as the local engine gives this client."""
        fl, k, s = self.config.fl, self.k, self.strategy
        # (No fresh adapters: the strategies that start from them, stacking, change the base
        # weights and are refused on this engine, ffrag_server.check.)
        starts = {name: federated.client(s.client_start(view[name], jnp.asarray([0]), None),
                                         0) for name in MODELS}
        gen_rank, top = self.ranks["generator"][k], max(self.ranks["generator"])
        starts["generator"] = federated.unpad_rank(starts["generator"], gen_rank)
        frozen = sharding.on_one_device({name: s.round_params(view[name])[0]
                                         for name in MODELS})
        rngs = [jax.random.fold_in(self.rng, rnd * 100_000 + k * 1000 + step)
                for step in range(fl.local_steps)]
        logged = {step for step in range(1, fl.local_steps + 1)
                  if step % self.config.log_every == 0 or step == fl.local_steps}
        out_records = []

        def on_step(step: int, out: dict) -> None:
            if step in logged:
                out = {n: float(v) for n, v in sharding.to_host(out).items()}
                out_records.append(dict(kind="train", phase="ffrag", round=rnd, client=k,
                                        name=self.client.name,
                                        step=(rnd - 1) * fl.local_steps + step, **out))

        gen, ret = train_client(self.config, self.client, self.sources, self.enc,
                                self.tokenizer, (rnd, k), frozen, self.static,
                                starts["generator"], starts["retriever"], rngs,
                                on_step=on_step)
        updated = {"generator": federated.pad_rank(federated.unpad_rank(gen, gen_rank), top),
                   "retriever": ret}
        if self.dp is not None:  # clipped and noised here, before anything leaves
            private = {n: u for n, u in updated.items()
                       if n != "retriever" or fl.retriever_lr > 0}
            begin = {"generator": federated.pad_rank(starts["generator"], top),
                     "retriever": starts["retriever"]}
            masks = {n: federated.rank_mask(self.ranks[n][k], max(self.ranks[n]))[None]
                     for n in private}
            key = jax.random.split(jax.random.fold_in(self.rng, 7919 * rnd),
                                   fl.num_clients)[k]
            noised = privacy.privatise(
                {n: jax.tree.map(lambda x: x[None], u) for n, u in private.items()},
                {n: jax.tree.map(lambda x: x[None], begin[n]) for n in private},
                masks, key[None], self.dp)
            updated.update({n: federated.client(u, 0) for n, u in noised.items()})
        return updated, out_records

    def evaluate(self, rnd: int, view: dict, base: bool) -> list[dict]:
        """This client's eval records of round ``rnd`` (``base``: the base model, round 0),
        as the local engine writes them for it."""
        c, s, k = self.client, self.strategy, self.k
        last = rnd == self.config.fl.rounds
        if base:
            m = evaluate_client(self.config, c, self.sources, self.enc, self.params, None,
                                self.gen_cfg, self.tokenizer, closed_book=True)
            return [dict(kind="eval", round=0, client=k, name=c.name, model="base", **m)]
        gen_global = job.merged(s.global_model(view["generator"]))
        query_global = dataclasses.replace(
            self.enc, params=job.merged(s.global_model(view["retriever"])))
        models = [("global", None, None)]
        if s.personalised:
            models.append(("fused", federated.unpad_rank(
                s.client_adapter(view["generator"], 0), self.ranks["generator"][k]),
                s.client_adapter(view["retriever"], 0)))
        out = []
        for model, gen_lora, ret_lora in models:
            m = evaluate_client(self.config, c, self.sources,
                                dataclasses.replace(query_global, lora=ret_lora), gen_global,
                                gen_lora, self.gen_cfg, self.tokenizer,
                                closed_book=last and model == models[-1][0])
            out.append(dict(kind="eval", round=rnd, client=k, name=c.name, model=model, **m))
        return out


def view_like(node: FFRAGNode) -> dict:
    """A node's view (call it under ``jax.eval_shape``): per model, its part of the server
    state (:func:`server_view`)."""
    trees = {name: (node.bases[name], node.ranks[name]) for name in MODELS}
    return {name: server_view(node.strategy, state, node.k) for name, state in
            job.initial_server(node.strategy, node.sections, trees, node.rng).items()}


def server_view(strategy: strategies.Strategy, state: dict, k: int) -> dict:
    """Client ``k``'s part of one model's server state: the global adapter (if the strategy
    has one) and its own personal row ``[1, ...]`` (personalised strategies); the base
    weights stay out (every party has them: strategies that change them are refused on this
    engine)."""
    view = {}
    if "global" in state:
        view["global"] = state["global"]
    if strategy.personalised:
        view["personal"] = jax.tree.map(lambda x: x[k:k + 1], state["personal"])
    return view


# -- the ClientApp's handlers for an FF-RAG run ------------------------------------------------


def query(node: FFRAGNode, msg: Message) -> Message:
    return Message(RecordDict({
        "info": MetricRecord({"partition": node.k, "num_examples": len(node.client.train)}),
        "name": ConfigRecord({"name": node.client.name})}), reply_to=msg)


def train_reply(node: FFRAGNode, msg: Message, context: Context) -> Message:
    """The trained adapters in the payload codec with the train records; in a secure round
    (``fl.flower.secagg``) the records only: the adapters wait in the node state for SecAgg+,
    which sends them masked."""
    task = msg.content["task"]
    t = int(task["round"])
    updated, recs = node.train(t + 1, node.view(msg))
    reply = {"records": ConfigRecord({"json": json.dumps(recs)})}
    if bool(task.get("secagg", False)):
        secagg.keep_pending(context, {name: jax.tree.map(np.asarray,
                                                         node.strategy.secure_form(u))
                                      for name, u in updated.items()},
                            round_=t, num_examples=len(node.client.train),
                            clip=node.config.fl.flower.secagg_clip)
    else:
        reply.update({f"update.{name}": records.encode(jax.tree.map(np.asarray, u),
                                                       node.strategy.payload)
                      for name, u in updated.items()})
    return Message(RecordDict(reply), reply_to=msg)


def evaluate_reply(node: FFRAGNode, msg: Message) -> Message:
    task = msg.content["task"]
    recs = node.evaluate(int(task["round"]), node.view(msg), bool(task["base"]))
    return Message(RecordDict({"records": ConfigRecord({"json": json.dumps(recs)})}),
                   reply_to=msg)
