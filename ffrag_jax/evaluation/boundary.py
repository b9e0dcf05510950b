"""Knowledge-boundary metrics (issue 17): answers that carry a source tag or abstain, scored
per question type (:mod:`ffrag_jax.data.boundary`).

* ``answerable_em`` / ``answerable_f1``: the answer's value (tag removed; an abstention is
  wrong) on the case, authority, agree and conflict questions;
* ``abstain_precision`` / ``abstain_recall`` / ``abstain_f1``: abstaining as the positive
  class, on every question (the gold positives: the unanswerable ones);
* ``hallucination_rate``: the unanswerable questions answered instead of abstained on;
* ``conflict_accuracy``: conflict questions answered with the authority's value;
  ``conflict_case_rate``: with the contradicting case note's;
* ``attribution_accuracy``: of the answerable questions answered (not abstained on), the share
  whose tag names the right source;
* ``em_<type>``: the value's exact match per answerable type.

How a reader that reads one candidate at a time turns its K answers into one
(:data:`READINGS`, ``boundary.reading``): ``top`` keeps the first candidate's; ``first_answer``
the first one not abstained on (the reader judges sufficiency per passage, so it abstains only
when no candidate holds the answer); ``authority_first`` the first answer tagged
``[authority]`` if any (the authority wins a conflict), else as ``first_answer``.

A metric whose questions are absent (no conflict question, nothing answered) is NaN
(``"nan"`` in ``metrics.jsonl``; left out of means).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

from ffrag_jax.data.boundary import ABSTAIN, ANSWERABLE, source_of
from ffrag_jax.errors import UserError
from ffrag_jax.evaluation.answers import exact_match, f1, normalize_answer

_TAG = re.compile(r"\s*\[([^\[\]]*)\]\s*$")


@dataclasses.dataclass(frozen=True)
class Parsed:
    """A generated answer split into ``value`` and trailing ``[tag]`` (None: no tag), and
    whether it is the abstention."""

    value: str
    tag: str | None
    abstained: bool


def parse(prediction: str) -> Parsed:
    """``"Dr. Lo [authority]"`` -> ``Parsed("Dr. Lo", "authority", False)``; the abstention
    (with or without a tag) -> ``abstained``."""
    match = _TAG.search(prediction)
    value, tag = (prediction[: match.start()], match.group(1).strip()) if match else (
        prediction, None)
    value = value.strip()
    return Parsed(value, tag, normalize_answer(value) == normalize_answer(ABSTAIN))


def _top(answers: Sequence[str]) -> str:
    return answers[0]


def _first_answer(answers: Sequence[str]) -> str:
    return next((a for a in answers if not parse(a).abstained), answers[0])


def _authority_first(answers: Sequence[str]) -> str:
    return next((a for a in answers if not parse(a).abstained and parse(a).tag == "authority"),
                _first_answer(answers))


READINGS = {"top": _top, "first_answer": _first_answer, "authority_first": _authority_first}


def check_reading(reading: str) -> None:
    """A ``boundary.reading`` that is not one of :data:`READINGS` is an error naming it."""
    if reading not in READINGS:
        raise UserError(f"boundary.reading={reading!r}; choose {' or '.join(READINGS)}")


def read(per_candidate: Sequence[Sequence[str]], reading: str) -> list[str]:
    """One answer per question from its answers with each candidate alone (best first, at
    least one per question) by the rule ``reading`` (:data:`READINGS`)."""
    check_reading(reading)
    rule = READINGS[reading]
    for i, answers in enumerate(per_candidate):
        if not answers:
            raise UserError(f"question {i} has no candidate answer to read")
    return [rule(answers) for answers in per_candidate]


def abstain_gate(tokenizer, threshold: float | None) -> tuple[int, float] | None:
    """The decoder's answer-or-abstain rule (:func:`ffrag_jax.models.generate.generate`'s
    ``abstain``): the abstention's token id and ``threshold`` (None or 0: plain greedy). The
    abstention must be one token (``tokenizer.added_tokens``)."""
    if not threshold:
        return None
    if not 0.0 < threshold <= 1.0:
        raise UserError(f"boundary.abstain_threshold must be in (0, 1], got {threshold}")
    ids = tokenizer(ABSTAIN, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise UserError(f"boundary.abstain_threshold needs {ABSTAIN!r} as one token (it is "
                        f"{len(ids)}): add it to tokenizer.added_tokens")
    return int(ids[0]), float(threshold)


def _mean(flags: list[bool] | list[float]) -> float:
    return float(np.mean(flags)) if flags else float("nan")


def boundary_metrics(predictions: Sequence[str], questions: Sequence[dict]) -> dict:
    """The metrics above for generated ``predictions`` of ``questions`` (dicts with ``type``,
    ``answer`` and, for conflicts, ``wrong``)."""
    parsed = [parse(p) for p in predictions]
    kinds = [q["type"] for q in questions]
    for kind in kinds:
        source_of(kind)  # an unknown type is an error naming it
    answerable = [i for i, k in enumerate(kinds) if k in ANSWERABLE]
    unanswerable = [i for i, k in enumerate(kinds) if k == "unanswerable"]

    def em(i: int) -> float:
        return 0.0 if parsed[i].abstained else exact_match(parsed[i].value,
                                                           questions[i]["answer"])

    abstained = [p.abstained for p in parsed]
    true_pos = sum(abstained[i] for i in unanswerable)
    precision = true_pos / sum(abstained) if sum(abstained) else float("nan")
    recall = true_pos / len(unanswerable) if unanswerable else float("nan")
    if not unanswerable:
        f = float("nan")
    elif not sum(abstained) or precision + recall == 0:
        f = 0.0  # never abstained, or never rightly
    else:
        f = 2 * precision * recall / (precision + recall)
    conflicts = [i for i, k in enumerate(kinds) if k == "conflict"]
    answered = [i for i in answerable if not parsed[i].abstained]
    out = {
        "answerable_em": _mean([em(i) for i in answerable]),
        "answerable_f1": _mean([0.0 if parsed[i].abstained
                                else f1(parsed[i].value, questions[i]["answer"])
                                for i in answerable]),
        "abstain_precision": precision, "abstain_recall": recall, "abstain_f1": f,
        "hallucination_rate": _mean([not abstained[i] for i in unanswerable]),
        "conflict_accuracy": _mean([em(i) for i in conflicts]),
        "conflict_case_rate": _mean([not parsed[i].abstained and
                                     exact_match(parsed[i].value, questions[i]["wrong"])
                                     for i in conflicts]),
        "attribution_accuracy": _mean([parsed[i].tag == source_of(kinds[i])
                                       for i in answered]),
    }
    for kind in ANSWERABLE:
        out[f"em_{kind}"] = _mean([em(i) for i, k in enumerate(kinds) if k == kind])
    return out
