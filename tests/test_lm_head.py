"""The chunked LM head + cross-entropy equals the plain one (logits, then optax) in value and
gradients, for every way of chunking the tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ffrag_jax.models import lm_head


def _inputs(num=37, dim=24, vocab=50):
    keys = jax.random.split(jax.random.key(0), 4)
    hidden = jax.random.normal(keys[0], (num, dim))
    kernel = jax.random.normal(keys[1], (dim, vocab)) * 0.3
    targets = jax.random.randint(keys[2], (num,), 0, vocab)
    weights = (jax.random.uniform(keys[3], (num,)) > 0.3).astype(jnp.float32)
    return hidden, kernel, targets, weights


def _plain(hidden, kernel, targets, weights):
    nll = optax.softmax_cross_entropy_with_integer_labels(hidden @ kernel, targets)
    return jnp.sum(nll * weights)


# 37 tokens: one chunk (64), chunks of 8 with a padded last one, chunks of 1.
@pytest.mark.parametrize("chunk", [64, 8, 1])
def test_value_and_gradients_equal_the_plain_loss(chunk):
    args = _inputs()

    def ours(hidden, kernel, targets, weights):
        return lm_head.linear_cross_entropy(hidden, kernel, targets, weights, chunk)

    want, want_grads = jax.value_and_grad(_plain, (0, 1))(*args)
    got, got_grads = jax.jit(jax.value_and_grad(ours, (0, 1)))(*args)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-6)
    # a token of weight 0 gets no gradient
    assert np.all(np.asarray(got_grads[0])[np.asarray(args[3]) == 0] == 0)


def test_gradient_for_the_hidden_states_alone_and_a_scaled_cotangent():
    """Only the hidden states differentiated (a frozen head, as in LoRA training); the loss
    scaled afterwards, so the saved gradient must be scaled by the cotangent."""
    hidden, kernel, targets, weights = _inputs()

    def ours(h):
        return 3.0 * lm_head.linear_cross_entropy(h, kernel, targets, weights, 8)

    want = jax.grad(lambda h: 3.0 * _plain(h, kernel, targets, weights))(hidden)
    np.testing.assert_allclose(jax.jit(jax.grad(ours))(hidden), want, atol=1e-6)


def test_chunk_tokens_keeps_a_chunk_of_logits_near_4_mb():
    assert lm_head.chunk_tokens(4096) == 256  # 256 x 4096 x 4 B = 4 MB
    assert lm_head.chunk_tokens(128_256) == 64  # the floor: matmuls stay efficient
    assert lm_head.chunk_tokens(100) == 1024  # the cap


def test_causal_lm_loss_with_the_chunked_head_equals_the_plain_one():
    from ffrag_jax.models import llama, lora
    from ffrag_jax.training import train

    cfg = llama.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2,
                            num_heads=4, num_kv_heads=2)
    params = llama.init_params(jax.random.key(0), cfg)
    adapter = lora.init(jax.random.key(1), params, "q_proj,v_proj", 4, 8.0)
    adapter = jax.tree.map(lambda x: x + 0.01, adapter)
    ids = jax.random.randint(jax.random.key(2), (3, 21), 0, 300)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids).at[1, 15:].set(0),
             "loss_mask": jnp.ones_like(ids).at[:, :4].set(0)}

    def loss(adapter, chunked):
        total, count = train.causal_lm_loss(params, cfg, batch, adapter, chunked_head=chunked)
        return total / count

    want, want_grad = jax.value_and_grad(loss)(adapter, False)
    got, got_grad = jax.value_and_grad(loss)(adapter, True)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-6)
