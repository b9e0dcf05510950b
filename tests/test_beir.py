"""Retrieval metrics against pytrec_eval (what BEIR uses), the BEIR and SQuAD loaders, the
article split, and MiniLM retrieval on a slice of the shared DBpedia subset."""

from pathlib import Path

import numpy as np
import pytest

from ffrag_jax.errors import UserError
from ffrag_jax.retrieval import beir

DATA = Path(__file__).parents[2] / "shared/data"


def test_metrics_match_pytrec_eval():
    import pytrec_eval

    rng = np.random.default_rng(0)
    docs = [f"d{i}" for i in range(40)]
    qrels = {f"q{q}": {d: int(rng.integers(0, 3)) for d in rng.choice(docs, 6, replace=False)}
             for q in range(30)}
    qrels["q0"] = {d: 0 for d in qrels["q0"]}  # judged, nothing relevant
    ranked = {q: list(rng.choice(docs, 10, replace=False)) for q in qrels}
    ranked.pop("q5")  # a query that was not run is not scored
    ours = beir.scores(ranked, qrels, ks=(1, 5, 10))
    run = {q: {d: 10.0 - r for r, d in enumerate(ranking)} for q, ranking in ranked.items()}
    ref = pytrec_eval.RelevanceEvaluator(
        qrels, {"ndcg_cut.10", "recall.1,5,10", "recip_rank"}).evaluate(run)
    assert ours["queries"] == len(ref) == 29
    for ours_name, ref_name in [("ndcg@10", "ndcg_cut_10"), ("recall@1", "recall_1"),
                                ("recall@5", "recall_5"), ("recall@10", "recall_10"),
                                ("mrr@10", "recip_rank")]:  # rankings of 10: same thing
        assert ours[ours_name] == pytest.approx(np.mean([r[ref_name] for r in ref.values()]),
                                                abs=1e-9), ours_name


def test_dedupe_and_split_by_article():
    assert beir.dedupe_docs(["a", "b", "a", "c", "b", "d"], 3) == ["a", "b", "c"]
    questions = [{"id": str(i), "article": f"art{i % 7}"} for i in range(70)]
    train, test = beir.split_by_article(questions, 0.3, seed=0)
    assert len(train) + len(test) == 70 and test
    assert not {q["article"] for q in train} & {q["article"] for q in test}


@pytest.mark.skipif(not (DATA / "beir-dbpedia-subset").is_dir(), reason="shared data absent")
def test_beir_loader_and_minilm_on_a_dbpedia_slice():
    from ffrag_jax.retrieval.encoder import TextEncoder
    from ffrag_jax.retrieval.knowledge_base import KnowledgeBase

    docs, queries, qrels = beir.load_beir(DATA / "beir-dbpedia-subset")
    assert len(docs) == 5000 and len(queries) == 50 and len(qrels) == 40
    # A slice: the judged documents of 10 queries plus 300 others, so it runs in seconds.
    some = sorted(qrels)[:10]
    wanted = {d for q in some for d in qrels[q]}
    sliced = [d for d in docs if d["id"] in wanted] + [d for d in docs[:300]
                                                       if d["id"] not in wanted]
    kb = KnowledgeBase.build("dbpedia", sliced, TextEncoder.load())
    ranked = {q: beir.dedupe_docs([h["doc_id"] for h in hits], 10) for q, hits in
              zip(some, kb.search([queries[q] for q in some], 30, "dense"), strict=True)}
    result = beir.scores(ranked, {q: qrels[q] for q in some}, ks=(10,))
    assert result["queries"] == 10
    assert result["ndcg@10"] > 0.3  # MiniLM finds judged entities (random would be ~0)
    with pytest.raises(UserError, match="qrels/dev.tsv is missing"):
        beir.load_beir(DATA / "beir-dbpedia-subset", split="dev")


def test_malformed_qrels_name_the_file_and_line(tmp_path):
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text('{"_id": "d1", "text": "a doc"}\n')
    (folder / "queries.jsonl").write_text('{"_id": "q1", "text": "a query"}\n')
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\n")
    with pytest.raises(UserError, match=r"qrels/test.tsv:2: expected 3 tab-separated columns"):
        beir.load_beir(folder)
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    (folder / "corpus.jsonl").write_bytes(b'{"_id": "d1", "text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"corpus.jsonl: not UTF-8 text"):
        beir.load_beir(folder)
