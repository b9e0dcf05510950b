"""The training loop shared by every phase: resumable, logged, checkpointed.

:func:`train_phase` runs the jitted :func:`~ffrag_jax.train.train_step` from the latest
checkpoint of the phase (or from step 0) to ``steps``, logging loss, gradient norm, learning
rate and tokens/s to the metrics JSONL and a progress bar, and saving an orbax checkpoint every
``checkpoint_every`` steps and at the end. Batches come from
:func:`~ffrag_jax.text.batch_at`, a pure function of the step, so a resumed phase is the same
computation as an uninterrupted one.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
from absl import logging
from ml_collections import ConfigDict
from tqdm import tqdm

from ffrag_jax import checkpoint, health, sharding, text, train
from ffrag_jax.errors import UserError
from ffrag_jax.metrics import MetricsLog
from ffrag_jax.models.llama import LlamaConfig


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
):
    """Trains ``trainable`` for ``phase.steps`` steps; returns the trained tree. ``section``:
    the config section ``phase`` came from (default: ``name``), for messages."""
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
    mngr = checkpoint.manager(ckpt_dir / name)
    start, state = checkpoint.restore_latest(mngr, state)
    if start:
        logging.info("%s: resuming from the checkpoint at step %d", name, start)
    if start >= steps:
        mngr.close()
        return state.trainable

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
    bar = tqdm(range(start, steps), desc=name, initial=start, total=steps,
               disable=not sys.stderr.isatty(), dynamic_ncols=True)
    # Loss summed on device over the steps since the last log line (no host sync per step).
    window_start, window_steps, window_loss = time.perf_counter(), 0, 0.0
    for step in bar:
        batch = text.batch_at(data, step, phase.batch_size, phase.grad_accum, seed=phase.seed)
        batch = jax.device_put(batch, batch_sharding)
        state, step_metrics = step_fn(state, frozen, batch, jax.random.fold_in(rng, step))
        window_steps += 1
        window_loss = window_loss + step_metrics["loss"]
        done = step + 1
        if done % log_every == 0 or done == steps:
            step_metrics = jax.device_get(step_metrics)
            mean_loss = float(window_loss) / window_steps
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_steps * per_step * seq_len / elapsed
            record = metrics.write(
                kind="train",
                phase=name,
                step=done,
                loss=mean_loss,  # mean over the steps since the previous record
                grad_norm=float(step_metrics["grad_norm"]),
                weight_norm=float(weight_norm(state.trainable)),
                lr=float(schedule(step)),
                tokens_per_s=round(tokens_per_s, 1),
            )
            monitor.check(done, mean_loss, record["grad_norm"], record["weight_norm"])
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{tokens_per_s:,.0f}")
            logging.info("%s step %d/%d  loss %.4f  grad_norm %.3f  lr %.2e  %.0f tokens/s",
                         name, done, steps, record["loss"], record["grad_norm"], record["lr"],
                         tokens_per_s)
            window_start, window_steps, window_loss = time.perf_counter(), 0, 0.0
        if done % checkpoint_every == 0 or done == steps:
            checkpoint.save(mngr, done, state, metrics)
    mngr.wait_until_finished()
    mngr.close()
    return state.trainable
