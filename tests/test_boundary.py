"""The knowledge boundary and the preference-aligned reranker in the federated FF-RAG job:
the question generator, the boundary metrics, the dual-task loss, query augmentation, and a
shrunk run with a reranker (its records, export, ask --rerank, and exact resume after kills)."""

import importlib.util
import json
import random
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from killing import comparable, kill_and_resume

from ffrag_jax import rag
from ffrag_jax.data import boundary
from ffrag_jax.errors import UserError
from ffrag_jax.evaluation.boundary import boundary_metrics, parse, read
from ffrag_jax.rerank import augment


def _config(**overrides):
    from ffrag_jax.launch import load_config

    return load_config("boundary", {"data.domains": "clinic,legal", "fl.num_clients": 2,
                                    "lora.generator.ranks": (2, 2), **overrides})


def test_boundary_questions_by_type_are_consistent_and_deterministic():
    from ffrag_jax.data.knowledge import client_knowledge

    config = _config()
    shared, clients = client_knowledge(config)
    assert client_knowledge(config)[0] == shared  # a function of the seed
    for c in clients:
        passages = c.private + shared
        questions = c.train + c.test
        counts = boundary.type_counts(questions)
        assert all(counts[t] > 0 for t in boundary.TYPES), counts
        for kind in boundary.TYPES:  # every type in both splits
            assert any(q["type"] == kind for q in c.test), kind
            assert any(q["type"] == kind for q in c.train), kind
        for q in questions:
            if q["type"] == "unanswerable":
                assert q["fact"] == -1 and q["answer"] == boundary.ABSTAIN
                # neither base states this entity's asked relation
                template = boundary.synthetic.DOMAINS[c.domain]["relations"][q["relation"]][1]
                before, after = template.format(e=q["entity"], v="\x00").split("\x00")
                assert not any(p.startswith(before) and p.endswith(after) for p in passages)
                continue
            gold = passages[q["fact"]]
            assert q["answer"] in gold and q["entity"] in gold
            if q["type"] == "case":
                assert q["fact"] < len(c.private)
            else:
                assert q["fact"] >= len(c.private)  # the authority's fact
            if q["type"] in ("agree", "conflict"):
                note = c.private[q["case_fact"]]
                assert q["entity"] in note
                assert (q["answer"] in note) == (q["type"] == "agree")
                if q["type"] == "conflict":
                    assert q["wrong"] in note and q["wrong"] != q["answer"]
    # one entity never carries two values of one relation within a base
    for base in [shared] + [c.private for c in clients]:
        assert len(base) == len(set(base))


def test_digests_are_long_records_relevant_to_their_facts(tmp_path):
    from ffrag_jax.data.knowledge import client_knowledge
    from ffrag_jax.rerank.preferences import relevance_labels
    from ffrag_jax.training import run as run_lib

    plain_shared, plain = client_knowledge(_config())
    shared, clients = client_knowledge(_config(**{"boundary.digest_rate": 0.5}))
    assert shared[: len(plain_shared)] == plain_shared
    for before, c in zip(plain, clients, strict=True):
        n_case = len(before.private)
        assert c.private[:n_case] == before.private
        # 3 facts of its base a record, half the facts (rounded down to whole records)
        assert all(sum(f in r for f in before.private) == 3 for r in c.private[n_case:])
        assert all(sum(f in r for f in plain_shared) == 3 for r in shared[len(plain_shared):])
        assert len(c.private) - n_case == int(round(0.5 * n_case)) // 3
        passages, old = c.private + shared, before.private + plain_shared
        with_record = 0
        for q, q0 in zip(c.train + c.test, before.train + before.test, strict=True):
            # the same passage under its new index; each record holds the fact or case note
            assert (q["fact"] < 0 and q0["fact"] < 0) or passages[q["fact"]] == old[q0["fact"]]
            held = [passages[i] for i in (q["fact"], q["case_fact"]) if i >= 0]
            assert all(any(h in passages[r] for h in held) for r in q["digests"])
            with_record += bool(q["digests"])
        assert with_record > len(c.train) / 4
        q = next(q for q in c.train if q["digests"])
        ids = np.array([[q["fact"], q["digests"][0], 0 if q["fact"] else 1, -1]])
        assert relevance_labels([q], ids).tolist() == [[1, 1, float(q["case_fact"] == 0), 0]]
    # By entity: a record is one entity's facts in its base (a case file), all of them.
    shared, clients = client_knowledge(_config(**{"boundary.digest_rate": 0.5,
                                                  "boundary.digest_by": "entity"}))
    for before, c in zip(plain, clients, strict=True):
        n_case = len(before.private)
        for q in c.train + c.test:
            for r in q["digests"]:
                base = before.private if r < len(c.private) else plain_shared
                held = [f for f in base if f in (c.private + shared)[r]]
                assert len(held) >= 2 and all(q["entity"] in f for f in held)
                assert held == [f for f in base if q["entity"] in f.split(" is ")[0]
                                or f" {q['entity']} " in f]
        assert len(c.private) > n_case and any(q["digests"] for q in c.test)
    with pytest.raises(UserError, match="boundary.digest_by='topic'; choose random or entity"):
        run_lib.run(_config(**{"boundary.digest_rate": 0.2, "boundary.digest_by": "topic"}),
                    tmp_path / "bad")
    with pytest.raises(UserError, match=r"boundary.digest_rate must be in \[0, 1\]"):
        run_lib.run(_config(**{"boundary.digest_rate": -0.1}), tmp_path / "bad")
    with pytest.raises(UserError, match="boundary.digest_size must be at least 1"):
        run_lib.run(_config(**{"boundary.digest_rate": 0.2, "boundary.digest_size": 0}),
                    tmp_path / "bad")
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_targets_tags_and_unknown_source_tags():
    q = {"question": "Who?", "answer": "Dr. Lo", "type": "conflict", "source": "authority"}
    assert boundary.target(q) == "Dr. Lo [authority]"
    assert boundary.target(q, tagged=False) == "Dr. Lo"
    assert boundary.target({**q, "type": "unanswerable"}) == boundary.ABSTAIN
    with pytest.raises(UserError, match="source tag 'guess'; tags: case, authority"):
        boundary.target({**q, "source": "guess"})
    with pytest.raises(UserError, match="unknown knowledge-boundary question type 'maybe'"):
        boundary_metrics(["x"], [{"type": "maybe", "answer": "x"}])
    assert parse("Dr. Lo [authority]") == parse(" Dr. Lo  [authority] ")
    assert parse("Dr. Lo [authority]").value == "Dr. Lo"
    assert parse("Insufficient evidence.").abstained
    assert parse("Dr. Lo").tag is None


def test_boundary_metrics_by_hand():
    questions = [
        {"type": "case", "answer": "A1"},  # right, right tag
        {"type": "authority", "answer": "B2"},  # right value, wrong tag
        {"type": "conflict", "answer": "C3", "wrong": "C4"},  # took the case note's value
        {"type": "agree", "answer": "D5"},  # abstained: wrong
        {"type": "unanswerable", "answer": boundary.ABSTAIN},  # abstained: right
        {"type": "unanswerable", "answer": boundary.ABSTAIN},  # hallucinated
    ]
    said = ["A1 [case]", "B2 [case]", "C4 [case]", "insufficient evidence",
            "insufficient evidence", "E6 [authority]"]
    m = boundary_metrics(said, questions)
    assert m["answerable_em"] == pytest.approx(2 / 4)
    assert m["abstain_precision"] == pytest.approx(1 / 2)
    assert m["abstain_recall"] == pytest.approx(1 / 2)
    assert m["abstain_f1"] == pytest.approx(1 / 2)
    assert m["hallucination_rate"] == pytest.approx(1 / 2)
    assert m["conflict_accuracy"] == 0.0 and m["conflict_case_rate"] == 1.0
    assert m["attribution_accuracy"] == pytest.approx(1 / 3)  # of the 3 answered answerable
    assert (m["em_case"], m["em_authority"], m["em_agree"]) == (1.0, 1.0, 0.0)
    # nothing to abstain on and nothing abstained: abstention scores are undefined (NaN)
    m = boundary_metrics(["A1 [case]"], questions[:1])
    assert np.isnan(m["abstain_f1"]) and np.isnan(m["conflict_accuracy"])


def test_readings_pick_one_answer_from_the_answers_with_each_candidate():
    per = [["insufficient evidence", "B2 [case]", "B3 [authority]"],  # top abstains
           ["A1 [case]", "A2 [authority]"],  # the authority's answer comes second
           ["insufficient evidence", "insufficient evidence"],  # every candidate abstains
           ["C1 [case]"]]
    assert read(per, "top") == ["insufficient evidence", "A1 [case]",
                                "insufficient evidence", "C1 [case]"]
    assert read(per, "first_answer") == ["B2 [case]", "A1 [case]", "insufficient evidence",
                                         "C1 [case]"]
    assert read(per, "authority_first") == ["B3 [authority]", "A2 [authority]",
                                            "insufficient evidence", "C1 [case]"]
    with pytest.raises(UserError, match="boundary.reading='vote'; choose top or "):
        read(per, "vote")
    with pytest.raises(UserError, match="question 1 has no candidate answer"):
        read([["A1"], []], "top")


def test_dual_task_loss_is_the_weighted_rag_sequence_and_needs_its_weights():
    from ffrag_jax.rag import losses

    rng = np.random.default_rng(0)
    lp = jnp.asarray(np.log(rng.uniform(0.05, 1, size=(2, 3, 4))), jnp.float32)
    scores = jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)
    weights = jnp.asarray([[1, 2, 2, 0], [3, 3, 0, 0]], jnp.float32)
    ours = losses.rag_sequence_nll(lp, scores, weights)
    # -log sum_k p(d_k|q) exp(sum_t w_t log p(y_t|q, d_k)), in float64
    s64, lp64, w64 = (np.asarray(x, np.float64) for x in (scores, lp, weights))
    doc = np.exp(s64) / np.exp(s64).sum(-1, keepdims=True)
    ref = -np.log((doc * np.exp((lp64 * w64[:, None, :]).sum(-1))).sum(-1))
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5)
    with pytest.raises(UserError, match="dual_task loss needs the batch's target_weight"):
        rag.rag_loss({"generator": None, "retriever": None}, {"generator": None,
                                                             "retriever": None},
                     {}, None, gen_cfg=None, enc_cfg=None,
                     loss_cfg=rag.RagLossConfig(weights=(("dual_task", 1.0),)))


def test_target_weights_weigh_the_tag_and_the_example(tmp_path):
    from pathlib import Path

    from transformers import PreTrainedTokenizerFast

    import ffrag_jax

    tok = PreTrainedTokenizerFast.from_pretrained(
        Path(ffrag_jax.__file__).parent / "tokenizers" / "demo")
    w = rag.target_weights(tok, ["Dr. Lo [case]", "insufficient evidence"], 20,
                           tag_weight=2.0, example_weights=[1.0, 3.0])
    ids = rag.answer_ids(tok, "Dr. Lo [case]")
    value = len(rag.answer_ids(tok, "Dr. Lo")) - 1
    assert w[0, :value].tolist() == [1.0] * value  # the value's tokens
    assert set(w[0, value : len(ids) - 1].tolist()) == {2.0}  # " [case]"
    assert w[0, len(ids) - 1] == 1.0 and not w[0, len(ids):].any()  # EOS, then padding
    assert set(w[1, : len(rag.answer_ids(tok, "insufficient evidence"))].tolist()) == {3.0}
    with pytest.raises(UserError, match="budget is 4"):
        rag.target_weights(tok, ["Dr. Lo [case]"], 4, tag_weight=1.0, example_weights=[1.0])


def test_query_augmentation_strategies_and_the_consistency_filter():
    pool = [{"question": "Who is the doctor of patient Ab Cd?", "answer": "Dr. X", "fact": 3,
             "entity": "Ab Cd", "relation": "doctor", "type": "case"},
            {"question": "Who is the doctor of patient Ef Gh?", "answer": "Dr. Y", "fact": 5,
             "entity": "Ef Gh", "relation": "doctor", "type": "case"}]
    rng = random.Random(0)
    made = {s: augment.augment(pool[0], "clinic", s, rng, pool) for s in augment.STRATEGIES}
    for name, q in made.items():
        assert q is not None and q["augmented"] == name
        assert q["question"] != pool[0]["question"]
    assert "Ab Cd" in made["paraphrase"]["question"]
    swap = made["entity_swap"]
    assert swap["origin"] == 1 and "Ef Gh" in swap["question"] and swap["answer"] == "Dr. Y"
    with pytest.raises(UserError, match="unknown query augmentation 'shuffle'"):
        augment.augment(pool[0], "clinic", "shuffle", rng, pool)
    ids = np.array([3, 7, 9])
    assert augment.consistent(np.array([1, 0, 0]), ids, np.array([0, 1, 0]),
                              np.array([7, 3, 9]))
    assert not augment.consistent(np.array([1, 0, 0]), ids, np.array([1, 1, 0]), ids)
    assert not augment.consistent(np.zeros(3), ids, np.zeros(3), ids)  # nothing aligned


RERANK_SMALL = {
    "pretrain.steps": 4, "pretrain.num_examples": 64, "pretrain.batch_size": 8,
    "data.private_entities": 4, "data.shared_entities": 1, "boundary.overlap_entities": 2,
    "fl.rounds": 1, "fl.local_steps": 2, "fl.batch_size": 4, "lora.retriever.rank": 2,
    "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_layers": 2,
    "tokenizer.path": None, "tokenizer.vocab_size": 400, "log_every": 1,
    "eval.batch_size": 8,
    "rerank.enabled": True, "rerank.questions": 3, "rerank.augment": "paraphrase,entity_swap",
    "rerank.local_steps": 2, "rerank.batch_size": 2, "rerank.max_len": 32,
    "lora.reranker.rank": 2, "rerank.pre_align_steps": 2, "rerank.pre_align_len": 64,
    # the reader answers with each candidate alone; the first answer that is not an
    # abstention is kept (as ask must then do too)
    "boundary.reading": "first_answer", "boundary.abstain_threshold": 0.5}


@pytest.fixture(scope="module")
def rerank_run(tmp_path_factory, tiny_cross_encoder):
    from ffrag_jax.training import run as run_lib

    overrides = {**RERANK_SMALL, "rerank.path": str(tiny_cross_encoder[0])}
    workdir = tmp_path_factory.mktemp("boundary") / "run"
    summary = run_lib.run(_config(**overrides), workdir)
    return workdir, summary, overrides


def _records(workdir):
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.long
def test_federated_run_with_a_reranker_records_exports_and_answers(rerank_run, capsys):
    from ffrag_jax.cli import ask

    workdir, summary, _ = rerank_run
    for model in ("global", "fused"):
        for key in ("answerable_em", "abstain_f1", "hallucination_rate", "conflict_accuracy",
                    "attribution_accuracy", "retriever_only_rag_em", "rerank_ms_per_question"):
            assert key in summary[model], (model, key)
    records = _records(workdir)
    data = [r for r in records if r["kind"] == "rerank_data"]
    assert [(r["round"], r["client"]) for r in data] == [(1, 0), (1, 1)]
    assert all(r["kept"] >= 3 and r["augmented"] >= r["filtered"] for r in data)
    steps = [r for r in records if r.get("phase") == "rerank"]
    assert len(steps) == 2 * 2 and all(np.isfinite(r["loss"]) for r in steps)
    aligned = [r for r in records if r.get("phase") == "pre_align"]  # before round 1's RAG
    assert [(r["client"], r["step"]) for r in aligned] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert records.index(aligned[-1]) < min(records.index(r) for r in records
                                            if r.get("phase") == "ffrag")
    for name in ("export/reranker/config.json", "export/reranker/model.safetensors",
                 "export/clients/1/reranker_lora.safetensors"):
        assert (workdir / name).exists(), name
    system = json.loads((workdir / "export/system.json").read_text())
    assert system["tags"] == {"private": "case", "shared": "authority"}
    assert system["reading"] == "first_answer" and system["reranker"]["prior_scale"] == 20.0
    assert system["abstain_threshold"] == 0.5
    # the generator's preferences over candidates, both readings: 0/1, nothing on padding or
    # on unanswerable questions
    from ffrag_jax.rag.system import load_system
    from ffrag_jax.rerank import preferences

    system = load_system(workdir, 0)
    texts = [c["text"] for kb in system.bases for c in kb.chunks]
    qs = [{"question": "Who heard case Bo-12?", "answer": "Judge Ra [case]", "gold": "Judge Ra",
           "type": "case"},
          {"question": "When?", "answer": boundary.ABSTAIN, "type": "unanswerable"}]
    ids = np.array([[0, 1, -1], [2, 3, 4]])
    common = dict(lora=system.gen_lora, prompt_len=system.prompt_len, batch_size=4)
    answer = preferences.preference_labels(system.gen_params, system.gen_cfg, system.tokenizer,
                                           qs, ids, texts, max_new_tokens=4, **common)
    likely = preferences.likelihood_labels(system.gen_params, system.gen_cfg, system.tokenizer,
                                           qs, ids, texts, answer_len=12, **common)
    for labels in (answer, likely):
        assert labels.shape == (2, 3) and set(np.unique(labels)) <= {0.0, 1.0}
        assert labels[0, 2] == 0 and not labels[1].any()
    assert likely[0].sum() <= 1
    # ask --rerank reproduces the job's last-round answers of client 0's fused model
    rows = [json.loads(x) for x in (workdir / "predictions.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["client"] == 0 and r["model"] == "fused"][:4]
    questions = workdir.parent / "q.jsonl"
    questions.write_text("".join(json.dumps({"question": r["question"]}) + "\n" for r in rows))
    assert ask.main(["--workdir", str(workdir), "--client", "0", "--rerank", "--questions",
                     str(questions), "--max-new-tokens", "8"]) == 0
    answers = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [a["answer"] for a in answers] == [r["prediction"] for r in rows]
    assert [a["per_hit"] for a in answers] == [r["per_candidate"] for r in rows]
    assert all("rerank_score" in h for a in answers for h in a["sources"])
    assert ask.main(["--workdir", str(workdir), "Who heard case Bo-12?", "--rerank"]) == 0
    out = capsys.readouterr().out
    assert "rerank" in out and "[shared]" in out
    # query expansion and context compression at inference
    assert ask.main(["--workdir", str(workdir), "--client", "1", "--rerank", "--expand",
                     "--compress", "6", "--questions", str(questions)]) == 0
    answers = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert all("draft" in a and "dropped" in a for a in answers)
    assert ask.main(["--workdir", str(workdir), "--compress", "-1", "Who?"]) == 2
    assert "--compress >= 0 expected" in capsys.readouterr().err
    # tools/redecode.py, as the run decoded: the fused models' last evaluation again
    spec = importlib.util.spec_from_file_location(
        "redecode", Path(__file__).parents[1] / "tools" / "redecode.py")
    redecode = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(redecode)
    assert redecode.main([str(workdir), "--rerank"]) == 0
    again = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    last = [r for r in records if r["kind"] == "eval" and r["model"] == "fused"
            and r["round"] == 1]
    for row, record in zip(again, last, strict=False):
        for key in ("answerable_em", "hallucination_rate", "attribution_accuracy"):
            expected = record[key]
            if expected == "nan":
                assert np.isnan(row[key]), key
            else:
                assert row[key] == pytest.approx(expected, abs=1e-4), key
    assert [r["client"] for r in again] == [0, 1, "mean"]


@pytest.mark.long
def test_federated_run_with_a_reranker_resumes_exactly_after_kills(rerank_run, tmp_path):
    full_dir, _, overrides = rerank_run
    args = ["--config", "boundary", "--workdir", str(tmp_path / "killed"),
            "--config.data.domains=clinic,legal", "--config.fl.num_clients=2",
            "--config.lora.generator.ranks=(2, 2)",
            *[f"--config.{k}={v}" for k, v in overrides.items()]]
    log = kill_and_resume(args, tmp_path / "killed", total_records=len(_records(full_dir)),
                          seed=5, points=2)
    summary = lambda w: json.loads((w / "summary.json").read_text())
    assert comparable(summary(tmp_path / "killed")) == comparable(summary(full_dir)), log
    assert comparable(_records(tmp_path / "killed")) == comparable(_records(full_dir)), log


def test_reranker_settings_are_checked_before_training(tmp_path, tiny_cross_encoder):
    from ffrag_jax.training import run as run_lib

    base = {**RERANK_SMALL, "rerank.path": str(tiny_cross_encoder[0])}
    for key, value, message in (
            ("rerank.labels", "votes", "rerank.labels='votes'; choose preference or relevance"),
            ("rerank.augment", "paraphrase,shuffle", "rerank.augment names 'shuffle'"),
            ("rerank.combine", "sum", "rerank.combine='sum'; choose mgda or fixed"),
            ("rag.context_passages", 2, "rag.losses lsr scores single passages"),
            ("rerank.pre_align_len", 500, "rerank.pre_align_len=500 exceeds the model's")):
        with pytest.raises(UserError, match=message):
            run_lib.run(_config(**{**base, key: value}), tmp_path / key)
        assert not (tmp_path / key / "checkpoints").exists()
    with pytest.raises(UserError, match="rag.losses dual_task trains the knowledge boundary"):
        run_lib.run(_config(**{**base, "boundary.enabled": False}), tmp_path / "b")
    jax.clear_caches()


def test_context_compression_keeps_the_best_sentences_within_the_budget():
    from ffrag_jax.rag import compression

    passages = ["Patient Ab takes Lox. The ward is A1. Lunch is at noon.",
                "Trains leave at six.", "Patient Ab sees Dr. Ru!"]
    score = lambda q, texts: np.asarray([t.count("Ab") + 0.5 * ("ward" in t) for t in texts])
    count = lambda t: len(t.split())
    kept, dropped = compression.compress("What does Ab take?", passages, score, count, 9)
    # the two "Ab" sentences (4 + 5 words), in their passages' order; the rest dropped
    assert kept == [(0, "Patient Ab takes Lox."), (2, "Patient Ab sees Dr. Ru!")]
    assert dropped == ["The ward is A1.", "Lunch is at noon.", "Trains leave at six."]
    kept, _ = compression.compress("q", passages, score, count, 1)  # the best, even if over
    assert kept == [(0, "Patient Ab takes Lox.")]
    assert compression.compress("q", passages, score, count, 0) == (list(enumerate(passages)),
                                                                     [])


def test_query_expansion_merges_both_queries_hits():
    from ffrag_jax.rag import expansion

    assert expansion.expanded(["Who?", "When?"], ["Dr. Lo", " "]) == ["Who? Dr. Lo", "When?"]
    first = [[{"kb": "a", "id": 1, "score": 0.5}, {"kb": "b", "id": 1, "score": 0.4}]]
    second = [[{"kb": "a", "id": 1, "score": 0.7}, {"kb": "a", "id": 2, "score": 0.6}]]
    merged = expansion.merge_hits(first, second, 2)[0]
    assert [(h["kb"], h["id"], h["score"]) for h in merged] == [("a", 1, 0.7), ("a", 2, 0.6)]
    assert merged[1]["expanded"] and "expanded" not in merged[0]


def test_pre_alignment_examples_name_the_first_aligned_candidate():
    from ffrag_jax.rerank import self_align

    texts = ["Patient Ab takes Lox.", "Patient Cd takes Rin.", "Case Lo-1 was heard by Ra."]
    tags = ["case", "case", "authority"]
    ids = np.array([[1, 0, -1], [2, 1, 0]])
    labels = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    prompts, responses = self_align.examples(
        [{"question": "What does Ab take?"}, {"question": "Who heard Lo-1?"}], ids, texts, tags,
        labels)
    assert prompts[0] == ("Passages: (1) [case] Patient Cd takes Rin. (2) [case] Patient Ab "
                          "takes Lox.\nQuestion: What does Ab take?\nHelpful passage:")
    assert responses == [" 2", " none"]  # no aligned candidate: "none"


def test_boundary_pretraining_examples_tag_answers_and_abstain_on_near_misses():
    examples = boundary.reading_examples("geography", 200, 0, 0.3)
    assert examples == boundary.reading_examples("geography", 200, 0, 0.3)
    abstained = [e for e in examples if e["answer"] == boundary.ABSTAIN]
    assert 0.2 < len(abstained) / len(examples) < 0.4
    for e in examples:
        tag = e["context"].split("]")[0] + "]"
        assert tag in ("[case]", "[authority]")
        if e["answer"] != boundary.ABSTAIN:
            value = e["answer"].removesuffix(" " + tag)
            assert e["answer"].endswith(tag) and value in e["context"]


def test_the_pretraining_abstention_rate_and_its_check(tmp_path):
    from ffrag_jax.data.knowledge import reading_examples
    from ffrag_jax.training import run as run_lib

    def abstaining(**overrides):
        examples = reading_examples(_config(**{"pretrain.num_examples": 300, **overrides}))
        return sum(e["answer"] == boundary.ABSTAIN for e in examples) / len(examples)

    assert abstaining() == abstaining(**{"boundary.pretrain_abstain_rate": 0.3})  # None: 0.3
    assert abstaining(**{"boundary.pretrain_abstain_rate": 0.0}) == 0.0
    assert 0.5 < abstaining(**{"boundary.pretrain_abstain_rate": 0.7}) < 0.9
    with pytest.raises(UserError, match=r"boundary.pretrain_abstain_rate must be in \[0, 1\]"):
        run_lib.run(_config(**{"boundary.pretrain_abstain_rate": 1.5}), tmp_path / "bad")
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_the_reranker_scores_each_passage_after_its_source_tag():
    from ffrag_jax.retrieval.knowledge_base import KnowledgeBase
    from ffrag_jax.retrieval.multi_source import Sources

    def base(name, texts):
        # only the texts and vectors matter here: no index, no encoder
        return KnowledgeBase(name, [{"text": t, "doc_id": str(i)} for i, t in enumerate(texts)],
                             np.eye(4, dtype=np.float32)[: len(texts)], None, None, {}, None)

    bases = [base("private", ["Ward A2.", "Ward B3."]), base("shared", ["Ward C4."])]
    assert Sources(bases, [1, 1], ("case", "authority")).tagged_texts == [
        "[case] Ward A2.", "[case] Ward B3.", "[authority] Ward C4."]
    assert Sources(bases, [1, 1]).tagged_texts == ["Ward A2.", "Ward B3.", "Ward C4."]


def test_insufficient_evidence_examples_drop_the_supporting_passages():
    from ffrag_jax.jobs.ffrag_client import without_evidence

    config = _config(**{"boundary.negatives": 1.0})
    questions = [{"question": "q0", "answer": "A", "type": "conflict", "source": "authority",
                  "fact": 7, "case_fact": 2},
                 {"question": "q1", "answer": boundary.ABSTAIN, "type": "unanswerable",
                  "source": None, "fact": -1, "case_fact": -1}]
    ids = np.array([[2, 5, 7, 9], [4, 3, -1, -1]])
    out_q, out_ids = without_evidence(config, questions, ids, (1, 0, 0))
    assert out_ids.tolist() == [[5, 9, -1, -1], [4, 3, -1, -1]]
    assert out_q[0]["answer"] == boundary.ABSTAIN and out_q[0]["type"] == "unanswerable"
    assert out_q[1] == questions[1] and questions[0]["answer"] == "A"  # inputs untouched
    none = without_evidence(_config(**{"boundary.negatives": 0.0}), questions, ids, (1, 0, 0))
    assert none[0] == questions and (none[1] == ids).all()
