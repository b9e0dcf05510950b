"""The federated LoRA job's clients, as the server sees them: who they are, how much they
train on, a round of their training and the evaluation of their held-out split.

Two engines implement :class:`Clients`:

* :class:`LocalClients` (``fl.engine="local"``): every client's data in this process and a
  round as one jitted program (vmapped local training, rejection, aggregation);
* :class:`ffrag_jax.federated.flower.server.FlowerClients` (``fl.engine="flower"``): every
  client a Flower node that holds its own data; the server only sends and receives adapters.

What a client computes from its own data is written once here (:func:`client_data`,
:func:`round_inputs`, :func:`evaluate_client`) and used by both, which is what makes the two
engines give the same run.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from ml_collections import ConfigDict

from ffrag_jax import data, federated
from ffrag_jax.data.clients import held_out_split
from ffrag_jax.evaluation.rounds import (
    eval_batches,
    evaluate_round,
    exact_match_round,
    make_evaluator,
)
from ffrag_jax.federated import privacy, round_step
from ffrag_jax.federated.strategies import Strategy
from ffrag_jax.models import lora
from ffrag_jax.models.lora import LoRA
from ffrag_jax.training import sharding
from ffrag_jax.training import train as train_lib


@dataclasses.dataclass
class ClientData:
    """One client's data: its encoded training split ``{input_ids, attention_mask,
    loss_mask}`` ``[n, T]``, held-out loss batches ``[B, T]``, held-out ``(prompts,
    responses)`` for exact match, and its local steps per round."""

    name: str
    train: dict
    held_batches: list[dict]
    held_pairs: tuple[list, list]
    steps: int

    @property
    def num_examples(self) -> int:
        return len(self.train["input_ids"])


def client_data(config: ConfigDict, pairs: list[tuple[list, list]], names: list[str],
                encoded: tuple[list[dict], list[dict]], ids: list[int] | None = None
                ) -> list[ClientData]:
    """:class:`ClientData` of the clients whose ``(prompts, responses)`` are ``pairs``, from
    their ``encoded`` ``(train sets, held-out sets)`` (:func:`~ffrag_jax.data.clients.
    encode_clients`); client ids ``ids``, default ``0..len-1``, seed the held-out split."""
    fl = config.fl
    ids = list(range(len(pairs))) if ids is None else ids
    train_sets, held_sets = encoded
    out = []
    for k, (prompts, responses), tr, ho, name in zip(ids, pairs, train_sets, held_sets, names,
                                                       strict=True):
        held = held_out_split(config, k, len(prompts))[1]
        out.append(ClientData(
            name=name, train=tr, held_batches=eval_batches(ho, config.eval.batch_size),
            held_pairs=([prompts[i] for i in held], [responses[i] for i in held]),
            steps=data.local_steps(len(tr["input_ids"]), fl.local_epochs, fl.batch_size)))
    return out


def round_inputs(config: ConfigDict, strategy: Strategy, client: ClientData, k: int, i: int,
                 t: int, num_selected: int, max_steps: int, params: dict, template: LoRA
                 ) -> tuple[LoRA | None, jax.Array, dict]:
    """Client ``k``'s inputs to round ``t`` (0-based), where it is the ``i``-th of
    ``num_selected`` selected clients: ``(fresh adapter or None, rng, batches [S, A, B, T])``,
    a pure function of the config's seed, the round and the client (``params`` only for the
    fresh adapter's shapes)."""
    fl = config.fl
    round_rng = jax.random.split(jax.random.key(config.seed), 3)[2]
    key = jax.random.fold_in(round_rng, t)
    fresh = None
    if strategy.fresh_adapters:
        fresh = new_adapter(jax.random.fold_in(key, k), params, template)
    rng = jax.random.split(jax.random.fold_in(key, 10**6), num_selected)[i]
    batches = data.client_round_batches(client.train, client.steps, max_steps,
                                        fl.micro_batch_size, fl.batch_size // fl.micro_batch_size,
                                        seed=[config.seed, t, k])
    return fresh, rng, batches


def new_adapter(rng: jax.Array, params: dict, template: LoRA) -> LoRA:
    """A freshly initialised adapter with ``template``'s targets, rank, scale and dropout."""
    rank = max(template.ranks.values())
    return lora.init(rng, params, template.targets, rank, template.scale * rank,
                     dropout=template.dropout)


def evaluate_client(config: ConfigDict, strategy: Strategy, cfg, tokenizer, server: dict,
                    clients: list[ClientData], ids: list[int], evaluate, *, base: bool = False
                    ) -> list[dict]:
    """Held-out loss (``kind="eval"``) and, with ``eval.exact_match``, exact match
    (``kind="exact_match"``) records of ``clients`` (ids ``ids``) for the round's models
    (the base model with ``base``) of ``server`` (the server state, or a client's view of it
    whose personal rows are ``clients``')."""
    names = [c.name for c in clients]
    out = [{"kind": "eval", **r} for r in evaluate_round(
        strategy, server, [c.held_batches for c in clients], names, evaluate, base=base)]
    if config.eval.exact_match:
        out += [{"kind": "exact_match", **r} for r in exact_match_round(
            config, strategy, cfg, tokenizer, server, [c.held_pairs for c in clients], names,
            base=base)]
    for r in out:
        r["client"] = ids[r["client"]]
    return out


class Clients:
    """The interface of an engine's clients, from the server's side."""

    names: list[str]
    counts: list[int]  # training examples per client
    steps: list[int]  # local steps per round

    def round(self, server: dict, t: int, selected: list[int], weights: np.ndarray,
              fusion: str) -> tuple[dict, dict]:
        """Round ``t``: ``(next server state, info)`` with ``info["accepted"]`` ``[K]``,
        ``info["loss"]`` and ``info["active"]`` ``[K, S]`` (per local step), and
        ``info["refused"]`` ``{client: reason}`` of the clients that did not take part."""
        raise NotImplementedError

    def evaluate(self, server: dict, t: int, *, base: bool = False) -> list[dict]:
        """Every client's held-out records (:func:`evaluate_client`) of the round's models."""
        raise NotImplementedError


class LocalClients(Clients):
    """All clients in this process; a round is one jitted program over the mesh."""

    def __init__(self, config: ConfigDict, strategy: Strategy, cfg, tokenizer,
                 clients: list[ClientData], params: dict, template: LoRA, ranks: list[int],
                 mesh: jax.sharding.Mesh):
        self.config, self.strategy, self.cfg, self.tokenizer = config, strategy, cfg, tokenizer
        self.clients, self.params, self.template, self.ranks = clients, params, template, ranks
        self.mesh = mesh
        self.names = [c.name for c in clients]
        no_held = [c.name for c in clients if not c.held_batches]
        if no_held:
            logging.warning("client(s) %s have no held-out examples: their held-out metrics "
                            "are left out of the curves and the summary", ", ".join(no_held))
        self.counts = [c.num_examples for c in clients]
        self.steps = [c.steps for c in clients]
        self.max_steps = max(max(self.steps), 1)
        self.evaluate_fn = make_evaluator(cfg)
        self.round_fn = make_round_fn(config, cfg, strategy)

    def round(self, server, t, selected, weights, fusion):
        max_rank = max(self.ranks)
        inputs = [round_inputs(self.config, self.strategy, self.clients[k], k, i, t,
                               len(selected), self.max_steps, self.params, self.template)
                  for i, k in enumerate(selected)]
        fresh = (federated.stack_clients([f for f, _, _ in inputs])
                 if self.strategy.fresh_adapters else None)
        batches = {key: np.stack([b[key] for _, _, b in inputs]) for key in inputs[0][2]}
        args = (fresh, np.asarray(selected), np.asarray(weights, np.float32),
                np.stack([federated.rank_mask(self.ranks[k], max_rank) for k in selected]),
                batches, jnp.stack([r for _, r, _ in inputs]),
                np.asarray([self.steps[k] for k in selected], np.int32))
        args = sharding.put(args, jax.sharding.NamedSharding(
            self.mesh, jax.sharding.PartitionSpec("clients")))
        with jax.set_mesh(self.mesh):  # the model's activation hints (models.partitioning)
            server, _, info = self.round_fn(server, *args, fusion=fusion)
        return server, {**sharding.to_host(info), "refused": {}}

    def evaluate(self, server, t, *, base=False):
        return evaluate_client(self.config, self.strategy, self.cfg, self.tokenizer, server,
                               self.clients, list(range(len(self.clients))), self.evaluate_fn,
                               base=base)


def make_optimizer(fl: ConfigDict):
    """The clients' optimizer factory (a function of each client's own step count)."""
    def build(num_steps):
        return train_lib.make_optimizer(fl.lr, num_steps, weight_decay=fl.weight_decay,
                                        max_grad_norm=fl.max_grad_norm)
    return build


def make_round_fn(config: ConfigDict, cfg, strategy: Strategy):
    """The local engine's jitted round (:func:`round_step.run_round`)."""
    dp = privacy.from_config(config.fl)

    @functools.partial(jax.jit, static_argnames="fusion")
    def round_fn(server, *args, fusion):
        # No donation: the previous state may still be in an asynchronous checkpoint save.
        return round_step.run_round(server, *args, cfg=cfg, optimizer=make_optimizer(config.fl),
                                    strategy=strategy, fusion=fusion, dp=dp)
    return round_fn


def make_train_fn(config: ConfigDict, cfg, strategy: Strategy):
    """A Flower client's jitted half of a round (:func:`round_step.train_clients`) on its own
    view of the server state (one row)."""
    dp = privacy.from_config(config.fl)

    @functools.partial(jax.jit, static_argnames="fusion")
    def train_fn(view, *args, fusion):
        return round_step.train_clients(view, *args, cfg=cfg,
                                        optimizer=make_optimizer(config.fl), strategy=strategy,
                                        fusion=fusion, dp=dp)
    return train_fn


def make_aggregate_fn(strategy: Strategy):
    """The Flower server's jitted half of a round (:func:`round_step.aggregate_clients`)."""
    return jax.jit(functools.partial(round_step.aggregate_clients, strategy=strategy))
