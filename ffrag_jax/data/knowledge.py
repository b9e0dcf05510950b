"""FF-RAG's synthetic knowledge (:func:`client_knowledge`): client ``k`` owns a synthetic
domain. Its private case base holds one fact per relation of ``data.private_entities``
entities; the shared base holds ``data.shared_entities`` entities of every client's domain. A
client's questions ask about its private facts and its domain's shared facts; they are split
into training and held-out questions. Nothing is answerable closed-book: every fact is drawn
fresh. Deterministic in ``config.seed``.

With ``boundary.enabled`` the knowledge has a boundary (:mod:`ffrag_jax.data.boundary`):
questions from the case base, the authority, both in agreement or conflict, and neither; each
question dict then also holds ``type``, ``source``, ``case_fact`` and ``wrong``.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
from ml_collections import ConfigDict

from ffrag_jax.data import boundary, synthetic
from ffrag_jax.errors import UserError
from ffrag_jax.evaluation.boundary import check_reading
from ffrag_jax.rag import prompts


@dataclasses.dataclass
class Client:
    """One client's knowledge. Question dicts are ``{question, answer, fact}`` where ``fact``
    indexes ``passages`` = the private facts followed by the shared base's."""

    name: str
    domain: str
    private: list[str]
    train: list[dict]
    test: list[dict]


def client_knowledge(config: ConfigDict) -> tuple[list[str], list[Client]]:
    """``(shared facts, clients)``; deterministic in ``config.seed``."""
    domains = _domains(config)
    if boundary_enabled(config):
        return _boundary_knowledge(config, domains)
    d = config.data
    shared: list[str] = []
    shared_questions: dict[str, list[dict]] = {}
    for domain in sorted(set(domains)):
        facts, questions = synthetic.make_knowledge(domain, d.shared_entities,
                                                    config.seed + 1000)
        shared_questions[domain] = [{**q, "shared": len(shared) + q["fact"]} for q in questions]
        shared.extend(facts)
    clients = []
    for k, domain in enumerate(domains):
        private, questions = synthetic.make_knowledge(domain, d.private_entities,
                                                      config.seed + 1 + k)
        questions = questions + [
            {"question": q["question"], "answer": q["answer"], "fact": len(private) + q["shared"]}
            for q in shared_questions[domain]]
        order = np.random.default_rng([config.seed, k]).permutation(len(questions))
        held = max(int(round(d.held_out * len(questions))), 1)
        clients.append(Client(f"{k}:{domain}", domain, private,
                              [questions[i] for i in sorted(order[held:])],
                              [questions[i] for i in sorted(order[:held])]))
    return shared, clients


def boundary_enabled(config: ConfigDict) -> bool:
    return bool(config.get("boundary") and config.boundary.enabled)


def _domains(config: ConfigDict) -> list[str]:
    domains = [x.strip() for x in config.data.domains.split(",") if x.strip()]
    if len(domains) < config.fl.num_clients:
        raise UserError(f"data.domains names {len(domains)} domains for fl.num_clients="
                        f"{config.fl.num_clients} clients (one domain each)")
    for domain in domains:
        if domain not in synthetic.DOMAINS:
            raise UserError(f"data.domains: unknown domain {domain!r}; domains: "
                            f"{', '.join(synthetic.DOMAINS)}")
    return domains[: config.fl.num_clients]


def _boundary_knowledge(config: ConfigDict, domains: list[str]
                        ) -> tuple[list[str], list[Client]]:
    """:func:`client_knowledge` with a knowledge boundary: the shared base holds every domain's
    authority-only facts, then each client's overlap entities' authoritative facts."""
    d, b = config.data, config.boundary
    for name in ("conflict_rate", "unanswerable_rate", "negatives", "pretrain_abstain_rate",
                 "digest_rate"):
        if b.get(name) is not None and not 0.0 <= b[name] <= 1.0:
            raise UserError(f"boundary.{name} must be in [0, 1], got {b[name]}")
    check_reading(b.get("reading", "top"))
    names = {domain: boundary._Names(domain, config.seed + 1000) for domain in sorted(set(domains))}
    shared: list[str] = []
    authority_questions: dict[str, list[dict]] = {}
    for domain in sorted(names):
        facts, questions = boundary.domain_authority(domain, names[domain], d.shared_entities)
        authority_questions[domain] = [{**q, "fact": len(shared) + q["fact"], "case_fact": -1,
                                        "wrong": None} for q in questions]
        shared.extend(facts)
    per_client = []
    for domain in domains:
        case, authority, questions = boundary.client_boundary(
            domain, names[domain], case_entities=d.private_entities,
            overlap_entities=b.overlap_entities, conflict_rate=b.conflict_rate,
            unanswerable_rate=b.unanswerable_rate, authority_offset=len(shared))
        shared.extend(authority)
        per_client.append((domain, case, questions))
    clients = []
    for k, (domain, case, questions) in enumerate(per_client):
        questions = questions + [{**q, "fact": len(case) + q["fact"]}
                                 for q in authority_questions[domain]]
        train, test = boundary.split_by_type(questions, d.held_out,
                                             random.Random(f"split:{config.seed}:{k}"))
        clients.append(Client(f"{k}:{domain}", domain, case, train, test))
    if b.get("digest_rate"):
        boundary.add_digests(shared, clients, b.digest_rate, b.digest_size, config.seed,
                             b.get("digest_by", "random"))
    return shared, clients


def pretrain_abstain_rate(config: ConfigDict) -> float:
    """The share of the base reader's pretraining examples that abstain
    (``boundary.pretrain_abstain_rate``; None: ``boundary.unanswerable_rate``)."""
    rate = config.boundary.get("pretrain_abstain_rate")
    return config.boundary.unanswerable_rate if rate is None else rate


def reading_examples(config: ConfigDict) -> list[dict]:
    """The pretraining examples: reading comprehension on the base domain (no client data);
    with a knowledge boundary, in its format (tagged passages and answers, abstentions:
    :func:`boundary.reading_examples`)."""
    if boundary_enabled(config):
        return boundary.reading_examples(config.pretrain.domain, config.pretrain.num_examples,
                                         config.seed, pretrain_abstain_rate(config))
    return synthetic.make_examples(config.pretrain.domain, config.pretrain.num_examples,
                                   config.seed, distractors=config.pretrain.get("distractors", 0),
                                   user_questions=True)


def tokenizer_texts(reading: list[dict], shared: list[str], clients: list[Client]) -> list[str]:
    """What the job's BPE is trained on (when it is not given one): the pretraining examples,
    every fact and the training questions with their answers."""
    return ([prompts.prompt(e) + prompts.response(e) for e in reading]
            + shared + [f for c in clients for f in c.private]
            + [q["question"] + " " + q["answer"] for c in clients for q in c.train])
