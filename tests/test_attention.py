"""The blocked custom-VJP attention equals jax.nn.dot_product_attention in values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ffrag_jax.models import attention, llama


# block 64: one block (T=20); block 8: blocks of 8, 8 and 4 query positions; block 1: one each.
# pairs: (batch row, KV head) pairs per loop step; None picks it (default_pairs_per_step; here:
# all, no loop); 1: a plain unbatched loop; 2 of 6 pairs: three steps; 4 of 6 (or of 12): a full
# step and a remainder; 6 of 6: one step.
@pytest.mark.parametrize("heads, kv_heads, block, causal, pairs", [
    (8, 2, 64, True, None), (4, 4, 64, True, None), (8, 2, 8, True, None), (4, 2, 1, True, None),
    (8, 2, 8, True, 1), (8, 2, 8, True, 2), (4, 4, 8, True, 4), (8, 2, 8, True, 4),
    (8, 2, 8, True, 6), (4, 4, 64, False, None), (4, 4, 64, False, 1),
    (8, 2, 8, False, 4)])  # not causal: the encoder's attention
def test_values_and_gradients_match_xla_attention(heads, kv_heads, block, causal, pairs):
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (3, 20, heads, 16))
    k = jax.random.normal(keys[1], (3, 20, kv_heads, 16))
    v = jax.random.normal(keys[2], (3, 20, kv_heads, 16))
    kv_mask = jnp.ones((3, 20), bool).at[1, 13:].set(False).at[2, 4:].set(False)
    weights = jax.random.normal(keys[3], (3, 20, heads, 16))
    valid = kv_mask[:, :, None, None]  # rows of padded queries are not compared

    def reference(q, k, v):
        out = jax.nn.dot_product_attention(q, k, v, mask=kv_mask[:, None, None, :], scale=0.25,
                                           is_causal=causal)
        return jnp.sum(jnp.where(valid, out * weights, 0.0))

    def ours(q, k, v):
        out = attention.attention(q, k, v, kv_mask, 0.25, block=block, causal=causal,
                                  pairs_per_step=pairs)
        return jnp.sum(jnp.where(valid, out * weights, 0.0))

    np.testing.assert_allclose(jax.jit(ours)(q, k, v), reference(q, k, v), rtol=1e-5)
    for got, want in zip(jax.jit(jax.grad(ours, (0, 1, 2)))(q, k, v),
                         jax.jit(jax.grad(reference, (0, 1, 2)))(q, k, v), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_model_logits_do_not_depend_on_the_attention_choice():
    cfg = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                            num_heads=4, num_kv_heads=2)
    params = llama.init_params(jax.random.key(0), cfg)
    ids = jax.random.randint(jax.random.key(1), (2, 12), 0, 64)
    mask = jnp.ones_like(ids).at[1, 7:].set(0)
    a = llama.forward(params, cfg.replace(attention="ffrag"), ids, mask)
    b = llama.forward(params, cfg.replace(attention="xla"), ids, mask)
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)
    np.testing.assert_allclose(a[1, :7], b[1, :7], atol=1e-5)


def test_default_pairs_per_step_keeps_score_blocks_in_cache():
    # 32 pairs of 64 x 128 f32 score blocks (32 KB each, 1 MB together): one step, no loop
    assert attention.default_pairs_per_step(32, 64, 128) == 32
    # 64 x 512 (128 KB each): 2 per step fill the 256 KB step budget
    assert attention.default_pairs_per_step(32, 64, 512) == 2
    # 512 KB per pair, or a block larger than the budget: still one pair per step
    assert attention.default_pairs_per_step(32, 256, 512) == 1
    assert attention.default_pairs_per_step(32, 64, 8192) == 1
    # never more than there are
    assert attention.default_pairs_per_step(3, 64, 2048) == 1
    assert attention.default_pairs_per_step(3, 64, 128) == 3
