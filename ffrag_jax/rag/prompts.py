"""The reader's prompt: one template and one rule for fitting it to a token budget, used by
training, evaluation and serving alike (and written into an exported system's
``system.json``, so other tools can prompt the reader as it was trained).

A prompt is ``<s>`` + :data:`TEMPLATE` tokenized as one string, then `` answer</s>``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ffrag_jax.errors import UserError

TEMPLATE = "Context: {context}\nQuestion: {question}\nAnswer:"


def prompt(example: dict) -> str:
    """The prompt text of ``{"context", "question"}`` (no budget: pretraining and LM jobs)."""
    return TEMPLATE.format(context=example["context"], question=example["question"])


def response(example: dict) -> str:
    """The target text after the prompt: `` answer``."""
    return " " + example["answer"]


# A question cut to make room for its passage keeps at least this many of its last tokens;
# below that the passage is cut instead (the question would no longer say what is asked).
MIN_QUESTION_TOKENS = 8


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A prompt fitted to a token budget: its ids, and the passage and question text that
    they hold (either may have been cut)."""

    ids: list[int]
    passage: str
    question: str


def fit_prompt(tokenizer, passage: str, question: str, budget: int, *,
               where: str = "question") -> Prompt:
    """``<s>`` + the prompt tokenized as one string (exactly as at generation time and in
    pretraining: tokenizing its pieces apart would change the tokens at their seams), at most
    ``budget`` tokens, for training, evaluation and serving alike.

    What does not fit is cut where it costs the least evidence: the question, from its start,
    when keeping its last :data:`MIN_QUESTION_TOKENS` tokens or more makes the prompt fit (a
    long question's filler goes, the passage the answer is read from stays whole); otherwise
    the passage, from its end, with the whole question (a long passage); and only when the
    question does not fit even alone, both."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []

    def encode(p: str, q: str) -> list[int]:
        full = TEMPLATE.format(context=p, question=q)
        return bos + tokenizer(full, add_special_tokens=False)["input_ids"]

    ids = encode(passage, question)
    if len(ids) <= budget:
        return Prompt(ids, passage, question)
    q_offsets = tokenizer(question, add_special_tokens=False,
                          return_offsets_mapping=True)["offset_mapping"]
    # Re-tokenizing can merge differently at a cut, so step one token at a time until it fits.
    for keep in range(len(q_offsets) - (len(ids) - budget), MIN_QUESTION_TOKENS - 1, -1):
        if keep <= 0 or keep >= len(q_offsets):
            continue
        cut = question[q_offsets[-keep][0]:]
        ids = encode(passage, cut)
        if len(ids) <= budget:
            return Prompt(ids, passage, cut)
    if len(encode("", question)) > budget and len(q_offsets) > MIN_QUESTION_TOKENS:
        question = question[q_offsets[-MIN_QUESTION_TOKENS][0]:]  # too long even alone
    ids = encode(passage, question)
    offsets = tokenizer(passage, add_special_tokens=False,
                        return_offsets_mapping=True)["offset_mapping"]
    for keep in range(len(offsets) - (len(ids) - budget), 0, -1):
        cut = passage[: offsets[keep - 1][1]]
        ids = encode(cut, question)
        if len(ids) <= budget:
            return Prompt(ids, cut, question)
    ids = encode("", question)
    if len(ids) > budget:
        raise UserError(f"{where} does not fit prompt_len={budget} even without a passage")
    return Prompt(ids, "", question)




def fit_prompts(tokenizer, questions: Sequence[str], contexts: Sequence[str],
                prompt_len: int) -> list[Prompt]:
    """The reader's prompts: one context (possibly empty: closed book) per question, each
    fitted to ``prompt_len`` tokens by :func:`fit_prompt`."""
    return [fit_prompt(tokenizer, c, q, prompt_len, where=f"question {i}")
            for i, (q, c) in enumerate(zip(questions, contexts, strict=True))]


def tagged_context(passages: Sequence[str], tags: Sequence[str | None] | None = None) -> str:
    """The reader's context of several passages, best first, each after its source tag
    (``"[case] ... [authority] ..."``; a None tag, or no ``tags``: the passage alone). A long
    context loses its last passages first when fitted (:func:`fit_prompt` cuts from the end)."""
    tags = [None] * len(passages) if tags is None else tags
    return " ".join(p if t is None else f"[{t}] {p}"
                    for p, t in zip(passages, tags, strict=True))


def contexts(ids, texts: Sequence[str], n: int, tags: Sequence[str | None] | None = None
             ) -> list[str]:
    """Per row of retrieved ids ``[N, K]`` (best first, -1: none): the :func:`tagged_context`
    of its first ``n`` passages (``tags[i]``: passage ``i``'s source tag); "" when none."""
    out = []
    for row in ids:
        chosen = [int(i) for i in row if i >= 0][:n]
        out.append(tagged_context([texts[i] for i in chosen],
                                  None if tags is None else [tags[i] for i in chosen]))
    return out
