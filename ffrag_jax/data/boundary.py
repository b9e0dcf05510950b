"""Knowledge-boundary questions (issue 17): per client, questions answerable from its case base,
from the shared authoritative base, from both in agreement, from both in conflict, and from
neither.

The world of a client (domain ``D``, synthetic facts as :mod:`ffrag_jax.data.synthetic`):

* **case**: entities only the client's case base knows (every relation);
* **authority**: entities only the shared authoritative base knows (every relation; shared by
  the clients of ``D``);
* **overlap** entities are in both: the authority states each relation, and the client's case
  note repeats it (**agree**) or contradicts it (**conflict**, with ``conflict_rate``);
* **unanswerable**: a case entity's relation that no base holds (its other relations are there:
  near misses on the entity), or an entity no base knows (near misses on the relation).

The target answer says where it comes from: ``"<value> [case]"`` when only the case base has
it, ``"<value> [authority]"`` when the authority has it (agree: the answer defers to the
authority; conflict: the authority wins and the tag says so), and :data:`ABSTAIN` when neither
base holds it. The reader sees each retrieved passage with its base's tag
(:func:`ffrag_jax.rag.prompts.tagged_context`), so the tags are readable from the context.

Every entity of a domain is distinct across the bases (a name in two bases with different
values would be an unintended conflict). Deterministic in the seed (``random.Random`` only).
"""

from __future__ import annotations

import random

from ffrag_jax.data import synthetic
from ffrag_jax.errors import UserError

ABSTAIN = "insufficient evidence"  # the fixed abstention (normalises to itself)
TYPES = ("case", "authority", "agree", "conflict", "unanswerable")
ANSWERABLE = ("case", "authority", "agree", "conflict")
SOURCES = ("case", "authority")  # the source tags of answers and passages


def source_of(kind: str) -> str | None:
    """The source tag a correct answer to a question of ``kind`` carries (None: abstain)."""
    if kind not in TYPES:
        raise UserError(f"unknown knowledge-boundary question type {kind!r}; types: "
                        f"{', '.join(TYPES)}")
    return {"case": "case", "unanswerable": None}.get(kind, "authority")


def target(question: dict, *, tagged: bool = True) -> str:
    """The answer the generator is trained on: the abstention, or the value with its source tag
    (``tagged``) or without. A ``source`` other than :data:`SOURCES` is an error naming it."""
    if question.get("type") == "unanswerable":
        return ABSTAIN
    source = question.get("source")
    if source is not None and source not in SOURCES:
        raise UserError(f"question {question.get('question')!r} has source tag {source!r}; "
                        f"tags: {', '.join(SOURCES)}")
    if not tagged or source is None:
        return question["answer"]
    return f"{question['answer']} [{source}]"


class _Names:
    """Distinct entities of one domain, drawn from one stream (no name twice in a domain)."""

    def __init__(self, domain: str, seed: int):
        self.kind = synthetic.DOMAINS[domain]["entity"]
        self.rng = random.Random(f"boundary:{domain}:{seed}")
        self.seen: set[str] = set()

    def take(self, n: int, where: str) -> list[str]:
        out = []
        for _ in range(200 * max(n, 1)):
            if len(out) == n:
                return out
            e = synthetic._entity(self.rng, self.kind)
            if e not in self.seen:
                self.seen.add(e)
                out.append(e)
        raise UserError(f"{where}: the domain has fewer distinct entities than asked "
                        f"({len(self.seen)} drawn); lower the entity counts")


def _question(rng: random.Random, domain: str, relation: str, entity: str) -> str:
    return rng.choice(synthetic._questions(domain, relation, True)).format(e=entity)


def domain_authority(domain: str, names: _Names, num_entities: int
                     ) -> tuple[list[str], list[dict]]:
    """The authoritative facts of ``num_entities`` authority-only entities of ``domain`` and a
    question on each (``type`` authority, ``fact`` indexing the returned facts)."""
    relations = synthetic.DOMAINS[domain]["relations"]
    facts, questions = [], []
    for entity in names.take(num_entities, f"domain {domain!r} authority entities"):
        for relation, (kind, fact, _) in sorted(relations.items()):
            value = synthetic._value(names.rng, kind)
            questions.append({"question": _question(names.rng, domain, relation, entity),
                              "answer": value, "type": "authority", "source": "authority",
                              "fact": len(facts), "entity": entity, "relation": relation})
            facts.append(fact.format(e=entity, v=value))
    return facts, questions


def client_boundary(domain: str, names: _Names, *, case_entities: int, overlap_entities: int,
                    conflict_rate: float, unanswerable_rate: float, authority_offset: int
                    ) -> tuple[list[str], list[str], list[dict]]:
    """One client's ``(case facts, authority facts it adds to the shared base, questions)``.

    Question dicts: ``{question, answer, type, source, fact, case_fact, wrong, entity,
    relation}``; ``fact`` is
    the gold passage (the authority's when it has one) as an index into ``case facts`` or, from
    ``len(case facts)`` on, into the shared base (whose first ``authority_offset`` facts come
    before this client's); ``case_fact`` the case note of agree/conflict questions; ``wrong``
    the case note's contradicting value (conflict); -1/None where there is none.
    """
    rng = names.rng
    relations = synthetic.DOMAINS[domain]["relations"]
    case, authority, questions = [], [], []
    answerable = 0

    def ask(relation, entity, **fields):
        questions.append({"question": _question(rng, domain, relation, entity),
                          "case_fact": -1, "wrong": None, "entity": entity,
                          "relation": relation, **fields})

    # Case entities; some relations withheld (unanswerable near misses on the entity).
    withheld = []
    for entity in names.take(case_entities, f"domain {domain!r} case entities"):
        for relation, (kind, fact, _) in sorted(relations.items()):
            value = synthetic._value(rng, kind)
            if rng.random() < unanswerable_rate / 2:
                withheld.append((relation, entity))
                continue
            ask(relation, entity, answer=value, type="case", source="case", fact=len(case))
            case.append(fact.format(e=entity, v=value))
            answerable += 1
    # Overlap entities: the authority states it, the case note agrees or contradicts.
    overlap = []
    for entity in names.take(overlap_entities, f"domain {domain!r} overlap entities"):
        for relation, (kind, fact, _) in sorted(relations.items()):
            value = synthetic._value(rng, kind)
            conflict = rng.random() < conflict_rate
            noted = value
            while conflict and noted == value:
                noted = synthetic._value(rng, kind)
            overlap.append((relation, entity, value, noted, conflict, len(case),
                            len(authority)))
            case.append(fact.format(e=entity, v=noted))
            authority.append(fact.format(e=entity, v=value))
    for relation, entity, value, noted, conflict, c, a in overlap:
        ask(relation, entity, answer=value, type="conflict" if conflict else "agree",
            source="authority", fact=len(case) + authority_offset + a, case_fact=c,
            wrong=noted if conflict else None)
        answerable += 1
    for relation, entity in withheld:
        ask(relation, entity, answer=ABSTAIN, type="unanswerable", source=None, fact=-1)
    # Entities no base knows (near misses on the relation).
    fresh = max(int(round(unanswerable_rate * answerable / 2)), 1 if unanswerable_rate else 0)
    for entity in names.take(fresh, f"domain {domain!r} unknown entities"):
        ask(rng.choice(sorted(relations)), entity, answer=ABSTAIN, type="unanswerable",
            source=None, fact=-1)
    return case, authority, questions


def split_by_type(questions: list[dict], held_out: float, rng: random.Random
                  ) -> tuple[list[dict], list[dict]]:
    """``(train, test)`` with a ``held_out`` share of every question type (at least one each
    when the type has two or more questions), in the questions' order."""
    test_ids: set[int] = set()
    for kind in TYPES:
        ids = [i for i, q in enumerate(questions) if q["type"] == kind]
        held = int(round(held_out * len(ids)))
        if len(ids) >= 2:
            held = min(max(held, 1), len(ids) - 1)
        test_ids.update(rng.sample(ids, held))
    return ([q for i, q in enumerate(questions) if i not in test_ids],
            [q for i, q in enumerate(questions) if i in test_ids])


def type_counts(questions: list[dict]) -> dict[str, int]:
    """How many questions of each type (every type named, zeros included)."""
    return {kind: sum(q["type"] == kind for q in questions) for kind in TYPES}


DIGEST_BY = ("random", "entity")  # how boundary.digest_by groups facts into records


def digests(facts: list[str], rate: float, size: int, rng: random.Random,
            groups: list[list[int]] | None = None) -> tuple[list[str], dict[int, int]]:
    """Long records over a base's ``facts``. Without ``groups``: ``round(rate * len(facts))``
    facts (whole records of ``size``), drawn without replacement and grouped ``size`` to a
    record. With ``groups`` (lists of fact indices, e.g. every fact of one entity: a case
    file): ``round(rate * len(groups))`` of them, each a record, its facts in a random
    order. Returns ``(records, member)``: the records' texts and, for each fact in one, the
    index of its record.

    A record states its facts as plainly as the facts themselves, so a dataset marks it
    relevant to each of them; a reader with a short window sees only its first facts (the
    prompt cuts the passage's end) and must pick the asked one among several values. It is
    relevant and less useful: what a reranker learnt from the generator's preferences can
    tell apart and one learnt from relevance labels cannot (DPA-RAG's premise)."""
    if groups is None:
        n = int(round(rate * len(facts))) // size * size
        picked = rng.sample(range(len(facts)), n)
        chosen = [picked[start : start + size] for start in range(0, n, size)]
    else:
        chosen = [rng.sample(g, len(g)) for g in
                  rng.sample(groups, int(round(rate * len(groups))))]
    records, member = [], {}
    for group in chosen:
        for f in group:
            member[f] = len(records)
        records.append(" ".join(facts[f] for f in group))
    return records, member


def _entity_groups(entity_of: dict[int, str]) -> list[list[int]]:
    """The fact indices of each entity with two or more facts, in a fixed order."""
    by_entity: dict[str, list[int]] = {}
    for f, entity in sorted(entity_of.items()):
        by_entity.setdefault(entity, []).append(f)
    return [fs for _, fs in sorted(by_entity.items()) if len(fs) > 1]


def _moved(i: int, case_len: int, grown: int, base: int, case_member: dict,
           shared_member: dict) -> tuple[int, int]:
    """Passage ``i`` of a client's passages (case, then shared) after :func:`add_digests`:
    ``(its new index, the index of the record holding it or -1)``."""
    if i < 0:
        return -1, -1
    if i < case_len:
        return i, case_len + case_member[i] if i in case_member else -1
    s = i - case_len
    return grown + s, grown + base + shared_member[s] if s in shared_member else -1


def add_digests(shared: list[str], clients: list, rate: float, size: int, seed: int,
                by: str = "random") -> None:
    """Appends :func:`digests` to the shared base and to each client's case base, in place,
    and points every question at them: its ``fact`` and ``case_fact`` indices are remapped
    (the shared base follows the longer case base) and ``digests`` lists the records holding
    either. ``by``: ``"random"`` (records of ``size`` facts) or ``"entity"`` (each record one
    entity's facts in its base). ``clients``: :class:`ffrag_jax.data.knowledge.Client`
    (``private``, ``train``, ``test``)."""
    if by not in DIGEST_BY:
        raise UserError(f"boundary.digest_by={by!r}; choose {' or '.join(DIGEST_BY)}")
    if size < 1:
        raise UserError(f"boundary.digest_size must be at least 1, got {size}")
    rng = random.Random(f"digests:{seed}")
    shared_entity, case_entity = {}, []  # fact index -> its entity (from the questions)
    for client in clients:
        mine, n = {}, len(client.private)
        for q in (*client.train, *client.test):
            for i in (q["fact"], q.get("case_fact", -1)):
                if 0 <= i < n:
                    mine[i] = q["entity"]
                elif i >= n:
                    shared_entity[i - n] = (client.domain, q["entity"])
        case_entity.append(mine)

    def groups(entity_of):
        return None if by == "random" else _entity_groups(entity_of)

    shared_records, shared_member = digests(shared, rate, size, rng, groups(shared_entity))
    base = len(shared)
    shared.extend(shared_records)
    for client, entity_of in zip(clients, case_entity, strict=True):
        case_len = len(client.private)
        case_records, case_member = digests(client.private, rate, size, rng,
                                            groups(entity_of))
        client.private.extend(case_records)
        grown = len(client.private)
        for q in (*client.train, *client.test):
            q["fact"], fact_record = _moved(q["fact"], case_len, grown, base, case_member,
                                            shared_member)
            q["case_fact"], case_record = _moved(q.get("case_fact", -1), case_len, grown,
                                                 base, case_member, shared_member)
            q["digests"] = [r for r in (fact_record, case_record) if r >= 0]


def reading_examples(domain: str, n: int, seed: int, unanswerable_rate: float) -> list[dict]:
    """Pretraining examples of the boundary format on a base domain (no client data):
    ``{context, question, answer}`` where the context is one fact after a random source tag
    and the answer its value with that tag; with ``unanswerable_rate`` the question asks what
    the fact does not say (another relation of its entity, or its relation of another entity)
    and the answer is :data:`ABSTAIN`. A reader pretrained so knows the tags and the
    abstention as words before any client trains; which questions its domain's bases can
    answer is what the federated dual task then teaches."""
    synthetic._check_domain(domain)
    relations = synthetic.DOMAINS[domain]["relations"]
    kind = synthetic.DOMAINS[domain]["entity"]
    rng = random.Random(f"boundary-reading:{domain}:{seed}")
    out = []
    for _ in range(n):
        relation = rng.choice(sorted(relations))
        value_kind, fact, _ = relations[relation]
        entity = synthetic._entity(rng, kind)
        value = synthetic._value(rng, value_kind)
        tag = rng.choice(SOURCES)
        asked_entity, asked_relation, answer = entity, relation, f"{value} [{tag}]"
        if rng.random() < unanswerable_rate:
            answer = ABSTAIN
            others = [r for r in sorted(relations) if r != relation]
            if others and rng.random() < 0.5:
                asked_relation = rng.choice(others)
            else:
                while asked_entity == entity:
                    asked_entity = synthetic._entity(rng, kind)
        out.append({"domain": domain, "context": f"[{tag}] " + fact.format(e=entity, v=value),
                    "question": _question(rng, domain, asked_relation, asked_entity),
                    "answer": answer})
    return out
