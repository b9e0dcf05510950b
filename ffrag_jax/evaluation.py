"""Answer evaluation: SQuAD-style normalised exact match over generated answers."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import numpy as np

from ffrag_jax.generate import greedy_generate
from ffrag_jax.models.llama import LlamaConfig
from ffrag_jax.text import encode_prompts

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the SQuAD v1.1 normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    answers = [answers] if isinstance(answers, str) else answers
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def generate_answers(
    params: dict,
    cfg: LlamaConfig,
    tokenizer,
    prompts: Sequence[str],
    *,
    lora=None,
    max_prompt_len: int,
    max_new_tokens: int = 8,
    batch_size: int = 64,
) -> list[str]:
    """Greedy answers (decoded, cut at the first EOS, stripped) for ``prompts``.

    The last batch is padded to ``batch_size`` so every call has one shape.
    """
    enc = encode_prompts(tokenizer, prompts, max_prompt_len)
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        ids = enc["input_ids"][start : start + batch_size]
        lens = enc["prompt_len"][start : start + batch_size]
        real = len(ids)
        if real < batch_size:
            ids = np.concatenate([ids, np.repeat(ids[-1:], batch_size - real, 0)])
            lens = np.concatenate([lens, np.repeat(lens[-1:], batch_size - real, 0)])
        out = np.asarray(greedy_generate(params, cfg, ids, lens, max_new_tokens, lora))[:real]
        for row in out:
            row = row.tolist()
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers


def exact_match_score(predictions: Sequence[str], answers: Sequence[str | Sequence[str]]) -> float:
    """Mean exact match in [0, 1]."""
    if not predictions:
        return 0.0
    return float(np.mean([exact_match(p, a) for p, a in zip(predictions, answers, strict=True)]))
