"""The server side of the Flower engine for the federated LoRA job: the job's
:class:`~ffrag_jax.jobs.lm_clients.Clients` over a Flower ``Grid``.

The server holds the strategy's state (the same dict, the same checkpoints as the local
engine) and never any client data. A round sends each selected client a ``train`` message
and aggregates the adapters that come back with the same jitted function as the local
engine (:func:`~ffrag_jax.federated.round_step.aggregate_clients`); then every client gets an
``evaluate`` message with what changed and answers with its held-out metrics.

Faults: a client that does not answer within ``fl.flower.round_timeout`` seconds, answers with
an error, or sends an adapter with other paths, shapes or dtypes, or with non-zero components
beyond its rank, is left out of the round (weight 0) and named in the log and in its
``client`` record (``refused``); the round goes on if at least ``fl.flower.min_fraction`` of the
selected clients answered. A client whose state is unknown (it missed a message, or the server
restarted) gets the whole view in its next message.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flwr.app import ConfigRecord, Message, RecordDict

from ffrag_jax import data, federated
from ffrag_jax.data import text
from ffrag_jax.errors import UserError
from ffrag_jax.federated.flower import records, secagg
from ffrag_jax.federated.flower.client import base_folder, view_of
from ffrag_jax.jobs import lm_clients
from ffrag_jax.models import hf
from ffrag_jax.training import sharding


class FlowerServer:
    """What the server side of every job on the Flower engine does: message its nodes (each
    message carries the run's config and fingerprint), wait for answers within a timeout,
    name a node that fails, find which node holds which client."""

    def __init__(self, grid, config, run_meta: ConfigRecord):
        self.grid, self.config, self.run_meta = grid, config, run_meta
        self.flower = config.fl.flower

    def query_nodes(self) -> dict[int, tuple[int, Message]]:
        """Waits for ``fl.num_clients`` nodes and asks each its partition: ``{client: (node
        id, its answer)}``; a UserError naming the clients without a node that answered."""
        n = self.config.fl.num_clients
        deadline = time.monotonic() + self.flower.connect_timeout
        while len(list(self.grid.get_node_ids())) < n:
            if time.monotonic() > deadline:
                raise UserError(f"only {len(list(self.grid.get_node_ids()))} of "
                                f"fl.num_clients={n} SuperNodes connected within "
                                f"fl.flower.connect_timeout={self.flower.connect_timeout} s; "
                                "are they started and pointed at this SuperLink?")
            time.sleep(0.5)
        node_ids = sorted(self.grid.get_node_ids())
        replies = self._send([self._message(node, "query", {}) for node in node_ids],
                             self.flower.connect_timeout)
        found, problems = {}, []
        for node in node_ids:
            reply = replies.get(node)
            reason = self._reason(reply)
            if reason:
                problems.append(f"SuperNode {node}: {reason}")
                continue
            k = int(reply.content["info"]["partition"])
            if k in found:
                problems.append(f"SuperNodes {found[k][0]} and {node} both hold partition {k}")
                continue
            found[k] = (node, reply)
        missing = [k for k in range(n) if k not in found]
        if missing:
            raise UserError(f"client(s) {missing} have no SuperNode: "
                            + "; ".join(problems or ["no node answered for them"]))
        for p in problems:  # extra nodes that failed: not needed for this run
            logging.warning("%s; left out", p)
        return found

    def _message(self, node: int, kind: str, task: dict, arrays: dict | None = None
                 ) -> Message:
        content = RecordDict({"run": self.run_meta, "task": ConfigRecord(task),
                              **(arrays or {})})
        return Message(content=content, dst_node_id=node, message_type=kind)

    def _send(self, messages: list[Message], timeout: float) -> dict[int, Message]:
        """The replies by sending node (absent: no answer within ``timeout`` seconds). Stops
        waiting early for nodes the SuperLink no longer lists (a node that died)."""
        alive = set(self.grid.get_node_ids())
        live = [m for m in messages if m.metadata.dst_node_id in alive]
        ids = list(self.grid.push_messages(live))
        dst = {i: m.metadata.dst_node_id for i, m in zip(ids, live, strict=True) if i}
        replies, pending = {}, set(dst)
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                pending.discard(reply.metadata.reply_to_message_id)
                replies[reply.metadata.src_node_id] = reply
            if pending:
                alive = set(self.grid.get_node_ids())
                if all(dst[i] not in alive for i in pending):
                    break
                time.sleep(0.1)
        return replies

    @staticmethod
    def _reason(reply: Message | None) -> str | None:
        if reply is None:
            return "no answer in time"
        if reply.has_error():
            return f"error: {reply.error.reason.splitlines()[0] if reply.error.reason else ''}"
        if "error" in reply.content:
            return str(reply.content["error"]["reason"])
        return None

    def _enough(self, t: int, selected, refused: dict) -> None:
        """A UserError unless ``fl.flower.min_fraction`` of the selected clients answered."""
        answered = len(selected) - len(refused)
        needed = math.ceil(self.flower.min_fraction * len(selected))
        if answered < needed:
            raise UserError(f"round {t + 1}: only {answered} of {len(selected)} clients "
                            f"answered (fl.flower.min_fraction={self.flower.min_fraction}); "
                            f"left out: {refused}")


def run_meta(config, base: Path) -> ConfigRecord:
    """What every message carries: the config (JSON), its fingerprint, the folder of the
    published base model."""
    return ConfigRecord({"config": records.config_to_json(config),
                         "fingerprint": records.fingerprint(config), "base": str(base)})


class FlowerClients(FlowerServer, lm_clients.Clients):
    """The job's clients as Flower nodes reached through ``grid``."""

    def __init__(self, grid, config, strategy, cfg, tokenizer, params, template, ranks,
                 workdir):
        base = base_folder(workdir)
        if not config.model.path:  # publish the tiny base model (a real one: every party has it)
            hf.save_llama(base, cfg, sharding.to_host(params), tokenizer=tokenizer,
                          overwrite=True)
        super().__init__(grid, config, run_meta(config, base))
        self.strategy = strategy
        self.template, self.ranks = sharding.to_host(template), ranks
        self.codec = strategy.payload  # adapters travel in it (fl.payload), both ways
        self.aggregate_fn = lm_clients.make_aggregate_fn(strategy)
        self.secure = bool(self.flower.secagg)
        if self.secure:  # the server's half from the securely summed mean
            self.mean_fn = jax.jit(strategy.aggregate_mean)
        self.synced: dict[int, int] = {}  # client -> round of the view it holds (none: unknown)
        self.last: dict = {}
        self.connect()

    # -- setup ----------------------------------------------------------------------------

    def connect(self) -> None:
        """Finds every client's node; sets ``nodes`` (client -> node id), ``names``,
        ``counts``, ``steps`` and the common ``width``."""
        n, fl = self.config.fl.num_clients, self.config.fl
        found = self.query_nodes()
        self.nodes = {k: node for k, (node, _) in found.items()}
        info = {k: (reply.content["info"], str(reply.content["name"]["name"]))
                for k, (_, reply) in found.items()}
        self.names = [info[k][1] for k in range(n)]
        self.counts = [int(info[k][0]["num_examples"]) for k in range(n)]
        self.steps = [data.local_steps(c, fl.local_epochs, fl.batch_size) for c in self.counts]
        self.max_steps = max(max(self.steps), 1)
        self.width = text.common_width([int(info[k][0]["longest"]) for k in range(n)],
                                       self.config.data.max_len)
        logging.info("Flower: %d clients on nodes %s", n, [self.nodes[k] for k in range(n)])

    def _views(self, server: dict):
        """``k -> {"view": record}``: client ``k``'s whole view of ``server`` (its base weights
        only when rounds change them), the server state gathered to the host once."""
        host = {}

        def view(k: int) -> dict:
            if not host:
                host.update(sharding.to_host(server))
            v = view_of(self.strategy, host, k)
            if not self.strategy.changes_base:
                v = {key: x for key, x in v.items() if key != "params"}
            return {"view": records.to_record(v)}
        return view

    # -- a round --------------------------------------------------------------------------

    def round(self, server, t, selected, weights, fusion):
        task = {"round": t, "selected": list(selected), "max_steps": self.max_steps,
                "width": self.width, "fusion": fusion, "secagg": self.secure}
        views = self._views(server)
        messages = [self._message(self.nodes[k], "train", {**task, "index": i},
                                  views(k) if self.synced.get(k) != t else None)
                    for i, k in enumerate(selected)]
        replies = self._send(messages, self.flower.round_timeout)
        row_like = jax.tree.map(np.asarray, self.template)
        max_rank = max(self.ranks)
        rows, losses, actives, refused = [], [], [], {}
        for k in selected:
            reply = replies.get(self.nodes[k])
            reason = self._reason(reply)
            row = None
            if reason is None and self.secure:  # it keeps its adapter for SecAgg+
                row = row_like
            elif reason is None:
                try:
                    row = records.decode(reply.content["update"], row_like, self.codec,
                                              who=f"client {k}")
                    mask = np.asarray(federated.rank_mask(self.ranks[k], max_rank))
                    masked = federated.apply_rank_mask(row, mask)
                    if not all(np.array_equal(a, b, equal_nan=True) for a, b in
                               zip(jax.tree.leaves(masked), jax.tree.leaves(row), strict=True)):
                        raise records.RefusedUpdate(
                            f"client {k} sent non-zero components beyond its rank "
                            f"{self.ranks[k]}")
                except records.RefusedUpdate as e:
                    reason, row = str(e), None
            if row is None:
                refused[k] = reason
                self.synced.pop(k, None)
                logging.warning("round %d: client %d (%s) left out: %s", t + 1, k,
                                self.names[k], reason)
                rows.append(jax.tree.map(np.zeros_like, row_like))
                losses.append(np.zeros(self.max_steps, np.float32))
                actives.append(np.zeros(self.max_steps, np.int32))
                continue
            self.synced[k] = t
            rows.append(row)
            losses.append(np.asarray(reply.content["metrics"]["loss"], np.float32))
            actives.append(np.asarray(reply.content["metrics"]["active"], np.int32))
        self._enough(t, selected, refused)
        w = np.asarray([0.0 if k in refused else weights[i] for i, k in enumerate(selected)],
                       np.float32)
        if self.secure:
            new, accepted, updated = self._secure_round(server, t, selected, refused, w)
        else:
            updated = federated.stack_clients([jax.tree.map(jnp.asarray, r) for r in rows])
            new, accepted = self.aggregate_fn(server, updated, jnp.asarray(selected),
                                              jnp.asarray(w))
            accepted = np.asarray(accepted)
        self.last = {"round": t, "selected": list(selected), "weights": w,
                     "accepted": {k: bool(a) for k, a in zip(selected, accepted, strict=True)},
                     "updated": updated}
        return new, {"accepted": accepted, "loss": np.stack(losses),
                     "active": np.stack(actives), "refused": refused}

    def _secure_round(self, server, t, selected, refused: dict, w: np.ndarray):
        """The server's half of a round under SecAgg+: the weighted mean of the adapters of
        the clients that trained (the server never sees one of them), then the strategy's
        :meth:`aggregate_mean`. A client that drops out of the protocol is left out of the
        mean (it is recovered from the others' shares) and named. Returns ``(server,
        accepted [K], mean)``."""
        trained = [k for k in selected if k not in refused and w[selected.index(k)] > 0]
        mean, nodes = (None, []) if len(trained) < 2 else secagg.secure_mean(
            self.grid, [self.nodes[k] for k in trained],
            jax.eval_shape(self.strategy.secure_form, self.template),
            round_=t, max_weight=float(max(self.counts)), clip=self.flower.secagg_clip,
            timeout=self.flower.round_timeout)
        for k in trained:
            if self.nodes[k] not in nodes:
                refused[k] = "dropped out of secure aggregation"
                self.synced.pop(k, None)
                logging.warning("round %d: client %d (%s) left out: it dropped out of secure "
                                "aggregation", t + 1, k, self.names[k])
        if mean is None:
            raise UserError(f"round {t + 1}: secure aggregation did not finish with clients "
                            f"{trained} (it needs at least 2, and enough of them to answer "
                            "every stage); left out: " + str(refused))
        self._enough(t, selected, refused)
        accepted = np.asarray([self.nodes[k] in nodes for k in selected])
        return self.mean_fn(server, jax.tree.map(jnp.asarray, mean)), accepted, mean

    def evaluate(self, server, t, *, base=False):
        task = {"round": t, "base": base, "width": self.width}
        views, last = self._views(server), self.last
        download = None  # what the round changed, the same for every node: built once
        if not base and last.get("round") == t - 1:
            if self.strategy.changes_base and self.secure:  # nodes merge the mean as we did
                download = {"mean": records.to_record(last["updated"])}
            elif self.strategy.changes_base:  # nodes merge the round's adapters as we did
                download = {"received": records.encode(sharding.to_host(last["updated"]),
                                                       self.codec)}
                task.update(count=len(last["selected"]), selected=last["selected"],
                            weights=[float(x) for x in last["weights"]])
            elif "global" in server:
                download = {"global": records.encode(sharding.to_host(server["global"]),
                                                     self.codec)}
        messages = []
        for k in range(len(self.names)):
            own, arrays = dict(task), download
            if base:
                arrays = None if self.synced.get(k) == 0 else views(k)
            elif self.synced.get(k) != t - 1 or last.get("round") != t - 1:
                arrays = views(k)  # it missed something: the whole view
            elif not self.strategy.changes_base:
                own["accepted"] = last["accepted"].get(k, False)
            messages.append(self._message(self.nodes[k], "evaluate", own, arrays))
        replies = self._send(messages, self.flower.round_timeout)
        out = []
        for k in range(len(self.names)):
            reply = replies.get(self.nodes[k])
            reason = self._reason(reply)
            if reason:
                self.synced.pop(k, None)
                logging.warning("evaluation of round %d: client %d (%s) left out: %s", t, k,
                                self.names[k], reason)
                continue
            self.synced[k] = t
            out += json.loads(str(reply.content["records"]["json"]))
        # As the local engine writes them: every client's loss, then every exact match.
        return sorted(out, key=lambda r: (r["kind"] != "eval", r["client"]))
