"""Multi-source search with quotas: one implementation for training, evaluation and an exported
system, so that what a job evaluated is what ``ask`` retrieves.

A client searches its private case base and the shared authoritative base together: each base
returns its top ``quota`` hits, and the hits of all bases are ranked by score (ties: the order
the bases were given, then each base's own ranking). A base smaller than its quota leaves
padding (id -1, score ``-inf``) at the end of the row.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence

import numpy as np

from ffrag_jax.errors import UserError
from ffrag_jax.retrieval.knowledge_base import KnowledgeBase


def rank(bases: Sequence[KnowledgeBase], quotas: Sequence[int], queries: Sequence[str], *,
         mode: str = "dense", query_vectors: np.ndarray | None = None
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(scores, base, chunk)`` ``[N, sum(quotas)]``, best first per query: the score, the
    index into ``bases`` and the chunk index in that base of every hit (padding: -inf, -1,
    -1). ``query_vectors`` ``[N, D]``: the queries' embeddings when every base shares one
    query encoder (a training step has them already); otherwise each distinct query encoder
    embeds the ``queries`` once."""
    if len(quotas) != len(bases):
        raise UserError(f"{len(quotas)} quotas for {len(bases)} knowledge bases")
    n = len(queries) if query_vectors is None else len(query_vectors)
    embedded: dict[str, np.ndarray] = {}
    scores, base, chunk = [], [], []
    for b, (kb, quota) in enumerate(zip(bases, quotas, strict=True)):
        if quota <= 0:
            continue
        vectors = query_vectors
        if vectors is None and mode != "bm25":
            key = json.dumps(kb.query_encoder.identity, sort_keys=True)
            if key not in embedded:
                embedded[key] = kb.query_encoder.embed(list(queries))
            vectors = embedded[key]
        rows = kb.search_ids(queries, quota, mode, query_embeddings=vectors)
        s = np.full((n, quota), -np.inf, np.float32)
        c = np.full((n, quota), -1, np.int64)
        for i, row in enumerate(rows):
            for j, (idx, score) in enumerate(row):
                s[i, j], c[i, j] = score, idx
        scores.append(s)
        chunk.append(c)
        base.append(np.where(c >= 0, b, -1))
    if not scores:
        raise UserError(f"every quota is 0 ({list(quotas)}): nothing to retrieve")
    scores, base, chunk = (np.concatenate(x, axis=1) for x in (scores, base, chunk))
    order = np.argsort(-scores, axis=1, kind="stable")
    return tuple(np.take_along_axis(x, order, 1) for x in (scores, base, chunk))


def hits(bases: Sequence[KnowledgeBase], ranked: tuple[np.ndarray, np.ndarray, np.ndarray]
         ) -> list[list[dict]]:
    """The ranked hits as dicts (``{"id", "doc_id", "text", "source", "score", "kb"}``), best
    first, padding left out."""
    scores, base, chunk = ranked
    return [[bases[b]._hit(int(c), float(s)) for s, b, c in zip(srow, brow, crow, strict=True)
             if c >= 0] for srow, brow, crow in zip(scores, base, chunk, strict=True)]


class Sources:
    """A client's bases searched together (dense, with one query encoder), with every passage
    numbered globally: ``texts`` and ``vectors`` are the bases' in order, so passage ``i`` of
    base ``b`` is ``offsets[b] + i``. ``tags`` (one per base, e.g. ``("case", "authority")``)
    give every passage its base's source tag in ``passage_tags`` (None without)."""

    def __init__(self, bases: Sequence[KnowledgeBase], quotas: Sequence[int],
                 tags: Sequence[str] | None = None):
        self.bases, self.quotas = list(bases), list(quotas)
        if tags is not None and len(tags) != len(self.bases):
            raise UserError(f"{len(tags)} source tags for {len(self.bases)} knowledge bases")
        self.offsets = np.cumsum([0] + [len(kb) for kb in self.bases[:-1]])
        self.texts = [c["text"] for kb in self.bases for c in kb.chunks]
        self.vectors = np.concatenate([kb.embeddings for kb in self.bases])
        self.passage_tags = None if tags is None else [
            tag for kb, tag in zip(self.bases, tags, strict=True) for _ in kb.chunks]

    @property
    def k(self) -> int:
        return sum(self.quotas)

    @functools.cached_property  # the bases do not change: built once, read every step
    def tagged_texts(self) -> list[str]:
        """Every passage after its source tag (``"[case] ..."``), as the reader reads it and
        the reranker scores it: a case note and the authority that contradicts it differ in
        their tags, which is what decides between them. The texts themselves without tags."""
        from ffrag_jax.rag.prompts import tagged_context  # rag imports this module

        if self.passage_tags is None:
            return self.texts
        return [tagged_context([text], [tag])
                for text, tag in zip(self.texts, self.passage_tags, strict=True)]

    def search(self, query_vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` ``[N, k]`` of :func:`rank`, ids global (-1: padding)."""
        scores, base, chunk = rank(self.bases, self.quotas, [""] * len(query_vectors),
                                   query_vectors=query_vectors)
        return scores, np.where(chunk >= 0, self.offsets[np.maximum(base, 0)] + chunk, -1)



def search_sources(bases: Sequence[KnowledgeBase], queries: Sequence[str],
                   quotas: dict[str, int], mode: str = "hybrid") -> list[list[dict]]:
    """:func:`rank` with quotas by base name, as hit dicts (each naming its base in ``kb``)
    grouped by base in the order given, then by rank."""
    names = [kb.name for kb in bases]
    if len(set(names)) != len(names):
        raise UserError(f"knowledge base names must be distinct, got {names}")
    unknown = set(quotas) - set(names)
    if unknown:
        raise UserError(f"quotas name unknown knowledge bases {sorted(unknown)}; bases: {names}")
    ranked = hits(bases, rank(bases, [quotas.get(n, 0) for n in names], queries, mode=mode))
    order = {name: i for i, name in enumerate(names)}
    return [sorted(row, key=lambda h: order[h["kb"]]) for row in ranked]
