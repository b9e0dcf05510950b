"""The arrays of one end-to-end RAG step, built on the host from questions and their
retrieved passages (:func:`question_batch`), and the input checks that keep them well formed.

Generator sequences are laid out so that every answer starts at the same position: the prompt
(:mod:`ffrag_jax.rag.prompts`) is left-padded to ``P`` tokens (a passage too long for ``P``
loses tokens from its end, never the question or the answer), then the answer and ``</s>``
right-padded to ``T``. Positions count real tokens only, so the left padding changes nothing.
The answer's log-probs are then ``[B, K, T]`` for every ``k`` alike, which RAG-token needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from absl import logging

from ffrag_jax.errors import UserError
from ffrag_jax.rag.prompts import fit_prompt
from ffrag_jax.retrieval.encoder import tokenize as encode_tokenize


def question_batch(tokenizer, query_tokenizer, questions: Sequence[dict],
                   passages: Sequence[Sequence[str]], *, prompt_len: int, answer_len: int,
                   query_len: int) -> dict[str, np.ndarray]:
    """The question-side arrays of one step for ``questions`` (``{question, answer}``) and
    their ``K`` passages each: the generator arrays (:func:`encode_generator_batch`) and the
    query encoder's ``query_ids``/``query_mask`` ``[B, query_len]``. The caller adds the
    passage side (``passage_emb``, or ``passage_ids``/``passage_mask``)."""
    texts = [q["question"] for q in questions]
    gen = encode_generator_batch(tokenizer, texts, [q["answer"] for q in questions], passages,
                                 prompt_len, answer_len)
    q_tok = encode_tokenize(query_tokenizer, texts, query_len)
    return {**gen, "query_ids": q_tok["input_ids"], "query_mask": q_tok["attention_mask"]}


def encode_generator_batch(tokenizer, questions: Sequence[str], answers: Sequence[str],
                           passages: Sequence[Sequence[str]], prompt_len: int,
                           answer_len: int) -> dict[str, np.ndarray]:
    """Generator arrays for ``B`` questions x ``K`` passages: ``gen_ids``/``gen_mask``
    ``[B, K, P + T]`` and the answer ``targets``/``answer_mask`` ``[B, T]`` (see the module
    docstring). An answer longer than ``T - 1`` tokens (EOS included) is an error; a question
    with fewer than ``K`` passages must be padded by the caller (:func:`pad_passages`)."""
    if len({len(p) for p in passages}) != 1:
        raise UserError("every question needs the same number of passages (pad_passages)")
    pad = tokenizer.pad_token_id
    b, k = len(questions), len(passages[0])
    ids = np.full((b, k, prompt_len + answer_len), pad, np.int32)
    mask = np.zeros_like(ids)
    targets = np.full((b, answer_len), pad, np.int32)
    answer_mask = np.zeros((b, answer_len), np.int32)
    for i, (question, answer) in enumerate(zip(questions, answers, strict=True)):
        ans = answer_ids(tokenizer, answer)
        if len(ans) > answer_len:
            raise UserError(f"answer {i} has {len(ans)} tokens (EOS included); the budget is "
                            f"{answer_len} (rag answer_len)")
        targets[i, : len(ans)] = ans
        answer_mask[i, : len(ans)] = 1
        for j, passage in enumerate(passages[i]):
            prompt = fit_prompt(tokenizer, passage, question, prompt_len,
                                where=f"question {i}").ids
            ids[i, j, prompt_len - len(prompt) : prompt_len] = prompt
            mask[i, j, prompt_len - len(prompt) : prompt_len] = 1
            ids[i, j, prompt_len : prompt_len + len(ans)] = ans
            mask[i, j, prompt_len : prompt_len + len(ans)] = 1
    return {"gen_ids": ids, "gen_mask": mask, "targets": targets, "answer_mask": answer_mask}


def answer_ids(tokenizer, answer: str) -> list[int]:
    """The answer's target tokens: `` answer`` (as it follows ``Answer:``) and EOS."""
    return tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id]


def target_weights(tokenizer, answers: Sequence[str], answer_len: int, *, tag_weight: float,
                   example_weights: Sequence[float]) -> np.ndarray:
    """Per-token loss weights ``[B, answer_len]`` of the answers' targets (as
    :func:`answer_ids`, EOS included; 0 on padding) for the knowledge-boundary dual task: 1 per
    token, ``tag_weight`` on the tokens of a trailing source tag ``[...]``, all times the
    answer's ``example_weights`` (e.g. more for abstentions)."""
    out = np.zeros((len(answers), answer_len), np.float32)
    for i, (answer, weight) in enumerate(zip(answers, example_weights, strict=True)):
        text = " " + answer.strip()
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        tag = text.rfind(" [") if text.endswith("]") else -1
        row = [tag_weight if tag >= 0 and end > tag else 1.0
               for _, end in enc["offset_mapping"]] + [1.0]  # + EOS
        if len(row) > answer_len:
            raise UserError(f"answer {i} has {len(row)} tokens (EOS included); the budget is "
                            f"{answer_len} (rag answer_len)")
        out[i, : len(row)] = np.asarray(row) * weight
    return out


def drop_long_answers(tokenizer, questions: Sequence[dict], answer_len: int, where: str
                      ) -> list[dict]:
    """``questions`` (dicts with an ``answer``) without those whose answer does not fit
    ``answer_len`` tokens, EOS included: an answer is never cut (its loss would teach a wrong
    answer), so they are left out of training, with a warning. None left is an error."""
    kept = [q for q in questions if len(answer_ids(tokenizer, q["answer"])) <= answer_len]
    if len(kept) < len(questions):
        logging.warning("%s: %d of %d questions have answers longer than rag.answer_len=%d "
                        "tokens (EOS included); they are left out of training", where,
                        len(questions) - len(kept), len(questions), answer_len)
    if questions and not kept:
        raise UserError(f"{where}: no answer fits rag.answer_len={answer_len} tokens")
    return kept


def pad_passages(passages: Sequence[Sequence[str]], k: int) -> tuple[list[list[str]],
                                                                      np.ndarray]:
    """Each question's passages cut or padded to ``k`` (padding: empty passages) and a
    ``[B, k]`` mask of the real ones (a question with no passage gets one empty passage,
    unmasked, so it is scored closed-book)."""
    out, valid = [], np.zeros((len(passages), k), bool)
    for i, ps in enumerate(passages):
        ps = list(ps)[:k]
        valid[i, : max(len(ps), 1)] = True
        out.append(ps + [""] * (k - len(ps)))
    return out, valid


