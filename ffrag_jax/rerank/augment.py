"""DPA-RAG's query augmentation on the synthetic domains, and its consistency filter.

Each strategy rewrites a training question (``{question, entity, relation, ...}``, from
:mod:`ffrag_jax.data.boundary`) into another query with the same information need, by
templates:

* ``paraphrase`` - another wording of the relation's question (the domain's templates);
* ``constraint`` - an added constraint ("..., according to the records?");
* ``decomposition`` - the entity first, then the relation ("Consider X. Then: ...");
* ``specific`` / ``general`` - more specific (the domain named) or less (a bare wording);
* ``entity_swap`` - the same wording about another training question's entity (and so with
  that question's answer and gold passage).

:func:`consistent` is the filter: an augmented query is kept only when the passages the
generator answers right with (its aligned passages, :mod:`.preferences`) are the same set as
for the question it came from, and not empty.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

from ffrag_jax.data import synthetic
from ffrag_jax.errors import UserError

STRATEGIES = ("paraphrase", "constraint", "decomposition", "specific", "general",
              "entity_swap")


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def augment(question: dict, domain: str, strategy: str, rng: random.Random,
            pool: Sequence[dict] = ()) -> dict | None:
    """The augmented question (a copy with a new ``question`` text and ``augmented`` =
    ``strategy``; ``origin``: the index in ``pool`` of the question whose needs it shares
    when that is another one), or None when the strategy has nothing to rewrite."""
    if strategy not in STRATEGIES:
        raise UserError(f"unknown query augmentation {strategy!r}; strategies: "
                        f"{', '.join(STRATEGIES)}")
    entity, relation = question.get("entity"), question.get("relation")
    if entity is None or relation is None:
        return None
    text = question["question"].rstrip("?").rstrip()
    templates = synthetic._questions(domain, relation, True)
    out = {**question, "augmented": strategy}
    if strategy == "paraphrase":
        others = [t.format(e=entity) for t in templates if t.format(e=entity)
                  != question["question"]]
        if not others:
            return None
        out["question"] = rng.choice(others)
    elif strategy == "constraint":
        out["question"] = f"{text}, according to the records?"
    elif strategy == "decomposition":
        out["question"] = f"Consider {entity}. Then: {_lower_first(question['question'])}"
    elif strategy == "specific":
        out["question"] = f"In the {domain} records: {_lower_first(question['question'])}"
    elif strategy == "general":
        out["question"] = f"{entity}: {relation}?"
    else:  # entity_swap
        candidates = [j for j, q in enumerate(pool) if q.get("relation") == relation
                      and q.get("entity") not in (None, entity)
                      and q.get("type") == question.get("type")]
        if not candidates:
            return None
        j = rng.choice(candidates)
        other = pool[j]
        out = {**other, "augmented": strategy, "origin": j,
               "question": question["question"].replace(entity, other["entity"])}
    return out


def consistent(original: np.ndarray, original_ids: np.ndarray, augmented: np.ndarray,
               augmented_ids: np.ndarray) -> bool:
    """Whether an augmented query's aligned passages (``augmented`` labels ``[K]`` over its
    candidates ``augmented_ids`` ``[K]``) are those of its origin (same arrays), and some."""
    a = set(original_ids[original > 0].tolist())
    b = set(augmented_ids[augmented > 0].tolist())
    return bool(a) and a == b
