"""DPA-RAG's pre-aligned stage (LLM self-alignment), an option before RAG training: the
generator reads a question's ``K`` candidates, numbered and tagged, and learns to name the one
it answers right with (its own preference labels, :mod:`.preferences`), or ``none``. The
adapter it leaves is where the client's RAG training starts.

A prompt: ``Passages: (1) [case] ... (2) [authority] ...\\nQuestion: ...\\nHelpful
passage:``; the target `` 2`` (the first aligned candidate) or `` none``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import numpy as np

from ffrag_jax.data import text
from ffrag_jax.rag.prompts import tagged_context
from ffrag_jax.training import train

TEMPLATE = "Passages:{passages}\nQuestion: {question}\nHelpful passage:"


def examples(questions: Sequence[dict], ids: np.ndarray, texts: Sequence[str], tags,
             labels: np.ndarray) -> tuple[list[str], list[str]]:
    """``(prompts, responses)``: one per question, its candidates ``ids[i]`` (padding left
    out) numbered from 1, each after its source tag; the response the first aligned one."""
    prompts, responses = [], []
    for i, q in enumerate(questions):
        valid = [(k, int(pid)) for k, pid in enumerate(ids[i]) if pid >= 0]
        listed = "".join(
            f" ({n}) " + tagged_context([texts[pid]], None if tags is None else [tags[pid]])
            for n, (_, pid) in enumerate(valid, 1))
        prompts.append(TEMPLATE.format(passages=listed, question=q["question"]))
        aligned = [n for n, (k, _) in enumerate(valid, 1) if labels[i, k] > 0]
        responses.append(f" {aligned[0]}" if aligned else " none")
    return prompts, responses


@functools.partial(jax.jit, static_argnames=("cfg", "optimizer"), donate_argnums=(0,))
def _step(state, frozen, batch, rng, *, cfg, optimizer):
    return train.train_step(state, frozen, batch, rng, cfg=cfg, optimizer=optimizer,
                            use_dropout=False)


def train_adapter(gen_params: dict, gen_cfg, tokenizer, adapter, prompts: Sequence[str],
                  responses: Sequence[str], *, steps: int, batch_size: int, lr: float,
                  max_len: int, rngs, seed: Sequence[int]) -> tuple[object, list[dict]]:
    """``steps`` response-only LM steps of ``adapter`` on the examples (batches of
    ``batch_size`` drawn by ``seed``). Returns the adapter and every step's metrics."""
    enc = text.encode_pairs(tokenizer, prompts, responses, max_len, response_only=True)
    enc.pop("prompt_len")
    optimizer = train.make_optimizer(lr, steps, warmup_steps=0)
    state = train.init_train_state(adapter, optimizer)
    pick = np.random.default_rng(list(seed))
    n = len(prompts)
    out = []
    for step in range(steps):
        rows = pick.choice(n, batch_size, replace=n < batch_size)
        batch = {k: v[rows][None] for k, v in enc.items()}  # one micro-batch
        state, m = _step(state, gen_params, batch, rngs[step], cfg=gen_cfg,
                         optimizer=optimizer)
        out.append({k: float(v) for k, v in jax.device_get(m).items()})
    return state.trainable, out
