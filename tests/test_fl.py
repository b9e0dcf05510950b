"""The federated round loop (issue 3): per-client step counts, the jitted round's aggregation
and NaN rejection, data loading and splits, and the federated job end to end with resume."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from killing import assert_strict_json_everywhere, comparable, kill_and_resume
from safetensors.numpy import load_file

from ffrag_jax import data, federated
from ffrag_jax.errors import UserError
from ffrag_jax.federated import round_step as fl_round
from ffrag_jax.jobs import federated as fl
from ffrag_jax.jobs import lm_clients  # where the job evaluates a round
from ffrag_jax.launch import load_config
from ffrag_jax.models import llama, lora
from ffrag_jax.training import checkpoint, train
from ffrag_jax.training import run as run_lib

CFG = llama.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=4, num_kv_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def params():
    return llama.init_params(jax.random.key(0), CFG)


def _random_adapter(params, seed, rank):
    lo = lora.init(jax.random.key(seed), params, ["q_proj", "v_proj"], rank, 2.0 * rank)
    leaves, tree = jax.tree.flatten(lo.weights)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    return lo.replace(weights=jax.tree.unflatten(
        tree, [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]))


def _batches(num_clients, steps, seed=0):
    ids = jax.random.randint(jax.random.key(seed), (num_clients, steps, 1, 4, 16), 0, 96)
    return {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "loss_mask": jnp.ones_like(ids)}


def test_stack_padded_equals_stack_of_unpadded_clients(params):
    ranks = [8, 4, 2]
    clients = [_random_adapter(params, k, r) for k, r in enumerate(ranks)]
    weights = federated.client_weights([30, 10, 60])
    padded = federated.stack_clients([federated.pad_rank(c, 8) for c in clients])
    got = lora.delta(federated.stack_padded(padded, jnp.asarray(weights, jnp.float32)))
    want = lora.delta(federated.stack(clients, weights))
    for path in want:
        rel = float(jnp.linalg.norm(got[path] - want[path]) / jnp.linalg.norm(want[path]))
        assert rel <= 1e-6, path


def test_a_client_with_fewer_steps_equals_training_only_those_steps(params):
    """Per-client step counts: steps past a client's count change nothing, and its LR decays
    over its own steps (same as a client whose batches stop there)."""
    adapter = federated.pad_rank(lora.init(jax.random.key(1), params, ["q_proj"], 4, 8.0), 4)
    mask = federated.rank_mask(4, 4)
    batches = jax.tree.map(lambda x: x[0], _batches(1, 4))
    make = lambda n: train.make_optimizer(1e-2, n)  # noqa: E731
    short, metrics = jax.jit(lambda b: federated.client_update(
        adapter, mask, params, b, jax.random.key(2), cfg=CFG, optimizer=make,
        num_steps=jnp.asarray(2)))(batches)
    alone, _ = jax.jit(lambda b: federated.client_update(
        adapter, mask, params, b, jax.random.key(2), cfg=CFG, optimizer=make))(
        jax.tree.map(lambda x: x[:2], batches))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7),
                 short.weights, alone.weights)
    assert metrics["active"].tolist() == [True, True, False, False]


@pytest.mark.parametrize("strategy", ["stack", "ff"])
def test_round_rejects_a_non_finite_client(params, strategy):
    """A client whose update is NaN gets weight 0; the result equals the round without it."""
    ranks, per_round = [4, 4, 2], 3
    template = lora.init(jax.random.key(0), params, ["q_proj", "v_proj"], 4, 8.0)
    server = fl.init_server(strategy, params, template, 3, per_round, 4, jax.random.key(5))
    fresh = federated.stack_clients([lora.init(jax.random.key(10 + k), params,
                                               ["q_proj", "v_proj"], 4, 8.0) for k in range(3)])
    masks = jnp.stack([federated.rank_mask(r, 4) for r in ranks])
    batches = _batches(3, 2)
    rngs = jax.random.split(jax.random.key(3), 3)
    steps = jnp.asarray([2, 2, 2])
    selected = jnp.arange(3)
    run = jax.jit(lambda server, fresh, w, b: fl_round.run_round(
        server, fresh, selected, w, masks, b, rngs, steps, cfg=CFG,
        optimizer=lambda n: train.make_optimizer(1e-2, n), strategy=strategy))
    # Client 1 diverges: a NaN in its data's embedding path is simplest as a NaN start.
    poisoned = jax.tree.map(lambda x: x.at[1].set(jnp.nan), fresh)
    if strategy == "ff":
        server_nan = dict(server, personal=jax.tree.map(lambda x: x.at[1].set(jnp.nan),
                                                        server["personal"]))
    else:
        server_nan = server
    weights = jnp.asarray([0.25, 0.5, 0.25])
    new, _, info = run(server_nan, poisoned, weights, batches)
    assert info["accepted"].tolist() == [True, False, True]
    ref, _, _ = run(server, fresh, jnp.asarray([0.5, 0.0, 0.5]), batches)
    key = "params" if strategy == "stack" else "global"
    for got, want in zip(jax.tree.leaves(new[key]), jax.tree.leaves(ref[key]), strict=True):
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_a_server_optimiser_round_rejects_a_non_finite_client(params):
    """FedAdam through the jitted round: a client whose training diverges (its own learning
    rate is NaN; clients start from the global adapter, so only its run can go bad) is left
    out, and the server steps exactly as in the round where it had weight 0."""
    template = lora.init(jax.random.key(0), params, ["q_proj", "v_proj"], 4, 8.0)
    server = fl.init_server("fedadam", params, template, 3, 3, 4, jax.random.key(5))
    masks, batches = jnp.ones((3, 4)), _batches(3, 3)
    rngs, selected = jax.random.split(jax.random.key(3), 3), jnp.arange(3)
    steps = jnp.asarray([2, 3, 2])  # client 1 is the one with 3 steps

    @jax.jit  # one program for both runs: `poison` is traced
    def run(weights, poison):
        def optimizer(n):
            return train.make_optimizer(jnp.where(poison & (n == 3), jnp.nan, 1e-2), n)
        return fl_round.run_round(server, None, selected, weights, masks, batches, rngs, steps,
                                  cfg=CFG, optimizer=optimizer, strategy="fedadam")

    new, _, info = run(jnp.asarray([0.25, 0.5, 0.25]), jnp.asarray(True))
    assert info["accepted"].tolist() == [True, False, True]
    ref, _, _ = run(jnp.asarray([0.5, 0.0, 0.5]), jnp.asarray(False))
    for got, want in zip(jax.tree.leaves(new), jax.tree.leaves(ref), strict=True):
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert int(new["server_opt"][0].count) == 1
    assert not np.allclose(new["global"].weights["layers"]["self_attn"]["q_proj"]["b"],
                           server["global"].weights["layers"]["self_attn"]["q_proj"]["b"])


def test_round_with_every_client_rejected_keeps_the_state(params):
    template = lora.init(jax.random.key(0), params, ["q_proj"], 2, 4.0)
    server = fl.init_server("fedavg", params, template, 2, 2, 2, jax.random.key(5))
    fresh = federated.stack_clients([template, template])
    new, _, info = fl_round.run_round(
        server, fresh, jnp.arange(2), jnp.asarray([0.5, 0.5]),
        jnp.ones((2, 2)), _batches(2, 1), jax.random.split(jax.random.key(1), 2),
        jnp.asarray([1, 1]), cfg=CFG, optimizer=lambda n: train.make_optimizer(jnp.nan, n),
        strategy="fedavg")
    assert not info["accepted"].any()
    jax.tree.map(np.testing.assert_array_equal, new["global"], server["global"])


# --------------------------------------------------------------------------------------------
# Data


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output"\n')
    with pytest.raises(UserError, match=r"c\.jsonl:3: malformed JSON line"):
        data.read_records(path)
    folder = tmp_path / "d" / "2"
    folder.mkdir(parents=True)
    (folder / "local_training_0.json").write_text(json.dumps([{"instruction": "x",
                                                               "output": "y"}]))
    with pytest.raises(UserError, match="client 1: missing data file"):
        data.load_client_files(tmp_path / "d", 2)


def test_alpaca_template_and_splits():
    prompt, response = data.render({"instruction": "Add.", "input": "1 2", "output": "3"})
    assert prompt.endswith("### Instruction:\nAdd.\n\n### Input:\n1 2\n\n### Response:\n")
    assert response == "3"
    assert "### Input" not in data.render({"instruction": "Hi", "input": "", "output": "o"})[0]
    parts = data.split_iid(103, 4, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(103))
    assert [len(p) for p in parts] == [26, 26, 26, 25]
    labels = ["a"] * 60 + ["b"] * 60 + ["c"] * 60
    skewed = data.split_dirichlet(labels, 3, alpha=0.1, seed=0)
    assert sorted(np.concatenate(skewed).tolist()) == list(range(180))
    # Small alpha: each category goes mostly to one client; large alpha: evenly (~1/3 each).
    def top_share(parts):
        owner = np.empty(180, int)
        for k, p in enumerate(parts):
            owner[p] = k
        return np.mean([np.bincount(owner[c * 60:(c + 1) * 60], minlength=3).max() / 60
                        for c in range(3)])

    assert top_share(skewed) > 0.8
    assert top_share(data.split_dirichlet(labels, 3, alpha=1000.0, seed=0)) < 0.45
    names, by_field = data.split_by_field([{"c": "x"}, {"c": "y"}, {"c": "x"}], "c")
    assert names == ["x", "y"] and [p.tolist() for p in by_field] == [[0, 2], [1]]
    train_idx, held = data.holdout(np.arange(10), 0.2, seed=0)
    assert len(held) == 2 and set(train_idx) | set(held) == set(range(10))


# --------------------------------------------------------------------------------------------
# The job end to end

TINY_FL = {
    "fl.num_clients": 4,
    "lora.generator.ranks": (4, 2, 2, 1),
    "fl.rounds": 3,
    "fl.batch_size": 8,
    "fl.micro_batch_size": 4,
    "fl.lr": 3e-3,
    "data.examples_per_client": 20,
    "data.held_out": 0.2,
    "model.hidden_size": 32,
    "model.intermediate_size": 64,
    "model.num_layers": 2,
    "tokenizer.vocab_size": 400,
    "eval.batch_size": 8,
}


def _fl_config(**extra):
    return load_config("heter", {**TINY_FL, **extra})


def _exports(workdir):
    out = dict(load_file(workdir / "export/global_model/model.safetensors"))
    for k in range(4):
        for name, x in load_file(workdir / f"export/personal/client_{k}/"
                                 "adapter_model.safetensors").items():
            out[f"{k}/{name}"] = x
    return out


FF = {"fl.strategy": "ff"}


@pytest.fixture(scope="module")
def ff_full(tmp_path_factory):
    """An uninterrupted FF-LoRA run of the shrunk heter config: ``(workdir, summary)``."""
    workdir = tmp_path_factory.mktemp("ff") / "full"
    return workdir, run_lib.run(_fl_config(**FF), workdir)


def _records(workdir):
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_killed_federated_run_resumes_to_the_same_result(ff_full, tmp_path, monkeypatch):
    config = _fl_config(**FF)
    full_dir, full = ff_full
    records = [json.loads(x) for x in (full_dir / "metrics.jsonl").read_text().splitlines()]
    assert {r["round"] for r in records if r["kind"] == "eval"} == {0, 1, 2, 3}
    assert {r["model"] for r in records if r["kind"] == "eval"} == {"base", "global", "fused"}
    uploads = {r["client"]: r["upload_bytes"] for r in records if r["kind"] == "client"}
    assert uploads[0] == 2 * uploads[1] == 4 * uploads[3] > 0  # ranks 4, 2, 2, 1
    assert (full_dir / "rounds.png").stat().st_size > 0

    calls = {"n": 0}
    real = lm_clients.evaluate_round

    def dies_in_round_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # the base model's evaluation, rounds 1 and 2, then round 3
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(lm_clients, "evaluate_round", dies_in_round_3)
    with pytest.raises(KeyboardInterrupt):
        run_lib.run(config, tmp_path / "killed")
    monkeypatch.setattr(lm_clients, "evaluate_round", real)
    resumed = run_lib.run(config, tmp_path / "killed")
    assert resumed["final_held_out_loss"] == full["final_held_out_loss"]
    a, b = _exports(full_dir), _exports(tmp_path / "killed")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    rounds = [json.loads(x)["round"] for x in
              (tmp_path / "killed/metrics.jsonl").read_text().splitlines()
              if json.loads(x)["kind"] == "round"]
    assert rounds == [1, 2, 3]


def test_torn_metrics_line_and_a_kill_in_round_1_resume_without_duplicates(
        ff_full, tmp_path, monkeypatch):
    """Killed during round 1 (the base model's records written, no round checkpoint yet) and
    a half-written record left at the end of metrics.jsonl: the resumed run drops the torn
    line, rewinds the log to its last checkpoint (none: the start) and ends with exactly the
    uninterrupted run's records and summary."""
    full_dir, full = ff_full
    real = lm_clients.evaluate_round
    calls = {"n": 0}

    def dies_in_round_1(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the base model's evaluation, then round 1's
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(lm_clients, "evaluate_round", dies_in_round_1)
    with pytest.raises(KeyboardInterrupt):
        run_lib.run(_fl_config(**FF), tmp_path / "killed")
    monkeypatch.setattr(lm_clients, "evaluate_round", real)
    metrics = tmp_path / "killed/metrics.jsonl"
    assert any(r["kind"] == "client" for r in _records(tmp_path / "killed"))
    with metrics.open("ab") as f:
        f.write(b'{"kind": "eval", "round": 1, "client": 0, "lo')
    resumed = run_lib.run(_fl_config(**FF), tmp_path / "killed")
    assert comparable(resumed, tmp_path / "killed") == comparable(full, full_dir)
    assert comparable(_records(tmp_path / "killed")) == comparable(_records(full_dir))


def test_federated_job_killed_at_5_random_points(ff_full, tmp_path):
    """SIGKILL at 5 points chosen by a seed (start-up, mid-round, mid-write, ...), the same
    command each time: the summary and every record equal the uninterrupted run's."""
    full_dir, full = ff_full
    args = ["--config", "heter", "--workdir", str(tmp_path / "killed"),
            *[f"--config.{k}={v}" for k, v in {**TINY_FL, **FF}.items()]]
    log = kill_and_resume(args, tmp_path / "killed", total_records=len(_records(full_dir)),
                          seed=13)
    summary = json.loads((tmp_path / "killed/summary.json").read_text())
    assert comparable(summary, tmp_path / "killed") == comparable(
        json.loads((full_dir / "summary.json").read_text()), full_dir), log
    assert comparable(_records(tmp_path / "killed")) == comparable(_records(full_dir)), log


def test_federated_bad_input(tmp_path):
    with pytest.raises(UserError, match=r"lora.generator.ranks has 3 entries but fl.num_clients=4"):
        run_lib.run(_fl_config(**{"lora.generator.ranks": (4, 2, 2)}), tmp_path / "a")
    with pytest.raises(UserError, match="fusion='chain' needs square targets.*v_proj"):
        run_lib.run(_fl_config(**{"fl.strategy": "ff", "fl.fusion": "chain"}), tmp_path / "b")
    with pytest.raises(UserError, match="fedavg' needs one rank"):
        run_lib.run(_fl_config(**{"fl.strategy": "fedavg"}), tmp_path / "c")
    with pytest.raises(UserError, match="MMLU file not found: .*nope.json"):
        run_lib.run(_fl_config(**{"eval.mmlu_path": str(tmp_path / "nope.json")}),
                    tmp_path / "d")
    assert not (tmp_path / "d/checkpoints/rounds").exists()  # stopped before training


def test_client_without_examples_gets_weight_zero_and_mmlu_is_logged(tmp_path):
    items = [{"instruction": "Answer.", "input": f"Qusetion: {q}? Options: A. yes, B. no",
              "output": f"The answer is: {a}", "class": c}
             for q, a, c in [("one", "A. yes", "x"), ("two", "B. no", "x"), ("3", "A. yes", "y")]]
    (tmp_path / "mmlu.json").write_text(json.dumps(items))
    summary = run_lib.run(_fl_config(**{"data.client_sizes": (20, 0, 20, 20),
                                        "fl.rounds": 1, "fl.strategy": "stack",
                                        "eval.mmlu_path": str(tmp_path / "mmlu.json")}),
                          tmp_path / "run")
    records = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    client1 = [r for r in records if r["kind"] == "client" and r["client"] == 1]
    assert client1[0]["steps"] == 0 and not client1[0]["accepted"]
    assert np.isfinite(summary["mean_global_loss"])
    (result,) = [r for r in records if r["kind"] == "mmlu"]
    assert result["round"] == 1 and result["count"] == 3
    assert set(result["per_subject"]) == {"x", "y"}
    assert summary["mmlu_macro"] == result["macro"]


@pytest.mark.eight_devices
def test_clients_sharded_over_8_devices_equal_one_device(tmp_path):
    """The whole job (FF-LoRA, 8 clients per round): the clients axis over 8 devices gives the
    result of the same run on one device."""
    eight_clients = {"fl.num_clients": 8, "lora.generator.ranks": (4, 2, 2, 1, 4, 2, 2, 1),
                     "fl.rounds": 2,
                     "fl.strategy": "ff", "data.examples_per_client": 10, "export": False}
    one = run_lib.run(_fl_config(**eight_clients, **{"mesh.data": 1}), tmp_path / "one")
    eight = run_lib.run(_fl_config(**eight_clients, **{"mesh.clients": 8, "mesh.data": 1}),
                        tmp_path / "eight")
    assert one["final_held_out_loss"].keys() == eight["final_held_out_loss"].keys()
    np.testing.assert_allclose(list(eight["final_held_out_loss"].values()),
                               list(one["final_held_out_loss"].values()), rtol=1e-5)
    states = []
    for name in ("one", "eight"):
        mngr = checkpoint.manager(tmp_path / name / "checkpoints" / "rounds")
        states.append(mngr.restore(mngr.latest_step()))
        mngr.close()
    flat_one = jax.tree_util.tree_leaves_with_path(states[0])
    flat_eight = jax.tree_util.tree_leaves_with_path(states[1])
    assert len(flat_one) == len(flat_eight) > 0
    for (path, a), (_, b) in zip(flat_one, flat_eight, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))


def _alpaca(path, words):
    path.write_text("".join(json.dumps({"instruction": f"Say {w}.", "input": "", "output": w})
                            + "\n" for w in words))
    return path


def test_federated_bad_data_is_one_line_naming_the_file(tmp_path):
    with pytest.raises(UserError, match="fl.num_clients must be at least 1, got 0"):
        run_lib.run(_fl_config(**{"fl.num_clients": 0}), tmp_path / "zero")
    assert not (tmp_path / "zero").exists()  # refused before the workdir was made
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"instruction": "Say caf\xe9.", "input": "", "output": "ok"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    csv_file = tmp_path / "data.csv"
    csv_file.write_text("instruction,input,output\nSay hi.,,hi\n")
    cases = [(latin, r"latin.jsonl: not UTF-8 text \(invalid byte at offset 24\)"),
             (empty, r"data file .*empty.jsonl holds no records")]
    try:
        import datasets  # noqa: F401
    except ImportError:
        cases.append((csv_file, r"data.csv: reading .csv needs the datasets package"))
    for path, message in cases:
        with pytest.raises(UserError, match=message):
            run_lib.run(_fl_config(**{"data.source": "file", "data.path": str(path)}),
                        tmp_path / path.stem)


def test_more_clients_than_records_warns_and_writes_strict_json(tmp_path, caplog):
    """3 records for 10 clients: no client has held-out data. Said in a warning; the summary
    holds null, not NaN, where there is nothing to average."""
    data_file = _alpaca(tmp_path / "three.jsonl", ["one", "two", "three"])
    summary = run_lib.run(_fl_config(**{
        "data.source": "file", "data.path": str(data_file), "fl.num_clients": 10,
        "lora.generator.ranks": (1,) * 10, "fl.rounds": 1, "fl.strategy": "stack",
        "export": False}),
        tmp_path / "run")
    assert "have no held-out examples" in caplog.text
    assert summary["final_held_out_loss"] == {}
    on_disk = json.loads((tmp_path / "run/summary.json").read_text(), parse_constant=pytest.fail)
    assert on_disk["mean_global_loss"] is None
    with pytest.raises(UserError, match="no client has a training example"):
        run_lib.run(_fl_config(**{"data.source": "file", "data.path": str(
            _alpaca(tmp_path / "one.jsonl", ["one"])), "data.held_out": 0.99,
            "fl.num_clients": 1, "lora.generator.ranks": (1,)}), tmp_path / "none")


def test_every_json_the_federated_job_writes_is_strict_json(ff_full):
    workdir, _ = ff_full
    assert assert_strict_json_everywhere(workdir) > 20


def test_a_finished_run_continues_with_more_rounds_exactly(ff_full, tmp_path):
    """``--config.fl.rounds=3`` on a finished 2-round workdir continues it (every round's
    optimizers start afresh): summary, exports and last-round records equal the 3-round
    run's. Fewer rounds, or another setting changed, is refused in one line."""
    full_dir, full = ff_full
    run_lib.run(_fl_config(**FF, **{"fl.rounds": 2}), tmp_path / "w")
    with pytest.raises(UserError, match=r"continues only with more fl.rounds \(it ran 2, "
                                        r"asked 1\)"):
        run_lib.run(_fl_config(**FF, **{"fl.rounds": 1}), tmp_path / "w")
    with pytest.raises(UserError, match="nothing else changed \\(fl.lr: 0.003 -> 0.01\\)"):
        run_lib.run(_fl_config(**FF, **{"fl.lr": 1e-2}), tmp_path / "w")
    continued = run_lib.run(_fl_config(**FF), tmp_path / "w")
    assert comparable(continued, tmp_path / "w") == comparable(full, full_dir)
    last = [r for r in _records(tmp_path / "w") if r.get("round") == 3]
    assert comparable(last) == comparable([r for r in _records(full_dir) if r.get("round") == 3])
    a, b = _exports(full_dir), _exports(tmp_path / "w")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
