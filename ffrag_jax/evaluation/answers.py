"""Answer evaluation: SQuAD-style normalised exact match and token F1 over generated answers."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import jax
import numpy as np
from tqdm import tqdm

from ffrag_jax.data.text import encode_prompts
from ffrag_jax.models.generate import generate
from ffrag_jax.models.llama import LlamaConfig

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the SQuAD v1.1 normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    answers = [answers] if isinstance(answers, str) else answers
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def f1(prediction: str, answers: str | Sequence[str]) -> float:
    """SQuAD v1.1 token F1: the harmonic mean of precision and recall of the normalised
    prediction's tokens against an answer's (multiset overlap), best over the answers."""
    answers = [answers] if isinstance(answers, str) else answers
    predicted = normalize_answer(prediction).split()
    best = 0.0
    for answer in answers:
        gold = normalize_answer(answer).split()
        common = sum((Counter(predicted) & Counter(gold)).values())
        if common:
            precision, recall = common / len(predicted), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


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
    rng: jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    length_bucket: int = 64,
    progress: bool = False,
) -> list[str]:
    """Answers (decoded, cut at the first EOS, stripped) for ``prompts``, in their order.

    Greedy unless ``temperature > 0`` (then sampled as in :func:`generate.generate`, batch
    ``i`` with ``fold_in(rng, i)``). Prompts run in order of length and each batch is cut to
    the next multiple of ``length_bucket`` above its longest prompt, so mixed-length sets (MMLU)
    compile a few shapes and do not pay for the longest prompt everywhere; the last batch is
    padded to ``batch_size``.
    """
    return generate_encoded(params, cfg, tokenizer, encode_prompts(tokenizer, prompts,
                                                                   max_prompt_len),
                            lora=lora, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            rng=rng, temperature=temperature, top_k=top_k, top_p=top_p,
                            length_bucket=length_bucket, progress=progress)


def generate_encoded(params: dict, cfg: LlamaConfig, tokenizer, enc: dict[str, np.ndarray], *,
                     lora=None, max_new_tokens: int = 8, batch_size: int = 64,
                     rng: jax.Array | None = None, temperature: float = 0.0, top_k: int = 0,
                     top_p: float = 1.0, length_bucket: int = 64, progress: bool = False,
                     abstain: tuple[int, float] | None = None) -> list[str]:
    """:func:`generate_answers` of prompts already tokenized: ``enc`` holds right-padded
    ``input_ids`` ``[N, max_prompt_len]`` and ``prompt_len`` ``[N]``
    (:func:`text.encode_prompts` or :func:`text.pad_prompts`); ``abstain``: the first token's
    answer-or-abstain rule of :func:`generate.generate`."""
    n, max_prompt_len = enc["input_ids"].shape
    order = np.argsort(enc["prompt_len"], kind="stable")
    answers: list[str] = [""] * n
    starts = range(0, n, batch_size)
    for b, start in enumerate(tqdm(starts, desc="generate", disable=not progress)):
        rows = order[start : start + batch_size]
        lens = enc["prompt_len"][rows]
        width = min(-(-int(lens.max()) // length_bucket) * length_bucket, max_prompt_len)
        ids = enc["input_ids"][rows, :width]
        real = len(ids)
        if real < batch_size:
            ids = np.concatenate([ids, np.repeat(ids[-1:], batch_size - real, 0)])
            lens = np.concatenate([lens, np.repeat(lens[-1:], batch_size - real, 0)])
        key = None if temperature <= 0 else jax.random.fold_in(rng, b)
        out = np.asarray(generate(params, cfg, ids, lens, max_new_tokens, lora, key,
                                  temperature=temperature, top_k=top_k, top_p=top_p,
                                  abstain=abstain))[:real]
        for i, row in zip(rows, out, strict=True):
            row = row.tolist()
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            answers[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return answers


def exact_match_score(predictions: Sequence[str], answers: Sequence[str | Sequence[str]]) -> float:
    """Mean exact match in [0, 1]."""
    if not predictions:
        return 0.0
    return float(np.mean([exact_match(p, a) for p, a in zip(predictions, answers, strict=True)]))


def f1_score(predictions: Sequence[str], answers: Sequence[str | Sequence[str]]) -> float:
    """Mean token F1 in [0, 1]."""
    if not predictions:
        return 0.0
    return float(np.mean([f1(p, a) for p, a in zip(predictions, answers, strict=True)]))


def answer_in_context_rate(contexts: Sequence[str], answers: Sequence[str | Sequence[str]]
                           ) -> float:
    """Share of questions whose context holds an answer (normalised substring): the ceiling a
    reader can reach with that context."""
    if not contexts:
        return 0.0
    hits = []
    for context, ans in zip(contexts, answers, strict=True):
        ans = [ans] if isinstance(ans, str) else ans
        hits.append(any(normalize_answer(a) in normalize_answer(context) for a in ans))
    return float(np.mean(hits))
