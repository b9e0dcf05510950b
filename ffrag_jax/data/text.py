"""Tokenizers and fixed-shape token batches.

* :func:`train_bpe_tokenizer` trains a byte-level BPE with ``tokenizers`` and wraps it as a
  ``transformers`` fast tokenizer (so it saves next to an exported HF model).
* :func:`encode_pairs` turns (prompt, response) pairs into right-padded ``[N, T]`` arrays with a
  loss mask on the response, so every batch has one shape and the step compiles once.
* :func:`batch_at` returns the batch of a given step as a pure function of (seed, step), so a
  resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from absl import logging

from ffrag_jax.errors import UserError

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with <pad>=0, <s>=1, </s>=2.

    With special tokens (``tokenizer(text)``, what other libraries do) it puts ``<s>`` first,
    as the jobs do by hand (they always call it with ``add_special_tokens=False``), so an
    exported model scores and generates from the same ids as in training."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def encode_pairs(
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_len: int,
    *,
    response_only: bool = True,
) -> dict[str, np.ndarray]:
    """Right-padded arrays for ``<s> prompt response </s>``.

    Returns ``input_ids``, ``attention_mask``, ``loss_mask`` (all ``[N, max_len]`` int32) and
    ``prompt_len`` ``[N]`` (tokens before the response, BOS included). With ``response_only``
    the loss covers the response and EOS; otherwise every real token after BOS. A pair longer
    than ``max_len`` loses tokens from the start of its prompt, never from its response.
    """
    if tokenizer.pad_token_id is None:
        raise UserError("tokenizer has no pad token")
    n = len(prompts)
    ids = np.full((n, max_len), tokenizer.pad_token_id, np.int32)
    attention = np.zeros((n, max_len), np.int32)
    loss = np.zeros((n, max_len), np.int32)
    prompt_len = np.zeros((n,), np.int32)
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    truncated = 0
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        r = r + eos
        room = max_len - len(bos) - len(r)
        if room < 1:
            raise UserError(
                f"example {i}: response of {len(r)} tokens does not fit max_len={max_len}"
            )
        if len(p) > room:
            p, truncated = p[len(p) - room :], truncated + 1
        seq = bos + p + r
        ids[i, : len(seq)] = seq
        attention[i, : len(seq)] = 1
        start = len(bos) + len(p) if response_only else 1
        loss[i, start : len(seq)] = 1
        prompt_len[i] = len(bos) + len(p)
    if truncated:
        logging.warning("%d of %d examples were longer than %d tokens; their prompts were cut "
                        "from the left", truncated, n, max_len)
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss,
            "prompt_len": prompt_len}


def trim_padding(sets: Sequence[dict[str, np.ndarray]], max_len: int, multiple: int = 8,
                 width: int | None = None) -> list[dict[str, np.ndarray]]:
    """``sets`` of :func:`encode_pairs` arrays cut to one common width: ``width``, or the
    longest real sequence among them rounded up to ``multiple``, at most ``max_len`` (so
    padding columns that no example reaches cost no compute)."""
    if width is None:
        width = common_width([longest(s) for s in sets], max_len, multiple)
    return [{k: v[:, :width] if v.ndim == 2 else v for k, v in s.items()} for s in sets]


def longest(encoded: dict[str, np.ndarray]) -> int:
    """The longest real sequence (attention mask ones) of :func:`encode_pairs` arrays, 0 for
    none."""
    mask = encoded["attention_mask"]
    return int(mask.sum(1).max()) if len(mask) else 0


def common_width(longests: Sequence[int], max_len: int, multiple: int = 8) -> int:
    """The width :func:`trim_padding` cuts to, from the longest sequence of each set: what
    federated clients agree on without showing each other their data."""
    most = max((n for n in longests if n), default=multiple)
    return min(max_len, -(-most // multiple) * multiple)


def encode_prompts(tokenizer, prompts: Sequence[str], max_len: int) -> dict[str, np.ndarray]:
    """Right-padded ``<s> prompt`` for generation: ``input_ids`` ``[N, max_len]`` and
    ``prompt_len`` ``[N]``. Prompts longer than ``max_len`` lose tokens from the start."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return pad_prompts(tokenizer, [bos + p[max(len(p) - (max_len - len(bos)), 0):] for p in
                                   tokenizer(list(prompts), add_special_tokens=False)["input_ids"]],
                       max_len)


def pad_prompts(tokenizer, prompt_ids: Sequence[Sequence[int]], max_len: int
                ) -> dict[str, np.ndarray]:
    """Token lists (each at most ``max_len``, BOS included) as :func:`encode_prompts`'
    arrays."""
    ids = np.full((len(prompt_ids), max_len), tokenizer.pad_token_id, np.int32)
    prompt_len = np.zeros((len(prompt_ids),), np.int32)
    for i, seq in enumerate(prompt_ids):
        ids[i, : len(seq)] = seq
        prompt_len[i] = len(seq)
    return {"input_ids": ids, "prompt_len": prompt_len}


def batch_at(
    data: dict[str, np.ndarray], step: int, batch_size: int, num_micro: int, seed: int
) -> dict[str, np.ndarray]:
    """The training batch of ``step``: leaves ``[num_micro, batch_size, T]``.

    Examples are visited in a fresh permutation per epoch (seeded by ``seed`` and the epoch),
    so the batch is a pure function of ``step``.
    """
    n = len(data["input_ids"])
    per_step = batch_size * num_micro
    positions = step * per_step + np.arange(per_step)
    epochs, offsets = np.divmod(positions, n)
    index = np.empty(per_step, np.int64)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(n)
        sel = epochs == epoch
        index[sel] = perm[offsets[sel]]
    keys = ("input_ids", "attention_mask", "loss_mask")
    return {k: data[k][index].reshape(num_micro, batch_size, -1) for k in keys}
