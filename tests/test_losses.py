"""RAG losses against transformers' RAG get_nll (RAG-token and RAG-sequence, with and without
label smoothing) and LSR against an independent NumPy implementation."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ffrag_jax.rag import losses

B, K, T, V, PAD = 3, 4, 7, 11, 0


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    seq_logits = rng.normal(0, 2, (B * K, T, V)).astype(np.float32)
    doc_scores = rng.normal(0, 1, (B, K)).astype(np.float32)
    target = rng.integers(1, V, (B, T))
    target[1, 5:] = PAD  # padded answers (never at the second position: HF adds the doc
    target[2, 4:] = PAD  # score there in RAG-sequence)
    return seq_logits, doc_scores, target


def _hf_stub(cls):
    config = types.SimpleNamespace(n_docs=K, bos_token_id=None, generator=types.SimpleNamespace(
        pad_token_id=PAD, bos_token_id=None))
    stub = types.SimpleNamespace(config=config)
    stub.marginalize = types.MethodType(cls.marginalize, stub) if hasattr(cls, "marginalize") \
        else None
    return stub


def _ours_aligned(seq_logits, target):
    """HF scores logits[t] against target[t + 1]; ours takes aligned pairs."""
    shifted = np.concatenate([target[:, 1:], np.full((B, 1), PAD)], axis=1)
    return jnp.asarray(seq_logits.reshape(B, K, T, V)), jnp.asarray(shifted), \
        jnp.asarray(shifted != PAD)


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_rag_token_and_sequence_match_transformers(epsilon):
    from transformers.models.rag.modeling_rag import (
        RagSequenceForGeneration,
        RagTokenForGeneration,
    )

    seq_logits, doc_scores, target = _inputs()
    args = (torch.tensor(seq_logits), torch.tensor(doc_scores), torch.tensor(target))
    ref_token = RagTokenForGeneration.get_nll(_hf_stub(RagTokenForGeneration), *args,
                                              epsilon=epsilon).numpy()
    ref_seq = RagSequenceForGeneration.get_nll(_hf_stub(RagSequenceForGeneration), *args,
                                               epsilon=epsilon).numpy()
    logits, targets, mask = _ours_aligned(seq_logits, target)
    ours_token = losses.rag_token_nll(logits, jnp.asarray(doc_scores), targets, mask,
                                      epsilon=epsilon)
    lp, sums = losses.answer_logprobs(logits, targets)
    ours_seq = losses.rag_sequence_nll(lp, jnp.asarray(doc_scores), mask, epsilon=epsilon,
                                       vocab_logprob_sums=sums, vocab_size=V)
    np.testing.assert_allclose(np.asarray(ours_token), ref_token, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ours_seq), ref_seq, rtol=1e-5)


def _lsr_numpy(r, lm, tau_r, tau_lm, direction):
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(r / tau_r), log_softmax(lm / tau_lm)
    if direction == "lm_to_retriever":
        return (np.exp(lq) * (lq - lp)).sum(-1)
    return (np.exp(lp) * (lp - lq)).sum(-1)


@pytest.mark.parametrize("direction", ["lm_to_retriever", "retriever_to_lm"])
@pytest.mark.parametrize("tau_r,tau_lm", [(1.0, 1.0), (0.1, 5.0)])
def test_lsr_matches_numpy_and_only_the_retriever_gets_gradients(direction, tau_r, tau_lm):
    rng = np.random.default_rng(1)
    r, lm = rng.normal(size=(5, 6)), rng.normal(-20, 4, (5, 6))
    ours = losses.lsr_loss(jnp.asarray(r), jnp.asarray(lm), tau_r=tau_r, tau_lm=tau_lm,
                           direction=direction)
    np.testing.assert_allclose(np.asarray(ours), _lsr_numpy(r, lm, tau_r, tau_lm, direction),
                               rtol=1e-5, atol=1e-6)
    g_r, g_lm = jax.grad(lambda a, b: losses.lsr_loss(
        a, b, tau_r=tau_r, tau_lm=tau_lm, direction=direction).sum(), (0, 1))(
        jnp.asarray(r, jnp.float32), jnp.asarray(lm, jnp.float32))
    assert np.abs(np.asarray(g_r)).max() > 0 and not np.asarray(g_lm).any()


def test_sequence_logprob_and_bad_direction():
    lp = jnp.asarray([[[-1.0, -2.0, -4.0]]])
    mask = jnp.asarray([[1, 1, 0]])
    assert float(losses.sequence_logprob(lp, mask)[0, 0]) == -3.0
    assert float(losses.sequence_logprob(lp, mask, length_normalize=True)[0, 0]) == -1.5
    with pytest.raises(ValueError, match="direction"):
        losses.lsr_loss(lp[0], lp[0], direction="both")
