"""The Flower engine (``fl.engine=flower``) of the federated LoRA job.

In process: the server's side over a grid that hands each message to the real ClientApp
(one Flower ``Context`` per node, as a SuperNode keeps it), so the protocol, the client code
and the faults are tested in seconds: the same summary as the local engine for every kind of
strategy, and bad clients refused by name. On real processes (``slow``): a SuperLink and three
SuperNodes on 127.0.0.1 (``deployment.LocalFederation``) run the job with ``flwr run`` and
equal the local engine; a killed SuperNode and a killed and restarted server.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import uuid
from pathlib import Path

import jax
import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, Context, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from ffrag_jax.cli.launch import load_config  # noqa: E402
from ffrag_jax.errors import UserError  # noqa: E402
from ffrag_jax.federated.flower import client as flower_client  # noqa: E402
from ffrag_jax.federated.flower import records  # noqa: E402
from ffrag_jax.jobs import federated as job  # noqa: E402
from ffrag_jax.training import run as run_lib  # noqa: E402

TINY = {
    "fl.num_clients": 3, "lora.generator.ranks": (4, 2, 1), "fl.rounds": 2,
    "fl.batch_size": 8, "fl.micro_batch_size": 4, "fl.lr": 3e-3,
    "data.examples_per_client": 16, "data.held_out": 0.25, "model.hidden_size": 32,
    "model.intermediate_size": 64, "model.num_layers": 2, "tokenizer.vocab_size": 400,
    "eval.batch_size": 8, "export": False,
}


def tiny_config(**overrides):
    return load_config("heter", {**TINY, **{k.replace("__", "."): v
                                           for k, v in overrides.items()}})


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

    def pull_messages(self, ids):
        out = []
        for i in ids:
            m = self.pushed.pop(i, None)
            if m is None:  # answered already, or dropped: never comes
                continue
            node = m.metadata.dst_node_id
            reply = flower_client.app(m, self.contexts[node])
            reply.metadata._src_node_id = node
            if self.tamper is not None:
                reply = self.tamper(node - 100, m.metadata.message_type, reply)
            if reply is not None:
                out.append(reply)
        return out


def run_flower(config, workdir: Path, grid) -> dict:
    mesh = run_lib.validate(config)
    path = run_lib.prepare_workdir(config, workdir, overwrite=False)
    with flower_client_cleared():
        return job.run(config, path, mesh, grid=grid)


class flower_client_cleared:
    """No client built by an earlier test: each run starts its nodes from the messages."""

    def __enter__(self):
        flower_client._NODES.clear()

    def __exit__(self, *exc):
        flower_client._NODES.clear()


def assert_same_summary(a: dict, b: dict, tol: float = 1e-6) -> None:
    """Equal summaries, numbers to ``tol`` relative to their size (the losses are float32
    sums, good to 7 digits: the server optimisers' arithmetic, compiled on its own on the
    Flower server and fused into the round on the local engine, rounds differently)."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[prefix + k] = v
        return out
    fa, fb = flat(a), flat(b)
    fa.pop("wall_time_s"), fb.pop("wall_time_s")
    assert fa.keys() == fb.keys()
    for k in fa:
        if isinstance(fa[k], float) and not math.isnan(fa[k]):
            assert abs(fa[k] - fb[k]) <= tol * max(1.0, abs(fa[k])), (k, fa[k], fb[k])
        else:
            assert fa[k] == fb[k] or (fa[k] != fa[k] and fb[k] != fb[k]), k


def local_summary(config, workdir: Path) -> dict:
    return run_lib.run(config, workdir)


def metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


# -- in process -------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy,ranks", [
    ("stack", (4, 2, 1)),  # the base weights change: clients replay the server's merge
    ("ff", (4, 2, 1)),  # personal adapters stay on the nodes
    ("fedsa", (2, 2, 2)),  # b personal, a shared
    ("fedadam", (2, 2, 2)),  # server optimiser state only on the server
])
def test_flower_protocol_equals_local_engine(tmp_path, strategy, ranks):
    config = tiny_config(fl__strategy=strategy, lora__generator__ranks=ranks,
                         eval__exact_match=strategy == "ff")
    local = local_summary(config, tmp_path / "local")
    grid = InProcessGrid(3)
    flower = run_flower(tiny_config(fl__strategy=strategy, lora__generator__ranks=ranks,
                                    eval__exact_match=strategy == "ff", fl__engine="flower"),
                        tmp_path / "flower", grid)
    assert_same_summary(local, flower)
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


# -- real processes: SuperLink and SuperNodes on 127.0.0.1 -------------------------------------

DEPLOY_FLAGS = [
    "--config=heter", "--config.fl.num_clients=2", "--config.lora.generator.ranks=(4,2)",
    "--config.fl.rounds=2", "--config.fl.batch_size=8", "--config.fl.micro_batch_size=4",
    "--config.fl.lr=3e-3", "--config.data.examples_per_client=16", "--config.data.held_out=0.25",
    "--config.model.hidden_size=32", "--config.model.intermediate_size=64",
    "--config.model.num_layers=2", "--config.tokenizer.vocab_size=400",
    "--config.eval.batch_size=8", "--config.export=False", "--config.fl.strategy=ff",
]


def _records_now(workdir: Path) -> list[dict]:
    """The records written so far (a line being written is left out)."""
    path, out = workdir / "metrics.jsonl", []
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def _round_done(workdir: Path, r: int) -> bool:
    return any(rec.get("kind") == "round" and rec["round"] == r
               for rec in _records_now(workdir))


@pytest.mark.slow
@pytest.mark.long
def test_deployment_with_a_killed_server_equals_the_local_engine(tmp_path):
    """Two SuperNodes and a SuperLink as real processes, the job submitted with ``flwr
    run``; its server is killed after round 1 and the run submitted again: it resumes from
    the round-1 checkpoint (the nodes, new to the second run, get their whole view) and ends
    with the local engine's summary. Round 1 ran on the first server, round 2 on the second:
    both halves of the deployment path must match the local engine for this to hold."""
    from ffrag_jax.federated.flower.deployment import LocalFederation, write_config

    local = local_summary(tiny_config(fl__strategy="ff", fl__num_clients=2,
                                      lora__generator__ranks=(4, 2)), tmp_path / "local")
    workdir = tmp_path / "run"
    config = write_config(workdir, DEPLOY_FLAGS)
    with LocalFederation(2, tmp_path / "logs") as fed:
        state = {"killed": False}

        def kill_after_round_1():
            if not state["killed"] and _round_done(workdir, 1):
                state["killed"] = fed.kill_server()

        fed.submit(config, workdir)
        deadline = time.monotonic() + 300
        while not state["killed"] and time.monotonic() < deadline:
            kill_after_round_1()
            time.sleep(0.2)
        assert state["killed"] and not (workdir / "summary.json").exists()
        fed.wait(fed.submit(config, workdir), workdir, timeout_s=400)
    assert_same_summary(local, json.loads((workdir / "summary.json").read_text()))
    rounds = [r["round"] for r in metrics(workdir) if r.get("kind") == "round"]
    assert rounds == [1, 2]  # round 1 was not run again


@pytest.mark.slow
def test_deployment_goes_on_without_a_killed_supernode(tmp_path):
    """SuperNode 2 of 3 dies after the base model's evaluation: round 1 completes with
    clients 0 and 1 (the minimum fraction is 0.5), client 2 is named as left out of the
    round and of its evaluation, the run finishes."""
    from ffrag_jax.federated.flower.deployment import LocalFederation, write_config

    workdir = tmp_path / "run"
    flags = [f for f in DEPLOY_FLAGS if "num_clients" not in f and "ranks" not in f]
    config = write_config(workdir, [
        *flags, "--config.fl.num_clients=3", "--config.lora.generator.ranks=(4,2,1)",
        "--config.fl.rounds=1", "--config.fl.flower.round_timeout=30"])
    with LocalFederation(3, tmp_path / "logs") as fed:
        state = {"killed": False}

        def kill_node_after_round_0():
            if not state["killed"] and sum(r.get("kind") == "eval" and r["round"] == 0
                                           for r in _records_now(workdir)) == 3:
                fed.kill_node(2)
                state["killed"] = True

        fed.wait(fed.submit(config, workdir), workdir, timeout_s=400,
                 poll=kill_node_after_round_0)
    assert state["killed"]
    recs = metrics(workdir)
    first = {r["client"]: r for r in recs if r.get("kind") == "client" and r["round"] == 1}
    assert first[0]["accepted"] and first[1]["accepted"]
    assert not first[2]["accepted"] and first[2]["refused"]
    evaluated = {r["client"] for r in recs if r.get("kind") == "eval" and r["round"] == 1}
    assert evaluated == {0, 1}


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
