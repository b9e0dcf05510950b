"""Federated FF-RAG end to end (shrunk), its resume, the exported system and the ask CLI,
and the answer metrics."""

import json
import shutil

import numpy as np
import pytest
from killing import assert_strict_json_everywhere, comparable, kill_and_resume

from ffrag_jax import evaluation
from ffrag_jax.errors import UserError

SMALL = {"pretrain.steps": 4, "pretrain.num_examples": 64, "pretrain.batch_size": 8,
         "data.domains": "clinic,legal", "data.private_entities": 4, "data.shared_entities": 1,
         "fl.num_clients": 2, "lora.generator.ranks": (4, 2), "fl.rounds": 2, "fl.local_steps": 2,
         "fl.batch_size": 4, "lora.retriever.rank": 2,
         # 1 shared entity x 3 relations x 2 domains = 6 shared facts < the quota of 8: the
         # missing candidates are padded and masked, not an error
         "rag.k_private": 2, "rag.k_shared": 8,
         "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_layers": 2,
         # a small BPE trained by the run, instead of the demo's shipped 1536-token one
         "tokenizer.path": None, "tokenizer.vocab_size": 400,
         "log_every": 1, "eval.batch_size": 8}


@pytest.fixture(scope="module")
def ffrag_run(tmp_path_factory):
    from ffrag_jax.launch import load_config
    from ffrag_jax.training import run as run_lib

    workdir = tmp_path_factory.mktemp("ffrag") / "run"
    summary = run_lib.run(load_config("demo", SMALL), workdir)  # the README's first command
    return workdir, summary


def _records(workdir):
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_ffrag_job_rounds_metrics_and_export(ffrag_run):
    workdir, summary = ffrag_run
    assert summary["rounds"] == 2
    assert set(summary["base"]) == {"recall@1", "recall@10", "answer_in_context", "rag_em",
                                    "rag_f1", "closed_book_em", "closed_book_f1"}
    assert "closed_book_em" in summary["fused"] and "closed_book_em" not in summary["global"]
    records = _records(workdir)
    evals = sorted((r["round"], r["name"], r["model"]) for r in records if r["kind"] == "eval")
    assert evals == sorted([(0, c, "base") for c in ("0:clinic", "1:legal")] + [
        (n, c, m) for n in (1, 2) for c in ("0:clinic", "1:legal") for m in ("global", "fused")])
    steps = [(r["round"], r["client"], r["step"]) for r in records if r.get("phase") == "ffrag"]
    assert len(steps) == 2 * 2 * 2 and all(np.isfinite(r["loss"]) for r in records
                                             if r.get("phase") == "ffrag")
    for name in ("rounds.png", "loss.png", "export/system.json", "export/generator/config.json",
                 "export/clients/1/generator/adapter_config.json",
                 "export/clients/0/retriever_lora.safetensors",
                 "export/knowledge/shared/manifest.json"):
        assert (workdir / name).exists(), name


def test_ffrag_resumes_after_the_last_finished_round(ffrag_run, tmp_path):
    """A run killed after round 1 (round 2's checkpoint and the summary gone) redoes round 2
    only, logs it once, and ends where the uninterrupted run ended."""
    from ffrag_jax.launch import load_config
    from ffrag_jax.training import run as run_lib

    workdir, summary = ffrag_run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    shutil.rmtree(copy / "checkpoints/ffrag/2")
    (copy / "summary.json").unlink()
    shutil.rmtree(copy / "export")
    again = run_lib.run(load_config("demo", SMALL), copy)
    for model in ("base", "global", "fused"):
        for key, value in summary[model].items():
            assert again[model][key] == pytest.approx(value, abs=1e-9), (model, key)
    evals = [(r["round"], r["name"], r["model"]) for r in _records(copy) if r["kind"] == "eval"]
    assert len(evals) == len(set(evals)) == 2 + 2 * 2 * 2


def test_ffrag_stack_strategy_merges_the_rounds_into_the_bases(tmp_path):
    """FLoRA without personalisation: fresh adapters every round, merged into the generator
    and the query encoder; only the global model is evaluated; ask answers with the merged
    query encoder. The clients train in one vmapped program (ranks 4 and 2, padded)."""
    from ffrag_jax.cli import ask
    from ffrag_jax.launch import load_config
    from ffrag_jax.training import run as run_lib

    summary = run_lib.run(load_config("demo", {**SMALL, "fl.strategy": "stack",
                                                "fl.rounds": 1, "fl.vmap_clients": True}),
                          tmp_path / "run")
    assert set(summary) == {"rounds", "base", "global", "wall_time_s"}
    assert "closed_book_em" in summary["global"]
    assert (tmp_path / "run/export/query_encoder/modules.json").exists()
    assert not (tmp_path / "run/export/clients").exists()
    assert ask.main(["--workdir", str(tmp_path / "run"), "Who heard case Bo-12?"]) == 0
    with pytest.raises(UserError, match="fl.strategy='fedavg' needs one rank for all clients"):
        run_lib.run(load_config("demo", {**SMALL, "fl.strategy": "fedavg"}), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    # Bad adapter settings are refused before pretraining: nothing is trained or checkpointed.
    with pytest.raises(UserError, match="LoRA target 'qproj' matches no module"):
        run_lib.run(load_config("demo", {**SMALL, "lora.generator.targets": "qproj"}),
                    tmp_path / "bad2")
    with pytest.raises(UserError, match="LoRA target 'keys' matches no module"):
        run_lib.run(load_config("demo", {**SMALL, "lora.retriever.targets": "keys"}),
                    tmp_path / "bad3")
    assert not (tmp_path / "bad2/checkpoints").exists()


def test_ffrag_runs_a_server_optimiser_with_int8_payloads(tmp_path):
    """A strategy beyond FF-LoRA and FLoRA in the FF-RAG job: FedAdam's global adapters (the
    generator's zero-padded over ranks 4 and 2), the adapters sent as blockwise int8."""
    from ffrag_jax.launch import load_config
    from ffrag_jax.training import run as run_lib
    from ffrag_jax.training.metrics import read_jsonl

    summary = run_lib.run(load_config("demo", {
        **SMALL, "fl.strategy": "fedadam", "fl.settings.lr": 0.01, "fl.payload": "int8",
        "fl.rounds": 1, "fl.vmap_clients": True}), tmp_path / "run")
    assert set(summary) == {"rounds", "base", "global", "wall_time_s"}
    assert summary["rounds"] == 1 and np.isfinite(summary["global"]["recall@1"])
    assert not (tmp_path / "run/export/clients").exists()  # not personalised
    records = read_jsonl(tmp_path / "run/metrics.jsonl")
    assert {(r["round"], r["model"]) for r in records if r["kind"] == "eval"} == {
        (0, "base"), (1, "global")}
    # Bytes each client sent and received, every adapter (generator, query encoder).
    payload = [r for r in records if r["kind"] == "payload"]
    assert [r["client"] for r in payload] == [0, 1]
    assert payload[0]["upload_bytes"] == payload[0]["download_bytes"]  # FedIT: same adapter
    assert payload[1]["upload_bytes"] < payload[0]["upload_bytes"]  # rank 2 against 4


def test_ask_cli_answers_with_sources(ffrag_run, tmp_path, capsys):
    from ffrag_jax.cli import ask

    workdir, _ = ffrag_run
    assert ask.main(["--workdir", str(workdir), "--client", "0",
                     "Which drug was prescribed to patient Ab Cd?"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Q: Which drug was prescribed to patient Ab Cd?\nA: ")
    assert "[cases_0]" in out and "[shared]" in out

    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "Who heard case Bo-12?"}) + "\n\n"
                         + json.dumps({"question": "Who treats patient Ab Cd?"}) + "\n")
    answers = tmp_path / "a.jsonl"
    assert ask.main(["--workdir", str(workdir / "export"), "--questions", str(questions),
                     "--output", str(answers), "--temperature", "0.8", "--top-p", "0.9"]) == 0
    rows = [json.loads(x) for x in answers.read_text().splitlines()]
    assert [r["question"] for r in rows] == ["Who heard case Bo-12?", "Who treats patient Ab Cd?"]
    for r in rows:  # the global model searches the shared base only, with its quota (8 > 6)
        assert {h["kb"] for h in r["sources"]} == {"shared"} and len(r["sources"]) == 6
        assert r["context"] == r["sources"][0]["text"]

    # Nothing retrieved (BM25 finds no shared term): answered closed-book, no sources.
    assert ask.main(["--workdir", str(workdir), "--mode", "bm25", "--questions",
                     str(questions)]) == 0
    capsys.readouterr()
    assert ask.main(["--workdir", str(workdir), "--mode", "bm25", "zzzq xxqv"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Q: zzzq xxqv\nA: ") and "[" not in out


@pytest.mark.parametrize("argv, message", [
    (["--client", "5", "q"], "--client 5: this system's clients are 0 (0:clinic), 1 (1:legal)"),
    ([], "no question"),
    (["--questions", "missing.jsonl"], "--questions missing.jsonl: no such file"),
    (["--top-p", "0", "q"], "--top-p in (0, 1]"),
])
def test_ask_bad_input_is_one_line(ffrag_run, capsys, argv, message):
    from ffrag_jax.cli import ask

    workdir, _ = ffrag_run
    assert ask.main(["--workdir", str(workdir), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_ask_refuses_a_folder_without_a_system(tmp_path, capsys):
    from ffrag_jax.cli import ask

    assert ask.main(["--workdir", str(tmp_path), "q"]) == 2
    assert "no system.json" in capsys.readouterr().err
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question": "fine"}\n[1, 2]\n')
    with pytest.raises(UserError, match=r"q.jsonl:2: expected an object"):
        ask.read_questions(str(bad))


def test_exact_match_f1_and_answer_in_context():
    # SQuAD v1.1 normalisation: case, punctuation and articles do not count.
    assert evaluation.exact_match("The Eiffel Tower!", "eiffel tower") == 1.0
    # pred {eiffel, tower, in, paris} vs gold {eiffel, tower}: P 1/2, R 1, F1 2/3.
    assert evaluation.f1("the Eiffel Tower in Paris", "Eiffel Tower") == pytest.approx(2 / 3)
    assert evaluation.f1("Paris", ["Eiffel Tower", "Paris"]) == 1.0  # best over the answers
    assert evaluation.f1("", "Paris") == 0.0 and evaluation.f1("Rome", "Paris") == 0.0
    # Tokens count as a multiset: 2 of the 3 predicted tokens are matched (P = R = 2/3).
    assert evaluation.f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert evaluation.f1_score(["Paris", "Rome"], ["Paris", "Paris"]) == 0.5
    assert evaluation.answer_in_context_rate(
        ["The capital is Paris.", "Nothing here.", ""], ["paris", "Rome", "x"]) == pytest.approx(
            1 / 3)


def test_ffrag_demo_killed_at_5_random_points(ffrag_run, tmp_path):
    """SIGKILL at 5 points chosen by a seed (start-up, pretraining, mid-round, export, ...),
    the same command each time: the summary and every record equal the uninterrupted run's."""
    full_dir, _ = ffrag_run
    args = ["--config", "demo", "--workdir", str(tmp_path / "killed"),
            *[f"--config.{k}={v}" for k, v in SMALL.items()]]
    log = kill_and_resume(args, tmp_path / "killed", total_records=len(_records(full_dir)),
                          seed=3)
    summary = lambda w: json.loads((w / "summary.json").read_text())
    assert comparable(summary(tmp_path / "killed")) == comparable(summary(full_dir)), log
    assert comparable(_records(tmp_path / "killed")) == comparable(_records(full_dir)), log


def test_ffrag_divergence_names_the_learning_rates(tmp_path):
    from ffrag_jax.launch import load_config
    from ffrag_jax.training import run as run_lib

    with pytest.raises(UserError, match=r"diverged; lower fl\.(retriever_)?lr \(now 1e\+06\)"):
        run_lib.run(load_config("demo", {**SMALL, "fl.lr": 1e6, "fl.retriever_lr": 1e6}),
                    tmp_path / "run")


def test_a_retriever_lr_of_zero_leaves_the_query_encoder_as_it_is(tmp_path):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ffrag_jax.launch import load_config
    from ffrag_jax.training import run as run_lib
    from ffrag_jax.training import train

    # fl.retriever_lr=0: the optimizer of the query encoder's adapter moves nothing, whatever
    # the gradient (the adapter's B stays 0, so the encoder is the one it started from)
    opt = train.make_optimizer(0.0, 10)
    params = {"a": jnp.ones((3, 2)), "b": jnp.zeros((2, 3))}
    state = opt.init(params)
    for seed in range(3):
        grads = jax.tree.map(lambda p, s=seed: jax.random.normal(jax.random.key(s), p.shape),
                             params)
        updates, state = opt.update(grads, state, params)
        assert all(not np.asarray(u).any() for u in jax.tree.leaves(updates))
    with pytest.raises(UserError, match=r"fl.retriever_lr must be >= 0, got -0.001"):
        run_lib.run(load_config("demo", {**SMALL, "fl.retriever_lr": -1e-3}), tmp_path / "r")
    with pytest.raises(UserError, match=r"fl.lr must be positive, got 0"):
        run_lib.run(load_config("demo", {**SMALL, "fl.lr": 0.0}), tmp_path / "g")


LONG_QUESTION = ("I am going through the court records of last month for my report and I "
                 "would really like to know, if you can tell me, who heard case Bo-12?")


def test_ask_keeps_the_passage_and_cuts_a_long_question(ffrag_run, caplog):
    from ffrag_jax.rag.system import load_system

    workdir, _ = ffrag_run
    system = load_system(workdir)
    (long, huge) = system.ask([LONG_QUESTION, "who heard case Bo-12? " * 450])
    for r in (long, huge):
        assert r["cut"] == ["question"]
        assert r["context"] == r["sources"][0]["text"]  # the whole top passage was read
    assert "question 1: the question was cut to fit the reader's 48-token prompt" in caplog.text
    assert "question 2: the question was cut" in caplog.text
    (short,) = system.ask(["Who heard case Bo-12?"])
    assert short["cut"] == [] and short["context"] == short["sources"][0]["text"]


@pytest.mark.parametrize("argv, message", [
    (["   "], "question 1 is empty"),
    (["--top-k", "-5", "--temperature", "0.7", "q"], "--top-k >= 0 expected (0: off), got -5"),
    (["--top-p", "0.9", "q"], "--top-p and --top-k only apply when sampling"),
    (["--temperature", "nan", "q"], "--temperature >= 0 expected"),
    (["--max-new-tokens", "1000", "q"], "--max-new-tokens 1000: this reader has room for"),
])
def test_ask_refuses_nonsense_in_one_line(ffrag_run, capsys, argv, message):
    from ffrag_jax.cli import ask

    workdir, _ = ffrag_run
    assert ask.main(["--workdir", str(workdir), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_ask_checks_its_output_and_inputs_before_answering(ffrag_run, tmp_path, capsys,
                                                           monkeypatch):
    from ffrag_jax.cli import ask
    from ffrag_jax.rag import system as inference

    workdir, _ = ffrag_run

    def no_answering(*args, **kwargs):
        raise AssertionError("answers were computed before the output was checked")

    monkeypatch.setattr(inference, "load_system", no_answering)
    assert ask.main(["--workdir", str(workdir), "--output", str(tmp_path / "no/such/a.jsonl"),
                     "q"]) == 2
    assert "folder " + str(tmp_path / "no/such") + " does not exist" in capsys.readouterr().err
    latin = tmp_path / "q.jsonl"
    latin.write_bytes(b'{"question": "caf\xe9?"}\n')
    assert ask.main(["--workdir", str(workdir), "--questions", str(latin)]) == 2
    assert "q.jsonl: not UTF-8 text" in capsys.readouterr().err
    monkeypatch.undo()
    out = tmp_path / "a.jsonl"
    assert ask.main(["--workdir", str(workdir), "--output", str(out), "Who heard case Bo-12?"]
                    ) == 0
    (row,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert row["question"] == "Who heard case Bo-12?" and row["cut"] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "q.jsonl"]  # no temp


def test_ask_with_a_damaged_export_is_one_line(ffrag_run, tmp_path, capsys):
    from ffrag_jax.cli import ask

    workdir, _ = ffrag_run
    copy = tmp_path / "export"
    shutil.copytree(workdir / "export", copy)
    weights = copy / "generator" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert ask.main(["--workdir", str(copy), "Who heard case Bo-12?"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.safetensors: damaged safetensors file" in err, err


def test_a_moved_export_loads_in_transformers_and_peft_and_scores_as_the_job(ffrag_run,
                                                                            tmp_path):
    """Copy the run elsewhere and delete the copy's origin: the generator and a client's
    adapter load in transformers + peft, the exported tokenizer gives the job's prompt ids
    (BOS included), and the logits equal our forward of the client's fused model."""
    import jax
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from ffrag_jax import rag
    from ffrag_jax.models import hf, llama, lora
    from ffrag_jax.rag import prompts

    workdir, _ = ffrag_run
    origin = tmp_path / "origin"
    shutil.copytree(workdir / "export", origin)
    moved = tmp_path / "elsewhere" / "export"
    moved.parent.mkdir()
    shutil.move(origin, moved)
    adapter_dir = moved / "clients/0/generator"
    conf = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == "../../../generator"  # export/generator
    system = json.loads((moved / "system.json").read_text())
    assert system["prompt_template"] == prompts.TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(moved / "generator")
    assert tokenizer.model_max_length == 128
    generation = GenerationConfig.from_pretrained(moved / "generator")
    assert generation.eos_token_id == tokenizer.eos_token_id and not generation.do_sample
    passage, question = "Patient Ab Cd stays in ward G8.", "Which ward is patient Ab Cd in?"
    job_ids = rag.fit_prompt(tokenizer, passage, question, system["prompt_len"]).ids
    text = prompts.TEMPLATE.format(context=passage, question=question)
    assert tokenizer(text)["input_ids"] == job_ids  # <s> first, as in training

    base = AutoModelForCausalLM.from_pretrained(moved / "generator")
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    ids = torch.tensor([job_ids + tokenizer(" G8", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        ref = model(input_ids=ids).logits.numpy()
    cfg, params = hf.load_llama(moved / "generator")
    adapter = lora.load_peft_adapter(adapter_dir, cfg)
    ours = np.asarray(llama.forward(params, cfg, jax.numpy.asarray(ids.numpy()), None, adapter))
    assert np.abs(ours - ref).max() <= 1e-4


def test_the_demo_reads_with_its_shipped_tokenizer(tmp_path):
    """--config demo reads the tokenizer shipped in the package (the same tokens on every
    install): every question fits the prompt with its passage and every answer its budget."""
    from ffrag_jax import rag
    from ffrag_jax.jobs import ffrag as ffrag_job
    from ffrag_jax.jobs.base_model import run_tokenizer
    from ffrag_jax.launch import load_config
    from ffrag_jax.rag import prompts

    config = load_config("demo")
    assert config.tokenizer.path == "packaged:demo"
    tokenizer = run_tokenizer(config, tmp_path, texts=iter(()))  # no training: nothing read
    assert len(tokenizer) == config.tokenizer.vocab_size == 1536
    assert (tmp_path / "tokenizer/tokenizer.json").exists()  # a resumed run reads this copy
    assert tokenizer("Context:")["input_ids"][0] == tokenizer.bos_token_id
    shared, clients = ffrag_job.client_knowledge(config)
    for c in clients:
        passages = c.private + shared
        for q in c.train + c.test:
            prompt = rag.fit_prompt(tokenizer, passages[q["fact"]], q["question"],
                                    config.rag.prompt_len)
            assert (prompt.passage, prompt.question) == (passages[q["fact"]], q["question"])
            assert len(rag.answer_ids(tokenizer, q["answer"])) <= config.rag.answer_len
    assert prompts.TEMPLATE.startswith("Context:")


def test_a_clients_retriever_loads_in_sentence_transformers_with_peft(ffrag_run):
    """The exported PEFT adapter of client 0's query encoder (global + personal LoRA) on the
    plain MiniLM embeds questions as the system's query encoder does."""
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer

    from ffrag_jax.rag.system import load_system
    from ffrag_jax.retrieval.encoder import default_encoder_path

    workdir, _ = ffrag_run
    questions = ["Which ward is patient Ab Cd in?", "Who heard case Bo-12?"]
    system = load_system(workdir, client=0)
    ours = system.bases[0].query_encoder.embed(questions)
    model = SentenceTransformer(str(default_encoder_path()), device="cpu")
    model[0].auto_model = PeftModel.from_pretrained(model[0].auto_model,
                                                    workdir / "export/clients/0/retriever")
    theirs = model.encode(questions, convert_to_numpy=True)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_every_json_the_job_writes_is_strict_json(ffrag_run):
    workdir, _ = ffrag_run
    assert assert_strict_json_everywhere(workdir) > 20


def test_the_exported_system_retrieves_and_answers_as_the_job_evaluated(ffrag_run):
    """Every client's fused model, loaded from the export, retrieves the same passages in the
    same order for every held-out question as the job's last evaluation did (one multi-source
    search for both), and generates the same answers."""
    from ffrag_jax.launch import load_config
    from ffrag_jax.rag.system import load_system

    config = load_config("demo", SMALL)
    workdir, _ = ffrag_run
    rows = [json.loads(x) for x in (workdir / "predictions.jsonl").read_text().splitlines()]
    assert {(r["name"], r["model"]) for r in rows} == {
        (c, m) for c in ("0:clinic", "1:legal") for m in ("global", "fused")}
    assert all(r["round"] == 2 for r in rows)
    for k, name in enumerate(("0:clinic", "1:legal")):
        fused = [r for r in rows if r["name"] == name and r["model"] == "fused"]
        system = load_system(workdir, client=k)
        got = system.ask([r["question"] for r in fused],
                         max_new_tokens=config.eval.max_new_tokens,
                         batch_size=config.eval.batch_size)
        assert len(got) == len(fused) > 0
        for want, have in zip(fused, got, strict=True):
            assert [h["text"] for h in have["sources"]] == want["retrieved"], want["question"]
            assert have["answer"] == want["prediction"], want["question"]


def test_one_metrics_schema_client_index_and_name_steps_count_on(ffrag_run):
    """FF-RAG's records use the federated job's schema: ``client`` is the index and ``name``
    the client's name; a client's training steps count on across rounds."""
    workdir, _ = ffrag_run
    records = _records(workdir)
    assert {(r["client"], r["name"]) for r in records if "client" in r} == {
        (0, "0:clinic"), (1, "1:legal")}
    for k in (0, 1):
        steps = [(r["round"], r["step"]) for r in records
                 if r.get("phase") == "ffrag" and r["client"] == k]
        assert steps == [(1, 1), (1, 2), (2, 3), (2, 4)]


def test_ffrag_with_client_differential_privacy(tmp_path):
    """fl.dp in FF-RAG: every trained model's update clipped and noised together on each
    client; epsilon per round and in the summary."""
    from ffrag_jax.launch import load_config
    from ffrag_jax.training import run as run_lib
    from ffrag_jax.training.metrics import read_jsonl

    summary = run_lib.run(load_config("demo", {
        **SMALL, "fl.rounds": 1, "fl.vmap_clients": True, "fl.dp.clip": 1.0,
        "fl.dp.epsilon": 8.0}), tmp_path / "run")
    assert 7.9 < summary["dp"]["epsilon"] <= 8.0 and summary["dp"]["delta"] == 1e-5
    privacy = [r for r in read_jsonl(tmp_path / "run/metrics.jsonl") if r["kind"] == "privacy"]
    assert [r["round"] for r in privacy] == [1]
    assert np.isfinite(summary["fused"]["recall@1"])
