"""The round driver of both federated jobs (federated LoRA and FF-RAG) on the one trainer.

A round: select the clients (:func:`~ffrag_jax.federated.clients.select_clients`, seeded by
the round), weigh them by their examples, let the job train them (``round_fn``: the LM job
runs start, local training, rejection and aggregation as one jitted program; FF-RAG trains its
clients with host-side retrieval and aggregates with the same strategy), then the job's
evaluation hook, then a checkpoint of what the strategy's rounds change. Resume, progress and
continuation come with the :class:`~ffrag_jax.training.trainer.Trainer`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ffrag_jax.federated.clients import client_weights, select_clients
from ffrag_jax.federated.strategies import Strategy
from ffrag_jax.training.metrics import MetricsLog
from ffrag_jax.training.trainer import StepInfo, Trainer


class RoundDriver:
    """``rounds`` rounds of ``strategy`` over ``len(client_sizes)`` clients, ``fraction`` of
    them a round. The state is a dict whose ``servers`` entries are strategy server states
    (one per adapted model); only their changing parts are checkpointed."""

    def __init__(self, strategy: Strategy, *, name: str, ckpt_dir: Path, metrics: MetricsLog,
                 rounds: int, client_sizes: Sequence[int], fraction: float = 1.0,
                 servers: Sequence[str] = ("server",), wait_each_save: bool = False,
                 profile: dict | None = None):
        self.strategy, self.servers = strategy, tuple(servers)
        self.client_sizes, self.fraction = list(client_sizes), fraction
        self.trainer = Trainer(name, ckpt_dir=ckpt_dir, metrics=metrics, total=rounds,
                               unit="round", wait_each_save=wait_each_save,
                               checkpointed=self._checkpointed, restore_into=self._restore_into,
                               **(profile or {}))

    def _checkpointed(self, state: dict) -> dict:
        return {k: self.strategy.checkpointed(v) if k in self.servers else v
                for k, v in state.items()}

    def _restore_into(self, state: dict, saved: dict) -> dict:
        return {k: {**state[k], **saved[k]} if k in self.servers else saved[k] for k in state}

    def selection(self, t: int) -> tuple[list[int], np.ndarray]:
        """Round ``t``'s (0-based) clients and their weights ``p_k = n_k / sum(n)``."""
        selected = select_clients(t, len(self.client_sizes), self.fraction)
        return selected, client_weights([self.client_sizes[k] for k in selected])

    def initial_state(self, state: dict) -> tuple[int, dict]:
        """``(rounds done, state)`` from the latest checkpoint (or ``(0, state)``)."""
        return self.trainer.initial_state(state)

    def add_hook(self, fn: Callable[[StepInfo], None], *, every: int = 1) -> None:
        """After every ``every``-th round (and the last): evaluation, export, ..."""
        self.trainer.add_hook(fn, every=every)

    def run(self, state: dict, round_fn: Callable, start: int) -> dict:
        """Rounds ``start`` .. ``rounds - 1``: ``state, out = round_fn(state, t, selected,
        weights)``."""
        def step(state, t):
            selected, weights = self.selection(t)
            return round_fn(state, t, selected, weights)

        return self.trainer.run(state, step, start)
