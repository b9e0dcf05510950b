"""The Flower engine (``fl.engine=flower``) of the federated LoRA job.

In process: the server's side over a grid that hands each message to the real ClientApp
(one Flower ``Context`` per node, as a SuperNode keeps it), so the protocol, the client code
and the faults are tested in seconds: the same summary as the local engine for every kind of
strategy, and bad clients refused by name. On real processes: ``test_flower_deployment.py``.
"""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path

import jax
import numpy as np
import pytest

pytest.importorskip("flwr")

from flower_helpers import (  # noqa: E402
    assert_same_summary,
    local_summary,
    metrics,
    tiny_config,
)
from flwr.app import (  # noqa: E402
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    RecordDict,
)
from flwr.common.constant import ErrorCode  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from ffrag_jax.errors import UserError  # noqa: E402
from ffrag_jax.federated.flower import client as flower_client  # noqa: E402
from ffrag_jax.federated.flower import records  # noqa: E402
from ffrag_jax.training import run as run_lib  # noqa: E402


class InProcessGrid:
    """A Flower grid whose nodes are the real ClientApp in this process: every pushed
    message is handed to ``client.app`` with its node's own ``Context`` when pulled.
    ``tamper(k, kind, reply)`` may change or drop (None) client ``k``'s reply."""

    def __init__(self, num_nodes: int, tamper=None):
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        self.contexts = {
            100 + k: Context(run_id=1, node_id=100 + k, state=RecordDict(), run_config={},
                             node_config={"partition-id": k, "num-partitions": num_nodes})
            for k in range(num_nodes)}
        self.tamper, self.pushed, self.sent = tamper, {}, []

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata._message_id = uuid.uuid4().hex
            self.pushed[m.metadata.message_id] = m
            self.sent.append(m)
            ids.append(m.metadata.message_id)
        return ids

    def send_and_receive(self, messages, *, timeout=None):
        """What Flower's workflows call (SecAgg+): push, then every reply that comes."""
        return self.pull_messages(self.push_messages(messages))

    def pull_messages(self, ids):
        out = []
        for i in ids:
            m = self.pushed.pop(i, None)
            if m is None:  # answered already, or dropped: never comes
                continue
            node = m.metadata.dst_node_id
            # A copy, as the wire gives: Flower's SecAgg+ workflow sends one record to every
            # node, and a node's mod changes what it receives.
            try:
                reply = flower_client.app(copy.deepcopy(m), self.contexts[node])
            except Exception as e:  # as a SuperNode answers for a ClientApp that raised
                reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{e}"),
                                reply_to=m)
            reply.metadata._src_node_id = node
            if self.tamper is not None:
                reply = self.tamper(node - 100, m.metadata.message_type, reply)
            if reply is not None:
                out.append(reply)
        return out


def run_flower(config, workdir: Path, grid) -> dict:
    mesh = run_lib.validate(config)
    path = run_lib.prepare_workdir(config, workdir, overwrite=False)
    with flower_client_cleared():  # the task's job (federated LoRA, FF-RAG) with this grid
        return run_lib.job_module(config.task).run(config, path, mesh, grid=grid)


class flower_client_cleared:
    """No client built by an earlier test: each run starts its nodes from the messages."""

    def __enter__(self):
        flower_client._NODES.clear()

    def __exit__(self, *exc):
        flower_client._NODES.clear()


# -- in process -------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy,ranks,payload", [
    # the base weights change: clients replay the server's merge of the adapters they get
    # in half precision
    ("stack", (4, 2, 1), "fp16"),
    ("ff", (4, 2, 1), "fp32"),  # personal adapters stay on the nodes
    ("fedsa", (2, 2, 2), "fp32"),  # b personal, a shared
    # server optimiser state only on the server; adapters travel as blockwise int8
    ("fedadam", (2, 2, 2), "int8"),
])
def test_flower_protocol_equals_local_engine(tmp_path, strategy, ranks, payload):
    """The same summary as the local engine, which computes with the payload codec's round
    trip; on Flower the adapters really travel in it (int8: q and scale arrays)."""
    config = tiny_config(fl__strategy=strategy, lora__generator__ranks=ranks,
                         eval__exact_match=strategy == "ff", fl__payload=payload)
    local = local_summary(config, tmp_path / "local")
    grid = InProcessGrid(3)
    flower = run_flower(tiny_config(fl__strategy=strategy, lora__generator__ranks=ranks,
                                    eval__exact_match=strategy == "ff", fl__engine="flower",
                                    fl__payload=payload),
                        tmp_path / "flower", grid)
    assert_same_summary(local, flower)
    sent = [m for m in grid.sent if m.metadata.message_type == "evaluate"]
    downloads = [r for m in sent for name, r in m.content.array_records.items()
                 if name in ("global", "received")]
    assert downloads and all(a.dtype == {"fp32": "float32", "fp16": "float16"}.get(
        payload, a.dtype) for r in downloads for a in r.values())
    if payload == "int8":
        assert {a.dtype for r in downloads for a in r.values()} == {"int8", "float32"}
    # Only adapters (and metrics) ever leave a client; the server sends adapters, the base
    # model's folder path and the config, never data or knowledge-base text.
    kinds = {m.metadata.message_type for m in grid.sent}
    assert kinds == {"query", "train", "evaluate"}
    recs = metrics(tmp_path / "flower")
    assert [r["selected"] for r in recs if r.get("kind") == "round"] == [[0, 1, 2]] * 2


def _adapter_paths(config) -> set[str]:
    from ffrag_jax.config_types import LoRASection
    from ffrag_jax.jobs.base_model import abstract_model

    _, shapes = abstract_model(config)
    template = jax.eval_shape(lambda p: LoRASection.read(config, "generator").init(
        jax.random.key(0), p, 4), shapes)
    return {path for path, _ in records._paths(template)}


def test_clients_send_only_adapters(tmp_path):
    """Every array a client sends is an adapter factor at its place in the LoRA tree, and its
    metrics are numbers: no token ids, no text, no base weights."""
    config = tiny_config(fl__strategy="ff", fl__engine="flower", fl__rounds=1)
    replies = []

    def keep(k, kind, reply):
        replies.append((kind, reply))
        return reply

    run_flower(config, tmp_path / "run", InProcessGrid(3, keep))
    allowed = _adapter_paths(config)
    for kind, reply in replies:
        for name in reply.content.array_records:
            assert name == "update" and kind == "train"
            assert set(reply.content[name].keys()) <= allowed
        for name, rec in reply.content.config_records.items():
            # query: the client's name; evaluate: its held-out metrics as JSON numbers
            assert (kind, name) in (("query", "name"), ("evaluate", "records"))
            if name == "records":
                for r in json.loads(rec["json"]):
                    assert set(r) <= {"kind", "client", "name", "model", "loss", "ppl",
                                      "exact_match"}


def _raw(arrays: dict) -> ArrayRecord:
    """An ArrayRecord with exactly these keys (a client writing its own message)."""
    return ArrayRecord({p: Array(a) for p, a in arrays.items()})


def _nan_update(k, kind, reply):
    if k == 1 and kind == "train":
        update = reply.content["update"]
        first = next(iter(update.keys()))
        bad = update[first].numpy().copy()
        bad.flat[0] = np.nan
        reply.content["update"] = _raw({**{p: update[p].numpy() for p in update}, first: bad})
    return reply


def _wrong_shape(k, kind, reply):
    if k == 2 and kind == "train":
        update = reply.content["update"]
        first = next(iter(update.keys()))
        reply.content["update"] = _raw(
            {**{p: update[p].numpy() for p in update}, first: update[first].numpy()[..., :1]})
    return reply


def _beyond_rank(k, kind, reply):
    if k == 2 and kind == "train":  # client 2 has rank 1 of 4: components 1..3 must be 0
        update = reply.content["update"]
        arrays = {p: update[p].numpy().copy() for p in update}
        first = next(p for p in arrays if p.endswith("['a']"))
        arrays[first][..., -1] = 1.0
        reply.content["update"] = _raw(arrays)
    return reply


def _silent(k, kind, reply):
    return None if (k == 0 and kind == "train") else reply


@pytest.mark.parametrize("tamper,client,reason", [
    (_nan_update, 1, None),  # rejected by the server's finiteness check
    (_wrong_shape, 2, "of shape"),
    (_beyond_rank, 2, "beyond its rank 1"),
    (_silent, 0, "no answer in time"),
])
def test_bad_client_updates_are_refused_by_name(tmp_path, caplog, tamper, client, reason):
    config = tiny_config(fl__strategy="stack", fl__engine="flower", fl__rounds=1,
                         fl__flower__round_timeout=1.0)
    with caplog.at_level("WARNING"):
        summary = run_flower(config, tmp_path / "run", InProcessGrid(3, tamper))
    assert summary["rounds"] == 1  # the round went on with the others
    recs = [r for r in metrics(tmp_path / "run") if r.get("kind") == "client"]
    bad = next(r for r in recs if r["client"] == client)
    assert bad["accepted"] is False and bad["upload_bytes"] == 0
    assert all(r["accepted"] for r in recs if r["client"] != client)
    if reason:
        assert reason in bad["refused"]
        assert f"client {client}" in caplog.text and reason in caplog.text
    else:
        assert "non-finite" in caplog.text


def test_too_few_answers_stop_the_round_and_keep_the_checkpoint(tmp_path):
    config = tiny_config(fl__strategy="stack", fl__engine="flower", fl__flower__min_fraction=1.0,
                         fl__flower__round_timeout=1.0)
    state = {"round": 0}

    def drop_in_round_2(k, kind, reply):
        if kind == "train":
            state["round"] += 1 if k == 0 else 0
            if state["round"] == 2 and k == 0:
                return None
        return reply

    with pytest.raises(UserError, match=r"round 2: only 2 of 3 clients answered"):
        run_flower(config, tmp_path / "run", InProcessGrid(3, drop_in_round_2))
    assert (tmp_path / "run" / "checkpoints").is_dir()
    assert [r["round"] for r in metrics(tmp_path / "run") if r.get("kind") == "round"] == [1]


def test_node_config_must_fit_the_run():
    config = tiny_config(fl__engine="flower")
    ctx = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                  node_config={"partition-id": 3, "num-partitions": 3})
    with pytest.raises(UserError, match="partition-id=3 is outside 0..2"):
        flower_client.partition_of(ctx, config.fl.num_clients)
    ctx = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                  node_config={"partition-id": 0, "num-partitions": 4})
    with pytest.raises(UserError, match="num-partitions=4 but the server's run has "
                                        "fl.num_clients=3"):
        flower_client.partition_of(ctx, 3)
    ctx = Context(run_id=1, node_id=1, state=RecordDict(), run_config={}, node_config={})
    with pytest.raises(UserError, match="no partition-id"):
        flower_client.partition_of(ctx, 3)


def test_a_node_for_another_run_is_named(tmp_path):
    """A SuperNode started for 4 partitions in a 3-client run: the server names it and
    stops before any round."""
    config = tiny_config(fl__engine="flower")
    grid = InProcessGrid(3)
    grid.contexts[102].node_config["num-partitions"] = 4
    with pytest.raises(UserError, match=r"client\(s\) \[2\] have no SuperNode: SuperNode 102: "
                                        r"node config num-partitions=4"):
        run_flower(config, tmp_path / "run", grid)


def test_records_check_what_they_read():
    tree = {"a": np.zeros((2, 3), np.float32), "b": {"c": np.ones(4, np.int32)}}
    back = records.from_record(records.to_record(tree), tree, who="client 7")
    assert jax.tree.all(jax.tree.map(np.array_equal, back, tree))
    with pytest.raises(records.RefusedUpdate, match=r"client 7 sent \['a'\] of shape \(2, 2\)"):
        records.from_record(records.to_record({**tree, "a": np.zeros((2, 2), np.float32)}),
                            tree, who="client 7")
    with pytest.raises(records.RefusedUpdate, match="client 7 sent no"):
        records.from_record(records.to_record({"a": tree["a"]}), tree, who="client 7")
    with pytest.raises(records.RefusedUpdate, match="as float64"):
        records.from_record(records.to_record({**tree, "a": np.zeros((2, 3))}), tree,
                            who="client 7")
    config = tiny_config()
    assert records.config_to_json(records.config_from_json(records.config_to_json(config))) \
        == records.config_to_json(config)


def test_flower_engine_config_errors():
    config = tiny_config(fl__engine="flwr")
    with pytest.raises(UserError, match="fl.engine='flwr'; choose one of local, flower"):
        run_lib.validate(config)
    config = tiny_config(fl__engine="flower", data__source="file", data__path="/")
    with pytest.raises(UserError, match="cannot train a tokenizer on the clients' data"):
        run_lib.validate(config)


@pytest.mark.parametrize("overrides,message", [
    ({"fl.strategy": "zeropad"}, "needs fl.engine=flower"),
    ({"fl.engine": "flower", "fl.strategy": "ff"},
     r"fl.strategy='ff' needs every client's adapter, not their sum; summable strategies: "
     r"stack, fedavg, zeropad"),
    ({"fl.engine": "flower", "fl.strategy": "median"}, "'median' needs every client's adapter"),
    ({"fl.engine": "flower", "fl.strategy": "zeropad", "fl.payload": "int8"},
     "fl.payload='int8' must be fp32"),
    ({"fl.engine": "flower", "fl.strategy": "zeropad", "fl.flower.secagg_clip": 0.0},
     "secagg_clip must be positive"),
    ({"fl.engine": "flower", "fl.strategy": "zeropad", "fl.num_clients": 1,
      "lora.generator.ranks": (4,)}, "at least 2 clients a round"),
])
def test_secure_aggregation_config_errors(overrides, message):
    config = tiny_config(fl__flower__secagg=True, **{k.replace(".", "__"): v
                                                     for k, v in overrides.items()})
    with pytest.raises(UserError, match=message):
        run_lib.validate(config)


def test_a_client_without_data_takes_part_with_weight_0(tmp_path, caplog):
    config = tiny_config(fl__strategy="ff", fl__engine="flower", fl__rounds=1,
                         data__client_sizes=(16, 0, 16))
    with caplog.at_level("WARNING"):
        summary = run_flower(config, tmp_path / "run", InProcessGrid(3))
    assert "client 1:geography has no training examples: it gets weight 0" in caplog.text
    recs = [r for r in metrics(tmp_path / "run") if r.get("kind") == "client"]
    assert [r["steps"] for r in recs] == [2, 0, 2]
    assert set(summary["final_held_out_loss"]) == {f"{c} {m}" for c in ("0:clinic", "2:clinic")
                                                   for m in ("global", "fused")}


def test_an_unreachable_superlink_is_one_line(tmp_path):
    from ffrag_jax.federated.flower.deployment import APP_DIR, LocalFederation

    fed = LocalFederation.__new__(LocalFederation)  # a connection to a port nobody serves
    fed.home, fed.logs, fed.app_dir = tmp_path, tmp_path, APP_DIR
    from ffrag_jax.cli.local_cluster import free_port

    fed.port = free_port()
    (tmp_path / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{fed.port}"'
        '\ninsecure = true\n')
    fed.env = {**__import__("os").environ, "FLWR_HOME": str(tmp_path)}
    with pytest.raises(UserError, match="flwr run failed: .*unavailable"):
        fed.submit(tmp_path / "x.flower.json", tmp_path / "x", wait_s=1)


# -- secure aggregation (SecAgg+) ---------------------------------------------------------------


def _masked_reply(reply) -> bool:
    """A reply to SecAgg+'s masked-vectors stage."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    cfg = reply.content.config_records.get(RECORD_KEY_CONFIGS)
    return cfg is not None and Key.MASKED_PARAMETERS in cfg


@pytest.mark.parametrize("drop", [None, 2])
def test_secure_mean_is_the_weighted_mean_of_what_the_clients_hold(drop):
    """SecAgg+ over the real ClientApp (Flower's mod on the client, its workflow on the
    server): the server gets sum_k n_k x_k / sum_k n_k to SecAgg+'s quantisation step; a client
    that drops out after the key sharing is left out of the mean, recovered from the others'
    shares."""
    from ffrag_jax.federated.flower import secagg

    rng = np.random.default_rng(0)
    template = {"layer": {"a": np.zeros((3, 4), np.float32), "b": np.zeros((4, 5), np.float32)},
                "head": {"a": np.zeros((2,), np.float32)}}
    counts, clip = [10, 30, 20], 8.0
    held = [jax.tree.map(lambda x: rng.uniform(-3, 3, x.shape).astype(np.float32), template)
            for _ in counts]
    grid = InProcessGrid(3, lambda k, kind, reply: None if k == drop and _masked_reply(reply)
                         else reply)
    for k, node in enumerate(sorted(grid.contexts)):
        state = grid.contexts[node].state
        state["pending"] = records.to_record(held[k])
        state["pending_meta"] = ConfigRecord({"round": 4, "num_examples": counts[k],
                                              "clip": clip})
    mean, nodes = secagg.secure_mean(grid, sorted(grid.contexts), template, round_=4,
                                     max_weight=30.0, clip=clip, timeout=None)
    kept = [k for k in range(3) if k != drop]
    assert sorted(nodes) == [100 + k for k in kept]
    w = np.asarray([counts[k] for k in kept], np.float64)
    expected = jax.tree.map(lambda *xs: np.tensordot(w / w.sum(), np.stack(xs), axes=1),
                            *[held[k] for k in kept])
    # SecAgg+'s arithmetic: client k sends x_k q_k / T (q_k = round(n_k / max_weight * T),
    # T = 2**22 levels), stochastically rounded to a step of 2 clip / T; the server divides the
    # sum by sum(q) / T. So the error is below K steps * T / sum(q), plus each x_k times the
    # rounding of its weight, |q_k / sum(q) - n_k / sum(n)|, plus float32's own rounding.
    T = secagg.QUANTIZATION_RANGE
    q = np.asarray([round(counts[k] / 30.0 * T) for k in kept], np.float64)
    step = 2 * clip / T
    for got, want, *xs in zip(jax.tree.leaves(mean), jax.tree.leaves(expected),
                              *[jax.tree.leaves(held[k]) for k in kept], strict=True):
        assert got.dtype == np.float32
        bound = (len(kept) * step * T / q.sum()
                 + sum(np.abs(x) * abs(qk / q.sum() - wk / w.sum())
                       for x, qk, wk in zip(xs, q, w, strict=True)))
        assert np.all(np.abs(got - want) <= bound + np.abs(want) * 2.0**-24)
    # The server never saw a client's adapter: the masked stage's replies carry no arrays.
    for m in grid.sent:
        assert m.content.array_records.keys() <= {"fitins.parameters"}


def test_secure_aggregation_refuses_a_value_outside_its_range():
    from ffrag_jax.federated.flower import secagg

    template = {"a": np.zeros((3,), np.float32)}
    grid = InProcessGrid(3)
    for k, node in enumerate(sorted(grid.contexts)):
        grid.contexts[node].state["pending"] = records.to_record(
            {"a": np.full((3,), 9.0 if k == 1 else 0.5, np.float32)})
        grid.contexts[node].state["pending_meta"] = ConfigRecord(
            {"round": 0, "num_examples": 5, "clip": 8.0})
    mean, nodes = secagg.secure_mean(grid, sorted(grid.contexts), template, round_=0,
                                     max_weight=5.0, clip=8.0, timeout=None)
    assert sorted(nodes) == [100, 102]  # client 1 refused to send (9 > 8); the rest summed
    np.testing.assert_allclose(mean["a"], 0.5, atol=1e-5)


def test_secure_aggregation_runs_the_job_as_the_plain_mean_does(tmp_path):
    """The federated job with SecAgg+ (fl.flower.secagg) ends with the local engine's summary
    up to the quantisation (the mean is off by < 5e-6 per value: the test above), and no
    client ever sends an adapter in the clear: its train reply holds losses only, its masked
    reply no arrays. Stacking (ranks 4, 2, 1) sums the clients' merged deltas, which every
    node merges into its base as the server did, and round 2 trains on that base. (The
    other summable strategies' rules on the mean: test_strategies.)"""
    overrides = dict(fl__strategy="stack", lora__generator__ranks=(4, 2, 1), fl__rounds=2)
    local = local_summary(tiny_config(**overrides), tmp_path / "local")
    replies = []

    def keep(k, kind, reply):
        replies.append((kind, reply))
        return reply

    secure = run_flower(tiny_config(**overrides, fl__engine="flower", fl__flower__secagg=True),
                        tmp_path / "secure", InProcessGrid(3, keep))
    assert_same_summary(local, secure, tol=1e-4)
    assert any(_masked_reply(r) for _, r in replies)
    for kind, reply in replies:
        assert not any(len(rec) for rec in reply.content.array_records.values()), kind
    recs = metrics(tmp_path / "secure")
    assert all(r["accepted"] for r in recs if r.get("kind") == "client")
