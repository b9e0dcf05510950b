"""Deterministic synthetic question-answering corpora for the demo and the tests.

Each domain is a small world of invented entities with relations, written as fact sentences.
An example is a context of ``1 + distractors`` fact sentences (one answers the question, the
others are about other entities of the same domain), a question and the answer span. Every
example draws fresh entities, so held-out accuracy measures reading the context, not
memorised names. Domains differ in entities, relations and wording, which is what a LoRA
adapts a base model to.

Everything is a function of the seed: ``make_examples('clinic', 100, seed=3)`` is the same on
every machine (``random.Random`` only, no numpy/JAX randomness).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "tr", "kl"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "", "", "n", "r", "l", "s", "th", "x"]


def _make_word(rng: random.Random, syllables: int) -> str:
    parts = [
        rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)
    ]
    return "".join(parts).capitalize()


def _pool(name: str, size: int, syllables: int) -> list[str]:
    """A fixed vocabulary of invented words. Drawing names from small pools lets a BPE learn
    them as single tokens, so a tiny model learns to read the context in a few hundred steps;
    every example still combines them into fresh facts, so nothing is answerable from memory."""
    rng = random.Random(f"pool:{name}")
    words: set[str] = set()
    while len(words) < size:
        words.add(_make_word(rng, syllables))
    return sorted(words)


POOL_SIZE = 300
_POOLS = {
    "name2": _pool("name2", POOL_SIZE, 2),
    "name3": _pool("name3", POOL_SIZE, 3),
    "person": _pool("person", POOL_SIZE, 2),
}


def _word(rng: random.Random, syllables: int) -> str:
    return rng.choice(_POOLS["name3" if syllables == 3 else "name2"])


# domain -> entity kind, {relation: (value kind, fact template, question templates)}.
# Value kinds: 'name2' (two-syllable word), 'name3', 'drug', 'doctor', 'ward', 'year', 'judge',
# 'court', 'price', 'coach', 'stadium'.
DOMAINS: dict[str, dict] = {
    "geography": {
        "entity": "country",
        "relations": {
            "capital": ("name2", "{v} is the capital of {e}.", ["What is the capital of {e}?"]),
            "currency": (
                "name2",
                "The currency of {e} is the {v}.",
                ["What is the currency of {e}?", "Which currency is used in {e}?"],
            ),
            "language": ("name3", "People in {e} speak {v}.", ["What language is spoken in {e}?"]),
            "founded": ("year", "{e} was founded in {v}.", ["When was {e} founded?"]),
        },
    },
    "clinic": {
        "entity": "patient",
        "relations": {
            "drug": (
                "drug",
                "Patient {e} was prescribed {v}.",
                ["Which drug was prescribed to patient {e}?", "What does patient {e} take?"],
            ),
            "doctor": (
                "doctor",
                "The doctor of patient {e} is {v}.",
                ["Who is the doctor of patient {e}?"],
            ),
            "ward": ("ward", "Patient {e} stays in ward {v}.", ["Which ward is patient {e} in?"]),
        },
    },
    "legal": {
        "entity": "case",
        "relations": {
            "judge": ("judge", "Case {e} was heard by {v}.", ["Who heard case {e}?",
                                                             "Which judge heard case {e}?"]),
            "court": ("court", "Case {e} was filed at the {v}.", ["Where was case {e} filed?"]),
            "decided": ("year", "Case {e} was decided in {v}.", ["When was case {e} decided?"]),
        },
    },
    "retail": {
        "entity": "product",
        "relations": {
            "price": ("price", "The {e} costs {v}.", ["How much does the {e} cost?",
                                                      "What is the price of the {e}?"]),
            "supplier": ("name3", "The {e} is supplied by {v}.", ["Who supplies the {e}?"]),
            "aisle": ("ward", "The {e} is shelved in aisle {v}.", ["Which aisle has the {e}?"]),
        },
    },
    "sports": {
        "entity": "team",
        "relations": {
            "coach": ("coach", "The {e} are coached by {v}.", ["Who coaches the {e}?"]),
            "stadium": ("stadium", "The {e} play at {v}.", ["Where do the {e} play?",
                                                            "What is the home ground of the {e}?"]),
            "founded": ("year", "The {e} were founded in {v}.", ["When were the {e} founded?"]),
        },
    },
}


# How users ask besides the templates above: the same meaning in other words, often words of
# another relation's fact ("pay" next to "people in", which the language fact starts with). An
# off-the-shelf retriever follows the overlap; a reader that sees the passage does not, so its
# likelihood can teach the query encoder (LM-supervised retrieval, issue 5).
USER_QUESTIONS: dict[str, dict[str, list[str]]] = {
    "geography": {
        "capital": ["From which city is {e} governed?"],
        "currency": ["What do people in {e} pay with?"],
        "language": ["Which tongue is used in {e}?"],
        "founded": ["Since when has {e} existed?"],
    },
    "clinic": {
        "drug": ["What was patient {e} given?"],
        "doctor": ["Who prescribes for patient {e}?"],
        "ward": ["Where is patient {e} treated?"],
    },
    "legal": {
        "judge": ["Who presided over case {e}?"],
        "court": ["Which court heard case {e}?"],
        "decided": ["In which year was case {e} heard?"],
    },
    "retail": {
        "price": ["How much is the {e}?"],
        "supplier": ["Where does the {e} come from?"],
        "aisle": ["Where can I find the {e}?"],
    },
    "sports": {
        "coach": ["Who trains the {e}?"],
        "stadium": ["Where are the {e} based?"],
        "founded": ["Since when do the {e} play?"],
    },
}


def _entity(rng: random.Random, kind: str) -> str:
    if kind == "country":
        return _word(rng, rng.choice([2, 3]))
    if kind == "patient":
        return f"{rng.choice(_POOLS['person'])} {rng.choice(_POOLS['person'])}"
    if kind == "case":
        return f"{_word(rng, 2)}-{rng.randint(10, 99)}"
    if kind == "product":
        return f"{_word(rng, 2).lower()} {rng.choice(['lamp', 'kettle', 'chair', 'drill'])}"
    if kind == "team":
        return f"{_word(rng, 2)} {rng.choice(['Hawks', 'Rovers', 'Giants', 'Comets'])}"
    raise ValueError(kind)


def _value(rng: random.Random, kind: str) -> str:
    if kind == "name2":
        return _word(rng, 2)
    if kind == "name3":
        return _word(rng, 3)
    if kind == "drug":
        return _word(rng, 2) + rng.choice(["in", "ol", "ex", "ax"])
    if kind == "doctor":
        return f"Dr. {rng.choice(_POOLS['person'])}"
    if kind == "ward":
        return f"{rng.choice('ABCDEFGH')}{rng.randint(1, 9)}"
    if kind == "judge":
        return f"Judge {rng.choice(_POOLS['person'])}"
    if kind == "court":
        return f"{_word(rng, 2)} Court"
    if kind == "price":
        return f"{rng.randint(2, 99)} crowns"
    if kind == "coach":
        return f"Coach {rng.choice(_POOLS['person'])}"
    if kind == "stadium":
        return f"{_word(rng, 2)} Arena"
    if kind == "year":
        return str(rng.randint(1100, 1990))
    raise ValueError(kind)


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"unknown synthetic domain {domain!r}; domains: {', '.join(DOMAINS)}")


def _questions(domain: str, relation: str, user_questions: bool) -> list[str]:
    templates = DOMAINS[domain]["relations"][relation][2]
    return templates + USER_QUESTIONS[domain][relation] if user_questions else templates


def make_examples(domain: str, n: int, seed: int, distractors: int = 2,
                  user_questions: bool = False) -> list[dict]:
    """``n`` examples ``{domain, context, question, answer}`` of ``domain``; with
    ``user_questions`` the questions are also worded as in :data:`USER_QUESTIONS`."""
    _check_domain(domain)
    spec = DOMAINS[domain]
    relations = spec["relations"]
    rng = random.Random(f"{domain}:{seed}")
    out = []
    for _ in range(n):
        relation = rng.choice(sorted(relations))
        kind, fact, _ = relations[relation]
        questions = _questions(domain, relation, user_questions)
        entities = set()
        while len(entities) < distractors + 1:
            entities.add(_entity(rng, spec["entity"]))
        entities = sorted(entities)
        rng.shuffle(entities)
        target, others = entities[0], entities[1:]
        answer = _value(rng, kind)
        sentences = [fact.format(e=target, v=answer)]
        for other in others:  # distractors: the same or another relation of other entities
            r = rng.choice(sorted(relations))
            sentences.append(relations[r][1].format(e=other, v=_value(rng, relations[r][0])))
        rng.shuffle(sentences)
        out.append(
            {
                "domain": domain,
                "context": " ".join(sentences),
                "question": rng.choice(questions).format(e=target),
                "answer": answer,
            }
        )
    return out


def make_knowledge(domain: str, num_entities: int, seed: int) -> tuple[list[str], list[dict]]:
    """A consistent knowledge base: ``num_entities`` distinct entities, each with one fact per
    relation of the domain, so no two facts answer the same question differently (a base with
    contradicting facts makes retrieval ill-posed: no training can pick between them).

    Returns ``(facts, questions)``: fact sentences, and one question per fact
    ``{question, answer, fact}`` (``fact`` indexes ``facts``) worded by a domain template or a
    :data:`USER_QUESTIONS` one. Entity names recur across the relations of an entity, and
    value names can be other entities' names, so a retriever must find the relation and the
    role, not just the name.
    """
    _check_domain(domain)
    spec = DOMAINS[domain]
    rng = random.Random(f"knowledge:{domain}:{seed}")
    entities: list[str] = []
    seen: set[str] = set()
    for _ in range(100 * num_entities):
        if len(entities) == num_entities:
            break
        entity = _entity(rng, spec["entity"])
        if entity not in seen:
            seen.add(entity)
            entities.append(entity)
    if len(entities) < num_entities:
        raise ValueError(f"domain {domain!r} has fewer than {num_entities} distinct entities")
    facts, questions = [], []
    for entity in entities:
        for relation, (kind, fact, _) in sorted(spec["relations"].items()):
            answer = _value(rng, kind)
            template = rng.choice(_questions(domain, relation, True))
            questions.append({"question": template.format(e=entity), "answer": answer,
                              "fact": len(facts)})
            facts.append(fact.format(e=entity, v=answer))
    return facts, questions


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
