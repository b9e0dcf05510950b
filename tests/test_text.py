"""Tokenizer training, fixed-shape encoding with loss masks, deterministic batches."""

import numpy as np
import pytest

from ffrag_jax.data import synthetic, text
from ffrag_jax.errors import UserError
from ffrag_jax.rag import prompts


@pytest.fixture(scope="module")
def tokenizer():
    examples = synthetic.make_examples("geography", 300, seed=0)
    return text.train_bpe_tokenizer(
        [prompts.prompt(e) + prompts.response(e) for e in examples], 400)


def test_synthetic_data_is_deterministic_and_answerable():
    a = synthetic.make_examples("clinic", 50, seed=3)
    assert a == synthetic.make_examples("clinic", 50, seed=3)
    assert a != synthetic.make_examples("clinic", 50, seed=4)
    for e in a:
        assert e["answer"] in e["context"]
        assert len(e["context"].split(". ")) >= 3  # answer sentence + 2 distractors


@pytest.mark.parametrize("domain", sorted(synthetic.DOMAINS))
def test_synthetic_knowledge_is_consistent(domain):
    """One fact per (entity, relation): no two facts answer a question differently, and every
    question's answer is in its own fact."""
    facts, questions = synthetic.make_knowledge(domain, 200, seed=1)
    relations = synthetic.DOMAINS[domain]["relations"]
    assert len(facts) == len(questions) == 200 * len(relations) == len(set(facts))
    assert (facts, questions) == synthetic.make_knowledge(domain, 200, seed=1)
    for q in questions:
        assert q["answer"] in facts[q["fact"]]
    templates = {t for r in relations.values() for t in r[2]}
    wordings = {t for ts in synthetic.USER_QUESTIONS[domain].values() for t in ts}
    assert wordings and not wordings & templates
    with pytest.raises(ValueError, match="unknown synthetic domain"):
        synthetic.make_knowledge("physics", 3, 0)


def test_encode_pairs_masks_and_truncation(tokenizer):
    enc = text.encode_pairs(tokenizer, ["Question: hi?\nAnswer:", "x " * 200], [" Yes", " No"],
                            32)
    ids, att, loss = enc["input_ids"], enc["attention_mask"], enc["loss_mask"]
    assert ids.shape == att.shape == loss.shape == (2, 32)
    assert ids[0, 0] == tokenizer.bos_token_id
    n = att[0].sum()
    assert ids[0, n - 1] == tokenizer.eos_token_id and ids[0, n] == tokenizer.pad_token_id
    scored = tokenizer.decode(ids[0][loss[0].astype(bool)])
    assert scored == " Yes</s>"
    # the over-long prompt lost its start, the response survived
    assert att[1].all()
    assert tokenizer.decode(ids[1][loss[1].astype(bool)]) == " No</s>"


def test_response_longer_than_budget_is_an_error(tokenizer):
    with pytest.raises(UserError, match="does not fit max_len=8"):
        text.encode_pairs(tokenizer, ["q"], [" a b c d e f g h i j k"], 8)


def test_batch_at_is_a_pure_function_of_step(tokenizer):
    data = {k: np.arange(10 * 4).reshape(10, 4) for k in ("input_ids", "attention_mask",
                                                         "loss_mask")}
    b1 = text.batch_at(data, 3, batch_size=2, num_micro=3, seed=0)
    assert b1["input_ids"].shape == (3, 2, 4)
    np.testing.assert_array_equal(b1["input_ids"], text.batch_at(data, 3, 2, 3, 0)["input_ids"])
    # one epoch visits every example exactly once
    rows = np.concatenate([text.batch_at(data, s, 5, 1, 0)["input_ids"][0][:, 0] for s in (0, 1)])
    assert sorted(rows // 4) == list(range(10))
