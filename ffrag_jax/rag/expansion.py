"""Query expansion at inference (query2doc / HyDE, the LLMs Toolkit's RAG technique): the
generator answers the question closed-book, and the question with that draft answer appended
retrieves too; each base's hits of both queries are merged, a passage found by both keeping
its best score. A draft that is wrong costs little (the original query's hits stay in the
pool); a right one brings passages that share its words.
"""

from __future__ import annotations

from collections.abc import Sequence


def expanded(questions: Sequence[str], drafts: Sequence[str]) -> list[str]:
    """``"<question> <draft>"`` per question (the question alone where the draft is empty)."""
    return [f"{q} {d}".strip() if d.strip() else q
            for q, d in zip(questions, drafts, strict=True)]


def merge_hits(original: Sequence[Sequence[dict]], expansion: Sequence[Sequence[dict]],
               limit: int) -> list[list[dict]]:
    """Per question, the hits of both queries by ``(kb, id)``, each with its best ``score``,
    best first, at most ``limit``; a hit found by the expansion only is marked
    ``"expanded": True``."""
    out = []
    for first, second in zip(original, expansion, strict=True):
        merged: dict[tuple, dict] = {}
        for hit in first:
            merged[(hit["kb"], hit["id"])] = dict(hit)
        for hit in second:
            key = (hit["kb"], hit["id"])
            if key not in merged:
                merged[key] = {**hit, "expanded": True}
            elif hit["score"] > merged[key]["score"]:
                merged[key]["score"] = hit["score"]
        out.append(sorted(merged.values(), key=lambda h: -h["score"])[:limit])
    return out
