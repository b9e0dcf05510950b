"""A language-model training phase (pretraining, a LoRA) on the one
:class:`~ffrag_jax.training.trainer.Trainer`.

:func:`train_phase` runs the jitted :func:`~ffrag_jax.training.train.train_step` from the latest
checkpoint of the phase (or from step 0) to ``steps``, logging loss, gradient norm, learning
rate and tokens/s every ``log_every`` steps (a hook), and saving an orbax checkpoint every
``checkpoint_every`` steps and at the end. Batches come from
:func:`~ffrag_jax.data.text.batch_at`, a pure function of the step, so a resumed phase is the same
computation as an uninterrupted one.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np
import optax
from absl import logging
from ml_collections import ConfigDict

from ffrag_jax.data import text
from ffrag_jax.errors import UserError
from ffrag_jax.models.llama import LlamaConfig
from ffrag_jax.training import health, sharding, train
from ffrag_jax.training.metrics import MetricsLog
from ffrag_jax.training.trainer import StepInfo, Trainer


def train_phase(
    name: str,
    *,
    cfg: LlamaConfig,
    trainable,
    frozen,
    mode: str,
    data: dict[str, np.ndarray],
    phase: ConfigDict,
    mesh: jax.sharding.Mesh,
    rng: jax.Array,
    ckpt_dir: Path,
    metrics: MetricsLog,
    log_every: int,
    checkpoint_every: int,
    section: str | None = None,
    profile: dict | None = None,
):
    """Trains ``trainable`` for ``phase.steps`` steps; returns the trained tree. ``section``:
    the config section ``phase`` came from (default: ``name``), for messages; ``profile``:
    the :class:`~ffrag_jax.training.trainer.Trainer`'s ``profile_steps``/``profile_dir``."""
    steps = int(phase.steps)
    optimizer = train.make_optimizer(
        phase.lr,
        steps,
        warmup_steps=phase.warmup_steps,
        weight_decay=phase.weight_decay,
        max_grad_norm=phase.max_grad_norm,
    )
    schedule = train.warmup_linear_decay(phase.lr, steps, phase.warmup_steps)
    trainable = sharding.shard(trainable, mesh)
    state = jax.jit(lambda t: train.init_train_state(t, optimizer))(trainable)
    trainer = Trainer(name, ckpt_dir=ckpt_dir, metrics=metrics, total=steps,
                      checkpoint_every=checkpoint_every, **(profile or {}))
    start, state = trainer.initial_state(state)
    if start >= steps:
        return trainer.run(state, None, start).trainable

    per_step = phase.batch_size * phase.grad_accum
    if per_step % (mesh.shape["data"] * mesh.shape["fsdp"]):
        raise UserError(
            f"{section or name}.batch_size={phase.batch_size} is not divisible by the "
            f"data-parallel devices ({mesh.shape['data'] * mesh.shape['fsdp']})"
        )
    step_fn = train.jit_train_step(cfg, optimizer, mode, mesh, state, frozen,
                                   use_dropout=mode == "lora")
    batch_sharding = sharding.batch_sharding(mesh, 3, batch_dim=1)
    seq_len = data["input_ids"].shape[1]
    monitor = health.Monitor(name, f"lower {section or name}.lr (now {phase.lr:g})")
    weight_norm = jax.jit(optax.global_norm)
    # Loss summed on device over the steps since the last log line (no host sync per step).
    window = {"start": time.perf_counter(), "steps": 0, "loss": 0.0}

    def step(state, i: int):
        batch = text.batch_at(data, i, phase.batch_size, phase.grad_accum, seed=phase.seed)
        batch = sharding.put(batch, batch_sharding)
        with jax.set_mesh(mesh):  # the model's activation hints (models.partitioning)
            state, out = step_fn(state, frozen, batch, jax.random.fold_in(rng, i))
        window["steps"] += 1
        window["loss"] = window["loss"] + out["loss"]
        return state, out

    def log(info: StepInfo) -> None:
        out = sharding.to_host(info.out)
        mean_loss = float(window["loss"]) / window["steps"]
        tokens_per_s = window["steps"] * per_step * seq_len / (
            time.perf_counter() - window["start"])
        record = metrics.write(
            kind="train",
            phase=name,
            step=info.step,
            loss=mean_loss,  # mean over the steps since the previous record
            grad_norm=float(out["grad_norm"]),
            weight_norm=float(weight_norm(info.state.trainable)),
            lr=float(schedule(info.step - 1)),
            tokens_per_s=round(tokens_per_s, 1),
        )
        monitor.check(info.step, mean_loss, record["grad_norm"], record["weight_norm"])
        trainer.show(loss=record["loss"], tok_s=round(tokens_per_s))
        logging.info("%s step %d/%d  loss %.4f  grad_norm %.3f  lr %.2e  %.0f tokens/s",
                     name, info.step, steps, record["loss"], record["grad_norm"], record["lr"],
                     tokens_per_s)
        window.update(start=time.perf_counter(), steps=0, loss=0.0)

    trainer.add_hook(log, every=log_every)
    return trainer.run(state, step, start).trainable
