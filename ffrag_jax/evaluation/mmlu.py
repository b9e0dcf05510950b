"""The MMLU harness of the FLoRA / FF-RAG reference (``mmlu_test_1444.jsonl``).

Each item is an Alpaca record: ``instruction``, ``input`` (``"Qusetion: ... Options: A. ...,
B. ..."``), ``output`` (``"The answer is: C. Hurler syndrome"``) and ``class`` (the MMLU
subject). As in the reference evaluator:

* the prompt is the Alpaca template with the response started as ``"The answer is: "``;
* 32 new tokens are sampled (temperature 0.2, top-p 0.6, top-k 30), stopping at EOS;
* an answer is right when the response contains the target letter followed by a dot
  (``"C."``) or the target option's text (``"Hurler syndrome"``);
* the score is the macro average of per-subject accuracies.

The data file is not shipped (its repository has no licence); pass its path with
``--config.eval.mmlu_path`` (``../shared/data/mmlu-1444/mmlu_test_1444.jsonl`` here).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import jax

from ffrag_jax import files
from ffrag_jax.data import render
from ffrag_jax.errors import UserError
from ffrag_jax.evaluation import generate_answers
from ffrag_jax.models.llama import LlamaConfig

RESPONSE_PREFIX = "The answer is: "
SAMPLING = dict(temperature=0.2, top_p=0.6, top_k=30)
MAX_NEW_TOKENS = 32
_FIELDS = ("instruction", "input", "output", "class")


def load(path: str | Path, limit: int | None = None) -> list[dict]:
    """The items of an MMLU file: one JSON array (the reference's ``.jsonl`` is one) or JSON
    lines. ``limit`` keeps the first items of each subject (a quick look on a CPU)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"MMLU file not found: {path}")
    raw = files.read_text(path, "MMLU file")
    try:
        items = (json.loads(raw) if raw.lstrip().startswith("[")
                 else [json.loads(line) for line in raw.splitlines() if line.strip()])
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
    for i, item in enumerate(items):
        missing = [f for f in _FIELDS if f not in item]
        if missing:
            raise UserError(f"{path}: item {i} lacks {missing}")
        target(item["output"], where=f"{path}: item {i}")
    if limit is not None:
        seen: dict[str, int] = defaultdict(int)
        kept = []
        for item in items:
            if seen[item["class"]] < limit:
                seen[item["class"]] += 1
                kept.append(item)
        items = kept
    return items


def target(output: str, where: str = "MMLU item") -> tuple[str, str]:
    """``(letter, option text)`` of ``"The answer is: C. Hurler syndrome"``."""
    body = output.replace(RESPONSE_PREFIX, "")
    if ". " not in body:
        raise UserError(f"{where}: output {output!r} is not 'The answer is: <letter>. <text>'")
    letter, text = body.split(". ", 1)
    # The reference keeps only the text up to a second ". " (``split('. ')[1]``).
    return letter, text.split(". ")[0]


def prompt(item: dict) -> str:
    """The Alpaca prompt with the response already begun, as the reference builds it."""
    return render(item)[0] + RESPONSE_PREFIX


def is_correct(response: str, output: str) -> bool:
    """The reference's match: ``"<letter>."`` or the option text anywhere in the response
    (the response includes the ``"The answer is: "`` prefix)."""
    letter, text = target(output)
    response = response.split("### Response:")[-1]  # the reference splits the decoded text
    return f"{letter}." in response or text in response


def score(items: Sequence[dict], responses: Sequence[str]) -> dict:
    """``{"macro": mean over subjects, "micro": mean over items, "per_subject": {...},
    "count": n}`` for responses (generated text after the prompt) aligned with ``items``."""
    right: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for item, response in zip(items, responses, strict=True):
        subject = item["class"]
        total[subject] += 1
        right[subject] += is_correct(RESPONSE_PREFIX + response, item["output"])
    per_subject = {s: right[s] / total[s] for s in sorted(total)}
    return {
        "macro": sum(per_subject.values()) / max(len(per_subject), 1),
        "micro": sum(right.values()) / max(sum(total.values()), 1),
        "per_subject": per_subject,
        "count": sum(total.values()),
    }


def evaluate(params: dict, cfg: LlamaConfig, tokenizer, items: Sequence[dict], rng: jax.Array,
             *, lora=None, batch_size: int = 16, max_prompt_len: int | None = None,
             progress: bool = False) -> dict:
    """:func:`score` of the model's sampled answers to ``items``.

    Prompts longer than ``max_prompt_len`` (default: what the model's positions allow with the
    32 new tokens) lose tokens from the start.
    """
    limit = cfg.max_position_embeddings - MAX_NEW_TOKENS
    max_prompt_len = min(max_prompt_len or limit, limit)
    responses = generate_answers(
        params, cfg, tokenizer, [prompt(item) for item in items], lora=lora,
        max_prompt_len=max_prompt_len, max_new_tokens=MAX_NEW_TOKENS, batch_size=batch_size,
        rng=rng, progress=progress, **SAMPLING)
    return score(items, responses)
