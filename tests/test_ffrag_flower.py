"""Federated FF-RAG (the demo's job) on the Flower engine: every client a node holding its own
case base and questions (``ffrag_jax.federated.flower.ffrag_node``), the server only the
strategy's state (``ffrag_server``). In process: a grid that hands each message to the real
ClientApp (``test_flower.InProcessGrid``)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("flwr")

from test_ffrag import SMALL  # noqa: E402
from test_flower import InProcessGrid, run_flower  # noqa: E402

from ffrag_jax.errors import UserError  # noqa: E402
from ffrag_jax.launch import load_config  # noqa: E402
from ffrag_jax.training import run as run_lib  # noqa: E402

# The demo's shipped tokenizer: a Flower server cannot train one on its clients' text.
FLOWER_SMALL = {**SMALL, "tokenizer.path": "packaged:demo", "fl.dp.clip": 1.0,
                "fl.dp.noise_multiplier": 0.5}


def _records(workdir) -> list[dict]:
    """What both engines must write alike (timings left out), in one order."""
    out = []
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") in ("train", "eval", "payload", "privacy"):
            out.append({k: v for k, v in r.items() if k not in ("time", "tokens_per_s")})
    return sorted(out, key=lambda r: json.dumps(r, sort_keys=True))


@pytest.mark.long
def test_ffrag_on_flower_equals_the_local_engine_and_sends_only_adapters(tmp_path):
    """FF-LoRA with client-level DP: the same summary and the same train, eval, payload and
    privacy records as the local engine (bit for bit: the same functions on the same
    arrays); every array a client sends is a generator or query-encoder adapter, its records
    are numbers under its name; the server keeps no passage, question or answer (no
    predictions.jsonl, no exported system)."""
    local = run_lib.run(load_config("demo", FLOWER_SMALL), tmp_path / "local")
    replies = []

    def keep(k, kind, reply):
        replies.append((kind, reply))
        return reply

    config = load_config("demo", {**FLOWER_SMALL, "fl.engine": "flower"})
    flower = run_flower(config, tmp_path / "flower", InProcessGrid(2, keep))
    local.pop("wall_time_s"), flower.pop("wall_time_s")
    assert flower == local
    assert _records(tmp_path / "flower") == _records(tmp_path / "local")
    for kind, reply in replies:
        arrays = set(reply.content.array_records)
        assert arrays <= ({"update.generator", "update.retriever"} if kind == "train"
                          else set()), (kind, arrays)
        for name, rec in reply.content.config_records.items():
            assert (kind, name) in (("query", "name"), ("train", "records"),
                                    ("evaluate", "records"))
            if name == "records":
                for r in json.loads(rec["json"]):
                    assert all(isinstance(v, (int, float)) or k in ("kind", "phase", "name",
                                                                   "model")
                               for k, v in r.items()), r
    assert not (tmp_path / "flower" / "predictions.jsonl").exists()
    assert not (tmp_path / "flower" / "export").exists()


@pytest.mark.parametrize("overrides,message", [
    ({"fl.strategy": "stack"}, "merges into the base weights"),
    ({"rerank.enabled": True}, "runs on the local engine only"),
    ({"fl.vmap_clients": True}, "the local engine's batching"),
    ({"tokenizer.path": "None"}, "cannot train a tokenizer on the clients' data"),
    ({"fl.flower.secagg": True}, "fl.strategy='ff' needs every client's adapter"),
])
def test_ffrag_on_flower_refuses_what_it_cannot_do_yet(overrides, message):
    config = load_config("demo", {**FLOWER_SMALL, "fl.engine": "flower", **overrides})
    with pytest.raises(UserError, match=message):
        run_lib.validate(config)


@pytest.mark.long
def test_ffrag_with_secure_aggregation_is_the_plain_mean_up_to_its_quantisation(tmp_path):
    """Zero-padded FedAvg with SecAgg+ (fl.flower.secagg): no train reply carries an array
    (each node's adapters leave only masked), and the run is the local engine's up to
    SecAgg+'s fixed point (2**22 levels over [-clip, clip]: < 3e-7 per value of the mean
    with clip 0.5, which these adapters fit in): every train loss and gradient norm, round
    2's included (it trains from the securely averaged adapters), within 1e-4, and every
    held-out metric equal."""
    overrides = {**FLOWER_SMALL, "fl.strategy": "zeropad", "fl.dp.clip": None,
                 "fl.dp.noise_multiplier": None, "fl.flower.secagg_clip": 0.5}
    local = run_lib.run(load_config("demo", overrides), tmp_path / "local")
    replies = []

    def keep(k, kind, reply):
        replies.append((kind, reply))
        return reply

    config = load_config("demo", {**overrides, "fl.engine": "flower", "fl.flower.secagg": True})
    secure = run_flower(config, tmp_path / "secure", InProcessGrid(2, keep))
    assert any(kind == "train" for kind, _ in replies)
    for kind, reply in replies:
        assert not any(len(rec) for rec in reply.content.array_records.values()), kind
    def by_event(workdir):  # each record under what it is of (values left out of the key)
        return {tuple(r.get(k) for k in ("kind", "phase", "round", "client", "step", "model")):
                r for r in _records(workdir)}

    ours, theirs = by_event(tmp_path / "secure"), by_event(tmp_path / "local")
    assert ours.keys() == theirs.keys()
    for event, a in ours.items():
        b = theirs[event]
        assert a.keys() == b.keys(), (a, b)
        for key, value in a.items():
            if a["kind"] == "train" and isinstance(value, float):
                assert value == pytest.approx(b[key], rel=1e-4, abs=1e-6), (key, a, b)
            else:
                assert value == b[key], (key, a, b)
    local.pop("wall_time_s"), secure.pop("wall_time_s")
    assert secure == local
