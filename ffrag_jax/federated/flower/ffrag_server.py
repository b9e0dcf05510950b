"""The server side of federated FF-RAG (the demo's job) on the Flower engine: the same
rounds, checkpoints, records and summary as :func:`ffrag_jax.jobs.ffrag.run`, with every
client a Flower node (:mod:`~ffrag_jax.federated.flower.ffrag_node`) that holds its own case
base and questions.

The server pretrains (or loads) the base generator and publishes it for its nodes, holds the
strategy's state for the generator and the query encoder, and sends each node its view of it;
it receives trained adapters (in the payload codec) and metrics, never a passage, a question
or an answer. So it writes no ``predictions.jsonl`` and exports no system: the case bases
are the clients' (each client's adapters and its base make its system, on its node).

With ``fl.flower.secagg`` (a summable strategy), no adapter leaves a node in the clear: each
node keeps its trained adapters and Flower's SecAgg+ gives the server their weighted mean
only, from which the strategy makes its next state (:meth:`Strategy.aggregate_mean`).

Not on this engine yet: strategies that change the base weights (``stack``: the nodes would
need the merged query encoder every round), the reranker and its pre-aligned stage; each is
refused before any work.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from ml_collections import ConfigDict

from ffrag_jax import federated
from ffrag_jax.config_types import LoRASection
from ffrag_jax.data.knowledge import boundary_enabled, reading_examples
from ffrag_jax.errors import UserError
from ffrag_jax.federated import privacy
from ffrag_jax.federated.driver import RoundDriver
from ffrag_jax.federated.flower import records, secagg
from ffrag_jax.federated.flower.client import base_folder
from ffrag_jax.federated.flower.ffrag_node import MODELS, server_view
from ffrag_jax.federated.flower.server import FlowerServer, run_meta
from ffrag_jax.jobs import ffrag as job
from ffrag_jax.jobs.base_model import model_config, run_tokenizer
from ffrag_jax.jobs.ffrag_client import abstain_gate, pre_aligning, reranking
from ffrag_jax.models import hf
from ffrag_jax.retrieval.encoder import TextEncoder
from ffrag_jax.training import sharding
from ffrag_jax.training.metrics import open_log, plot_client_rounds, plot_training_loss, read_jsonl
from ffrag_jax.training.trainer import StepInfo, profiling
from ffrag_jax.training.workdir import write_summary


def check(config: ConfigDict) -> None:
    """What FF-RAG on the Flower engine cannot do yet: a UserError naming it."""
    strategy = job.strategy_of(config)
    if strategy.changes_base:
        raise UserError(f"fl.engine=flower: fl.strategy={config.fl.strategy!r} merges into "
                        "the base weights every round, which FF-RAG's nodes do not follow "
                        "yet; use ff, fedsa or an averaging strategy")
    if reranking(config) or pre_aligning(config):
        raise UserError("fl.engine=flower: the reranker (rerank.enabled, "
                        "rerank.pre_align_steps) runs on the local engine only")
    if config.fl.vmap_clients:
        raise UserError("fl.engine=flower: every client trains on its own node; "
                        "fl.vmap_clients=True is the local engine's batching")


class FFRAGFlower(FlowerServer):
    """The FF-RAG clients as Flower nodes: their rounds and evaluations."""

    def __init__(self, grid, config, strategy, base: Path, template: dict, ranks: dict):
        super().__init__(grid, config, run_meta(config, base))
        self.strategy, self.template, self.ranks = strategy, template, ranks
        self.secure = bool(self.flower.secagg)  # fl.flower.secagg: the mean, never a row
        self.secure_like = jax.eval_shape(
            lambda t: {name: strategy.secure_form(t[name]) for name in MODELS}, template)
        found = self.query_nodes()
        n = config.fl.num_clients
        self.nodes = {k: node for k, (node, _) in found.items()}
        self.names = [str(found[k][1].content["name"]["name"]) for k in range(n)]
        self.counts = [int(found[k][1].content["info"]["num_examples"]) for k in range(n)]
        logging.info("Flower: %d FF-RAG clients on nodes %s", n, [self.nodes[k] for k in range(n)])

    def _view(self, host: dict, k: int) -> dict:
        return {"view": records.to_record({name: server_view(self.strategy, host[name], k)
                                           for name in MODELS})}

    def round(self, server: dict, t: int, selected: list[int]):
        """Round ``t`` (0-based): ``({model: client adapters [K, ...]}, accepted [K], train
        records, refused {client: reason})``; in a secure round the first is ``{model: the
        accepted clients' weighted mean of their secure form}``."""
        host = sharding.to_host(server)
        replies = self._send([self._message(self.nodes[k], "train",
                                            {"round": t, "secagg": self.secure},
                                            self._view(host, k)) for k in selected],
                             self.flower.round_timeout)
        rows, recs, refused = [], [], {}
        for k in selected:
            reply = replies.get(self.nodes[k])
            reason = self._reason(reply)
            row = None
            if reason is None and self.secure:  # it keeps its adapters for SecAgg+
                recs += json.loads(str(reply.content["records"]["json"]))
                continue
            if reason is None:
                try:
                    row = {name: records.decode(reply.content[f"update.{name}"],
                                                self.template[name], self.strategy.payload,
                                                who=f"client {k}") for name in MODELS}
                except records.RefusedUpdate as e:
                    reason = str(e)
            if row is None:
                refused[k] = reason
                logging.warning("round %d: client %d (%s) left out: %s", t + 1, k,
                                self.names[k], reason)
                row = jax.tree.map(np.zeros_like, self.template)
            else:
                recs += json.loads(str(reply.content["records"]["json"]))
            rows.append(row)
        if self.secure:
            mean = self._secure_mean(t, selected, refused)
            return mean, np.asarray([k not in refused for k in selected]), recs, refused
        self._enough(t, selected, refused)
        updated = {name: federated.stack_clients([r[name] for r in rows]) for name in MODELS}
        accepted = np.asarray([k not in refused for k in selected])
        return updated, accepted, recs, refused

    def _secure_mean(self, t: int, selected: list[int], refused: dict) -> dict:
        """SecAgg+ over the clients that trained (and hold examples): ``{model: weighted
        mean}``. A client that drops out of the protocol is named and left out (the others'
        shares rebuild its masks); too few to finish is a UserError."""
        trained = [k for k in selected if k not in refused and self.counts[k] > 0]
        mean, nodes = (None, []) if len(trained) < 2 else secagg.secure_mean(
            self.grid, [self.nodes[k] for k in trained], self.secure_like, round_=t,
            max_weight=float(max(self.counts)), clip=self.flower.secagg_clip,
            timeout=self.flower.round_timeout)
        for k in selected:
            if k not in refused and self.nodes[k] not in nodes:
                refused[k] = ("dropped out of secure aggregation" if k in trained
                              else "holds no examples")
                logging.warning("round %d: client %d (%s) left out: %s", t + 1, k,
                                self.names[k], refused[k])
        if mean is None:
            raise UserError(f"round {t + 1}: secure aggregation did not finish with clients "
                            f"{trained} (it needs at least 2, and enough of them to answer "
                            "every stage); left out: " + str(refused))
        self._enough(t, selected, refused)
        return mean

    def evaluate(self, server: dict, rnd: int, *, base: bool = False) -> list[dict]:
        """Every client's eval records after round ``rnd`` (``base``: of the base model)."""
        host = sharding.to_host(server)
        n = len(self.names)
        replies = self._send([self._message(self.nodes[k], "evaluate",
                                            {"round": rnd, "base": base}, self._view(host, k))
                              for k in range(n)], self.flower.round_timeout)
        out = []
        for k in range(n):
            reply = replies.get(self.nodes[k])
            reason = self._reason(reply)
            if reason:
                logging.warning("evaluation of round %d: client %d (%s) left out: %s", rnd, k,
                                self.names[k], reason)
                continue
            out += json.loads(str(reply.content["records"]["json"]))
        return out


def run(config: ConfigDict, workdir: Path, mesh: jax.sharding.Mesh, grid) -> dict:
    """The FF-RAG job with its clients on Flower nodes reached through ``grid``; returns the
    summary (the local engine's for the same config)."""
    started = time.perf_counter()
    fl = config.fl
    metrics = open_log(workdir)
    tokenizer = run_tokenizer(config, workdir, ())  # given (checked): no client text needed
    abstain_gate(config, tokenizer)
    gen_cfg, params = model_config(config, tokenizer)
    rng = jax.random.key(config.seed)
    enc = TextEncoder.load(config.retriever.path)
    sections = {name: LoRASection.read(config, name) for name in MODELS}
    ranks = {name: tuple(s.client_ranks(fl.num_clients)) for name, s in sections.items()}
    params = job.base_generator(config, gen_cfg, params, tokenizer, reading_examples(config),
                                rng, mesh, workdir, metrics)
    base = base_folder(workdir)
    if not config.model.path:  # publish the tiny base model (a real one: every party has it)
        hf.save_llama(base, gen_cfg, sharding.to_host(params), tokenizer=tokenizer,
                      overwrite=True)
    strategy, dp = job.strategy_of(config), privacy.from_config(fl)
    trees = {"generator": (params, ranks["generator"]), "retriever": (enc.params,
                                                                      ranks["retriever"])}
    server = job.initial_server(strategy, sections, trees, rng)
    # What one client sends of each model: its adapter at the model's largest rank.
    template = jax.tree.map(np.asarray, {name: sections[name].init(rng, base_, max(r))
                                         for name, (base_, r) in trees.items()})
    flower = FFRAGFlower(grid, config, strategy, base, template, ranks)
    driver = RoundDriver(strategy, name="ffrag", ckpt_dir=workdir / "checkpoints",
                         metrics=metrics, rounds=fl.rounds, client_sizes=flower.counts,
                         servers=tuple(trees), wait_each_save=True,
                         profile=profiling(config, workdir))
    done, server = driver.initial_state(sharding.on_one_device(server))

    if not any(x.get("kind") == "eval" and x.get("round") == 0
               for x in read_jsonl(metrics.path)):
        for rec in flower.evaluate(server, 0, base=True):
            metrics.write(**rec)

    def one_round(server: dict, t: int, selected: list[int], weights: np.ndarray):
        rnd = t + 1
        updated, accepted, recs, refused = flower.round(server, t, selected)
        for rec in recs:
            metrics.write(**rec)
        if dp is not None:  # each client clipped and noised its update before sending it
            metrics.write(kind="privacy", round=rnd, **privacy.spent(
                dp, [rnd] * len(selected), fl.dp.delta))
        for i, k in enumerate(selected):
            sizes = [strategy.payload_bytes(template[name] if flower.secure else
                                            federated.client(updated[name], i), r[k],
                                            0 if rnd == 1 else sum(r))
                     for name, (_, r) in trees.items()] if k not in refused else []
            metrics.write(kind="payload", round=rnd, client=k, name=flower.names[k],
                          upload_bytes=sum(u for u, _ in sizes),
                          download_bytes=sum(d for _, d in sizes))
        if flower.secure:  # updated: the accepted clients' weighted mean, nothing else
            return sharding.on_one_device({
                name: strategy.aggregate_mean(server[name], jax.tree.map(jnp.asarray,
                                                                         updated[name]))
                for name in server}), {}
        # The local engine's weights when every client answered (renormalising would change
        # their last bits); the answered clients' p_k renormalised otherwise.
        w = weights if accepted.all() else np.where(accepted, weights, 0.0) / np.sum(
            np.where(accepted, weights, 0.0))
        everyone = np.asarray(selected)
        updated = sharding.on_one_device(updated)
        return sharding.on_one_device({
            name: strategy.server_update(server[name], updated[name], w, accepted, everyone,
                                         trees[name][1])
            for name in server}), {}

    def evaluate_round(info: StepInfo) -> None:
        for rec in flower.evaluate(info.state, info.step):
            metrics.write(**rec)

    driver.add_hook(evaluate_round)
    driver.run(server, one_round, done)
    logging.info("Flower: the clients' case bases and adapters stay on their nodes; no "
                 "system is exported by the server")
    records_ = read_jsonl(metrics.path)
    panels = [("eval", "recall@1", "retrieval recall@1"), ("eval", "rag_em", "RAG exact match")]
    if boundary_enabled(config):
        panels += [("eval", "hallucination_rate", "hallucination rate"),
                   ("eval", "abstain_f1", "abstention F1")]
    plot_client_rounds(records_, workdir / "rounds.png",
                       "ffrag_jax FF-RAG on Flower: held-out questions", panels=panels)
    plot_training_loss(records_, workdir / "loss.png", title="ffrag_jax FF-RAG on Flower")
    summary = job.summarize(records_, fl.rounds)
    if dp is not None:
        summary["dp"] = privacy.spent(dp, [fl.rounds] * fl.num_clients, fl.dp.delta)
    summary["wall_time_s"] = round(time.perf_counter() - started, 1)
    metrics.close()
    return write_summary(workdir, summary)
