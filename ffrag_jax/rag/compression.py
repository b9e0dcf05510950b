"""Context compression at inference: of the passages the reader will read, keep the sentences
that score highest for the question (the reranker's cross-encoder scores each sentence as a
passage) under a token budget, in their original order. The reader then reads the evidence
and little else; a budget of 0 keeps everything.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def sentences(text: str) -> list[str]:
    """``text`` split after ``.``, ``!`` or ``?`` followed by white space (empty parts left
    out)."""
    return [s for s in (p.strip() for p in _SENTENCE.split(text)) if s]


def compress(question: str, passages: Sequence[str], score: Callable[[str, list[str]], np.ndarray],
             count_tokens: Callable[[str], int], budget: int
             ) -> tuple[list[tuple[int, str]], list[str]]:
    """``(kept, dropped sentences)``: ``kept`` holds ``(passage index, text)`` of every
    passage cut to its sentences among the
    best-scored ones (``score(question, sentences) -> [n]``) whose tokens
    (``count_tokens``) fit ``budget`` together; a passage with none kept is left out. The best
    sentence is kept even when it alone is over the budget (the prompt fitting cuts it then).
    ``budget <= 0``: the passages unchanged."""
    if budget <= 0 or not passages:
        return list(enumerate(passages)), []
    parts = [(p, s) for p, text in enumerate(passages) for s in sentences(text)]
    if not parts:
        return list(enumerate(passages)), []
    scores = np.asarray(score(question, [s for _, s in parts]), np.float64)
    keep, used = set(), 0
    for i in np.argsort(-scores, kind="stable"):
        cost = count_tokens(parts[i][1])
        if keep and used + cost > budget:
            continue
        keep.add(int(i))
        used += cost
    kept = []
    for p in range(len(passages)):
        chosen = [s for i, (q, s) in enumerate(parts) if q == p and i in keep]
        if chosen:
            kept.append((p, " ".join(chosen)))
    return kept, [s for i, (_, s) in enumerate(parts) if i not in keep]
