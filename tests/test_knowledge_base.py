"""Knowledge bases: reading and chunking documents, dense/BM25/hybrid search, multi-source
search with quotas, save/load round trip, encoder mismatch, bad input."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from ffrag_jax.errors import UserError
from ffrag_jax.models import lora
from ffrag_jax.retrieval import documents
from ffrag_jax.retrieval.encoder import TextEncoder
from ffrag_jax.retrieval.knowledge_base import (
    KnowledgeBase,
    reciprocal_rank_fusion,
)
from ffrag_jax.retrieval.multi_source import search_sources

CASES = [
    "Patient Ab Cd was prescribed Rimexol for chronic migraine after two visits.",
    "The ward B4 handles post-operative cardiac patients under Dr. Lorn.",
    "Patient Ef Gh developed a rash on amoxicillin; switched to azithromycin.",
    "Night shifts in ward C2 are staffed by three nurses and one resident.",
]
GUIDELINES = [
    "Guideline 7: penicillin allergy excludes amoxicillin; macrolides are an alternative.",
    "Guideline 12: migraine prophylaxis starts with beta blockers or topiramate.",
    "Guideline 19: hand hygiene before and after every patient contact.",
]


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder.load()


def _docs(texts, prefix):
    return [{"id": f"{prefix}{i}", "text": t, "source": prefix} for i, t in enumerate(texts)]


def test_reading_files_and_token_aware_chunks(tmp_path, encoder):
    (tmp_path / "a.txt").write_text("First file. " * 100)
    (tmp_path / "notes.md").write_text("   \n\t")
    (tmp_path / "b.jsonl").write_text(json.dumps({"_id": "x1", "title": "T", "text": "body"})
                                      + "\n\n" + json.dumps({"_id": "x2", "text": "more"}) + "\n")
    (tmp_path / "c.csv").write_text("_id,text\nr1,row one\nr2,row two\n")
    docs = documents.read_documents(tmp_path)
    assert [d["id"] for d in docs] == ["a.txt", "x1", "x2", "r1", "r2", "notes.md"]
    assert docs[1]["text"] == "T\nbody"
    chunks = documents.chunk_documents(docs, encoder.tokenizer, chunk_tokens=40, overlap=8)
    long = [c for c in chunks if c["doc_id"] == "a.txt"]
    assert len(long) > 5 and all(c["text"] == docs[0]["text"][c["start"]:c["end"]]
                                 for c in long)
    assert long[1]["start"] < long[0]["end"]  # overlapping windows
    for c in long:
        assert len(encoder.tokenizer(c["text"], add_special_tokens=False)["input_ids"]) <= 40
    assert "notes.md" not in {c["doc_id"] for c in chunks}  # whitespace document skipped

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(UserError, match=r"x.jsonl:2: malformed JSON line"):
        documents.read_documents(bad)
    (bad / "x.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(UserError, match=r"x.jsonl:1: no 'text' field"):
        documents.read_documents(bad)
    with pytest.raises(UserError, match="the corpus is empty"):
        documents.chunk_documents([], encoder.tokenizer)
    with pytest.raises(UserError, match="every document is empty or whitespace"):
        documents.chunk_documents(_docs(["", "  \n"], "e"), encoder.tokenizer)


def test_rrf_fuses_rankings():
    fused = reciprocal_rank_fusion([[3, 1, 2], [1, 4, -1]], k=3)
    assert [i for i, _ in fused] == [1, 3, 4]
    assert fused[0][1] == pytest.approx(1 / 62 + 1 / 61)


def test_search_modes_round_trip_and_encoder_mismatch(tmp_path, encoder):
    kb = KnowledgeBase.build("cases", _docs(CASES, "case"), encoder)
    queries = ["which drug was patient Ab Cd given for migraine?", "ward C2 night staffing"]
    for mode in ("dense", "bm25", "hybrid"):
        top = [row[0]["doc_id"] for row in kb.search(queries, 2, mode)]
        assert top == ["case0", "case3"], mode
    everything = kb.search(queries[:1], 10, "dense")[0]
    assert len(everything) == len(CASES)  # k beyond the corpus: every chunk, once
    assert len({h["id"] for h in everything}) == len(CASES)

    kb.save(tmp_path / "kb")
    with pytest.raises(UserError, match="not empty"):
        kb.save(tmp_path / "kb")
    again = KnowledgeBase.load(tmp_path / "kb", encoder)
    for mode in ("dense", "bm25", "hybrid"):
        assert again.search(queries, 3, mode) == kb.search(queries, 3, mode)

    adapter = lora.init(jax.random.key(0), encoder.params, ["query"], 2, 4.0)
    tuned = TextEncoder(encoder.cfg, encoder.params, encoder.tokenizer, encoder.name,
                        encoder.sha256, lora=adapter)
    with pytest.raises(UserError, match=r"built with encoder .* not .*LoRA.*rebuild it"):
        KnowledgeBase.load(tmp_path / "kb", tuned)
    # A query-side LoRA leaves the chunks' vectors valid: the base loads with the plain
    # encoder and searches with the tuned one.
    tuned = dataclasses.replace(tuned, lora=adapter.replace(weights=jax.tree.map(
        lambda x: x + 0.3 * jax.random.normal(jax.random.key(1), x.shape), adapter.weights)))
    queried = KnowledgeBase.load(tmp_path / "kb", encoder, query_encoder=tuned)
    scores, _ = queried.dense.search(tuned.embed(queries[:1]), len(CASES))
    got = queried.search(queries[:1], len(CASES), "dense")[0]
    np.testing.assert_allclose([h["score"] for h in got], scores[0], rtol=1e-6)
    assert not np.allclose(scores[0], [h["score"] for h in everything])
    with pytest.raises(UserError, match="search mode 'semantic'"):
        kb.search(queries, 2, "semantic")
    with pytest.raises(UserError, match="k must be a positive integer"):
        kb.search(queries, 0)


def test_multi_source_search_with_quotas(encoder):
    cases = KnowledgeBase.build("cases", _docs(CASES, "case"), encoder)
    authority = KnowledgeBase.build("guidelines", _docs(GUIDELINES, "gl"), encoder)
    hits = search_sources([cases, authority], ["amoxicillin allergy rash"],
                          {"cases": 1, "guidelines": 2})[0]
    assert [h["kb"] for h in hits] == ["cases", "guidelines", "guidelines"]
    assert hits[0]["doc_id"] == "case2" and hits[1]["doc_id"] == "gl0"
    dense_only = cases.search(["amoxicillin allergy rash"], 1, "hybrid")[0][0]
    assert dense_only["id"] == hits[0]["id"]
    with pytest.raises(UserError, match="unknown knowledge bases"):
        search_sources([cases], ["q"], {"nope": 1})
    emb = encoder.embed(["short", "a much longer query with many more tokens in it"])
    assert emb.shape == (2, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


def test_command_line_build_and_search(tmp_path, capsys):
    from ffrag_jax.cli import kb as cli

    docs = tmp_path / "docs"
    docs.mkdir()
    for i, text in enumerate(GUIDELINES):
        (docs / f"g{i}.txt").write_text(text)
    assert cli.main(["build", str(docs), str(tmp_path / "kb")]) == 0
    assert json.loads(capsys.readouterr().out)["chunks"] == 3
    assert cli.main(["build", str(docs), str(tmp_path / "kb")]) == 2  # no silent overwrite
    assert "pass --overwrite" in capsys.readouterr().err
    assert cli.main(["search", str(tmp_path / "kb"), "hand hygiene rules", "--k", "1"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["hits"][0]["doc_id"] == "g2.txt"
    assert cli.main(["build", str(tmp_path / "missing"), str(tmp_path / "kb2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: document path") and "missing" in err[0]


def _hashes(folder):
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_build_never_writes_into_or_over_its_documents(tmp_path, capsys):
    from ffrag_jax.cli import kb as cli

    docs = tmp_path / "docs"
    (docs / "more").mkdir(parents=True)
    for i, text in enumerate(GUIDELINES):
        (docs / f"g{i}.txt").write_text(text)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "n.txt").write_text("my notes")
    before, notes = _hashes(docs), _hashes(tmp_path / "notes")
    for out, message in [(docs, "is the documents"), (docs / "more", "lies inside"),
                         (docs / "kb", "lies inside"), (tmp_path, "contains the documents")]:
        assert cli.main(["build", str(docs), str(out), "--overwrite"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    # --overwrite replaces a knowledge base, never a folder of other files
    assert cli.main(["build", str(docs), str(tmp_path / "notes"), "--overwrite"]) == 2
    assert "is not empty and is not a knowledge base" in capsys.readouterr().err
    assert _hashes(docs) == before and _hashes(tmp_path / "notes") == notes
    assert cli.main(["build", str(docs), str(tmp_path / "kb")]) == 0
    assert cli.main(["build", str(docs / "g0.txt"), str(tmp_path / "kb"), "--overwrite"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["documents"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs", "kb", "notes"]  # no temp


def test_binary_or_non_utf8_documents_are_refused(tmp_path, capsys):
    from ffrag_jax.cli import kb as cli

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "fine.txt").write_text(GUIDELINES[0])
    (docs / "random.txt").write_bytes(np.random.default_rng(0).bytes(200_000))
    assert cli.main(["build", str(docs), str(tmp_path / "kb")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "random.txt: binary content" in err[0], err
    (docs / "random.txt").write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(UserError, match=r"random.txt: not UTF-8 text \(invalid byte at offset "
                                        r"3\)"):
        documents.read_documents(docs)
    assert not (tmp_path / "kb").exists()


@pytest.mark.parametrize("damage", ["chunks.jsonl", "embeddings.npy", "manifest.json",
                                    "bm25/params.index.json"])
def test_damaged_knowledge_base_files_are_one_line(tmp_path, capsys, damage):
    from ffrag_jax.cli import kb as cli

    docs = tmp_path / "docs"
    docs.mkdir()
    for i, text in enumerate(GUIDELINES):
        (docs / f"g{i}.txt").write_text(text)
    assert cli.main(["build", str(docs), str(tmp_path / "kb")]) == 0
    capsys.readouterr()
    target = tmp_path / "kb" / damage
    if not target.exists():  # bm25s names its files by version: damage the first one
        target = sorted((tmp_path / "kb" / "bm25").iterdir())[0]
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])
    assert cli.main(["search", str(tmp_path / "kb"), "hand hygiene"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "kb" in err[0], err


def test_multi_source_rank_merges_each_bases_top_hits_by_score(encoder):
    """``rank`` against a brute-force reference: each base's top ``quota`` by inner product,
    all hits sorted by score (ties: base order), a base smaller than its quota padded last."""
    from ffrag_jax.retrieval.multi_source import Sources, rank

    cases = KnowledgeBase.from_passages("cases", CASES, encoder)
    guides = KnowledgeBase.from_passages("guidelines", GUIDELINES[:1], encoder)
    queries = ["amoxicillin allergy rash", "migraine treatment", "who treats asthma?"]
    vectors = encoder.embed(queries)
    scores, base, chunk = rank([cases, guides], [2, 3], queries, query_vectors=vectors)
    assert scores.shape == (3, 5)
    for i, v in enumerate(vectors):
        hits = []
        for b, kb in enumerate((cases, guides)):
            s = kb.embeddings @ v
            top = np.argsort(-s, kind="stable")[: (2, 3)[b]]
            hits += [(float(s[j]), b, int(j)) for j in top]
        hits.sort(key=lambda h: -h[0])
        assert [(b, c) for _, b, c in hits] == list(zip(base[i][:3], chunk[i][:3], strict=True))
        np.testing.assert_allclose(scores[i][:3], [h[0] for h in hits], rtol=1e-5)
        assert list(base[i][3:]) == [-1, -1] and np.all(np.isinf(scores[i][3:]))
    sources = Sources([cases, guides], [2, 3])
    _, ids = sources.search(vectors)
    assert ids[0][ids[0] >= 0].tolist() == [
        c if b == 0 else len(CASES) + c for b, c in zip(base[0], chunk[0], strict=True) if c >= 0]
    with pytest.raises(UserError, match="every quota is 0"):
        rank([cases], [0], queries)
