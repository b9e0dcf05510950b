"""FF-RAG's synthetic knowledge (:func:`client_knowledge`): client ``k`` owns a synthetic
domain. Its private case base holds one fact per relation of ``data.private_entities``
entities; the shared base holds ``data.shared_entities`` entities of every client's domain. A
client's questions ask about its private facts and its domain's shared facts; they are split
into training and held-out questions. Nothing is answerable closed-book: every fact is drawn
fresh. Deterministic in ``config.seed``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from ml_collections import ConfigDict

from ffrag_jax.data import synthetic
from ffrag_jax.errors import UserError
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
    d, fl = config.data, config.fl
    domains = [x.strip() for x in d.domains.split(",") if x.strip()]
    if len(domains) < fl.num_clients:
        raise UserError(f"data.domains names {len(domains)} domains for fl.num_clients="
                        f"{fl.num_clients} clients (one domain each)")
    domains = domains[: fl.num_clients]
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


def reading_examples(config: ConfigDict) -> list[dict]:
    """The pretraining examples: reading comprehension on the base domain (no client data)."""
    return synthetic.make_examples(config.pretrain.domain, config.pretrain.num_examples,
                                   config.seed, distractors=0, user_questions=True)


def tokenizer_texts(reading: list[dict], shared: list[str], clients: list[Client]) -> list[str]:
    """What the job's BPE is trained on (when it is not given one): the pretraining examples,
    every fact and the training questions with their answers."""
    return ([prompts.prompt(e) + prompts.response(e) for e in reading]
            + shared + [f for c in clients for f in c.private]
            + [q["question"] + " " + q["answer"] for c in clients for q in c.train])
