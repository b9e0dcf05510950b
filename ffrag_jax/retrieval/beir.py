"""Retrieval evaluation: BEIR-format data, SQuAD as a retrieval task, and the metrics.

BEIR folders hold ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``,
``text``) and ``qrels/<split>.tsv`` (``query-id  corpus-id  score`` with a header). SQuAD v1.1
becomes a retrieval task with each paragraph a document and each question's own paragraph its
one relevant document; paragraphs carry their article so train/test splits can be made by
article (no paragraph shared).

Metrics follow BEIR's (pytrec_eval's) definitions: a document is relevant when its qrel score
is > 0; ``recall@k`` is the fraction of a query's relevant documents in its top k; ``mrr@k`` the
reciprocal rank of the first relevant one (0 if none in the top k); ``ndcg@k`` uses the graded
score as the gain and ``log2(rank + 1)`` as the discount, normalised by the ideal ranking of
the judged documents. As in BEIR (pytrec_eval), the mean is over the queries that are both
ranked and in the qrels; one whose judgments are all 0 scores 0.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ffrag_jax import files
from ffrag_jax.errors import UserError


def load_beir(folder: str | Path, split: str = "test"
              ) -> tuple[list[dict], dict[str, str], dict[str, dict[str, int]]]:
    """``(corpus docs {"id", "text", "source"}, queries {id: text}, qrels {qid: {docid:
    score}})`` of a BEIR folder; the corpus text is ``title\\ntext`` as BEIR encodes it."""
    folder = Path(folder)
    for name in ("corpus.jsonl", "queries.jsonl", f"qrels/{split}.tsv"):
        if not (folder / name).exists():
            raise UserError(f"{folder}: {name} is missing (not a BEIR folder, or no '{split}' "
                            "qrels)")
    docs = []
    for number, d in files.jsonl_records(folder / "corpus.jsonl"):
        if "_id" not in d or "text" not in d:
            raise UserError(f"{folder}/corpus.jsonl:{number}: a document needs '_id' and 'text'")
        title = d.get("title") or ""
        docs.append({"id": str(d["_id"]), "text": f"{title}\n{d['text']}" if title
                     else d["text"], "source": folder.name})
    queries = {}
    for number, q in files.jsonl_records(folder / "queries.jsonl"):
        if "_id" not in q or "text" not in q:
            raise UserError(f"{folder}/queries.jsonl:{number}: a query needs '_id' and 'text'")
        queries[str(q["_id"])] = q["text"]
    qrels: dict[str, dict[str, int]] = {}
    name = f"qrels/{split}.tsv"
    rows = csv.reader(files.read_text(folder / name, "qrels file").splitlines(), delimiter="\t")
    next(rows, None)  # header
    for number, row in enumerate(rows, 2):
        if not row:
            continue
        if len(row) != 3 or not row[2].lstrip("-").isdigit():
            raise UserError(f"{folder}/{name}:{number}: expected 3 tab-separated columns "
                            f"query-id, corpus-id, score; got {row[:4]}")
        qrels.setdefault(row[0], {})[row[1]] = int(row[2])
    return docs, queries, qrels


def load_squad(path: str | Path) -> tuple[list[dict], list[dict]]:
    """``(paragraphs {"id", "text", "article"}, questions {"id", "text", "paragraph",
    "article", "answers"})`` of a SQuAD v1.1 JSON file (``answers``: the gold answer texts)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"SQuAD file not found: {path}")
    paragraphs, questions = [], []
    try:
        articles = json.loads(files.read_text(path, "SQuAD file"))["data"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a SQuAD v1.1 JSON file ({type(e).__name__}: {e})"
                        ) from None
    for a, article in enumerate(articles):
        for p, para in enumerate(article["paragraphs"]):
            pid = f"{a}-{p}"
            paragraphs.append({"id": pid, "text": para["context"], "article": article["title"],
                               "source": "squad"})
            for qa in para["qas"]:
                questions.append({"id": qa["id"], "text": qa["question"], "paragraph": pid,
                                  "article": article["title"],
                                  "answers": [a["text"] for a in qa.get("answers", [])]})
    return paragraphs, questions


def split_by_article(questions: Sequence[dict], test_fraction: float, seed: int
                     ) -> tuple[list[dict], list[dict]]:
    """``(train, test)`` questions with whole articles on one side (no paragraph shared)."""
    articles = sorted({q["article"] for q in questions})
    order = np.random.default_rng(seed).permutation(len(articles))
    test_articles = {articles[i] for i in order[: max(1, round(test_fraction * len(articles)))]}
    train = [q for q in questions if q["article"] not in test_articles]
    test = [q for q in questions if q["article"] in test_articles]
    return train, test


def dedupe_docs(ranked_chunk_doc_ids: Sequence[str], k: int) -> list[str]:
    """Document ranking from a chunk ranking: each document at its best chunk's rank."""
    seen, out = set(), []
    for doc_id in ranked_chunk_doc_ids:
        if doc_id not in seen:
            seen.add(doc_id)
            out.append(doc_id)
            if len(out) == k:
                break
    return out


def scores(ranked: dict[str, Sequence[str]], qrels: dict[str, dict[str, int]],
           ks: Sequence[int] = (1, 5, 10, 100)) -> dict[str, float]:
    """Mean ``recall@k`` for ``ks``, ``mrr@10`` and ``ndcg@10`` of ranked document ids per
    query ``{qid: [doc ids, best first]}`` (see the module docstring); ``queries`` is the
    number of queries scored."""
    sums: dict[str, float] = {f"recall@{k}": 0.0 for k in ks}
    sums.update({"mrr@10": 0.0, "ndcg@10": 0.0})
    count = 0
    for qid, judged in qrels.items():
        if qid not in ranked:
            continue
        count += 1
        relevant = {d for d, s in judged.items() if s > 0}
        if not relevant:
            continue  # scores 0 on every metric, as in pytrec_eval
        ranking = list(ranked.get(qid, []))
        for k in ks:
            sums[f"recall@{k}"] += len(relevant & set(ranking[:k])) / len(relevant)
        for rank, doc in enumerate(ranking[:10], 1):
            if doc in relevant:
                sums["mrr@10"] += 1.0 / rank
                break
        dcg = sum(judged.get(doc, 0) / math.log2(rank + 1)
                  for rank, doc in enumerate(ranking[:10], 1) if judged.get(doc, 0) > 0)
        ideal = sorted((s for s in judged.values() if s > 0), reverse=True)[:10]
        idcg = sum(s / math.log2(rank + 1) for rank, s in enumerate(ideal, 1))
        sums["ndcg@10"] += dcg / idcg
    if not count:
        raise UserError("no ranked query is in the qrels")
    return {**{name: value / count for name, value in sums.items()}, "queries": count}
