"""Greedy decoding with fixed shapes (compiles once per prompt length and batch size).

Prompts are right-padded; token ``t`` of each sequence is written at ``prompt_len + t``. The
causal mask means later buffer positions never influence earlier logits, so no attention mask
is needed. Each new token costs one full forward over the buffer (no KV cache yet): fine for
the short answers of the demo and evaluation; cached decoding comes with the inference CLI.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ffrag_jax.models.llama import LlamaConfig, check_length, forward


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens"))
def greedy_generate(
    params: dict,
    cfg: LlamaConfig,
    input_ids: jax.Array,
    prompt_len: jax.Array,
    max_new_tokens: int,
    lora=None,
) -> jax.Array:
    """New tokens ``[B, max_new_tokens]`` for right-padded prompts ``input_ids`` ``[B, P]``
    whose real lengths are ``prompt_len`` ``[B]``. Tokens after an EOS are still produced;
    callers cut at the first EOS."""
    batch, length = input_ids.shape
    check_length(cfg, length + max_new_tokens)
    buffer = jnp.pad(input_ids, ((0, 0), (0, max_new_tokens)))
    rows = jnp.arange(batch)

    def body(t, carry):
        buffer, out = carry
        logits = forward(params, cfg, buffer, None, lora)
        pos = prompt_len + t - 1
        token = jnp.argmax(logits[rows, pos], axis=-1).astype(buffer.dtype)
        return buffer.at[rows, pos + 1].set(token), out.at[:, t].set(token)

    out = jnp.zeros((batch, max_new_tokens), input_ids.dtype)
    _, out = jax.lax.fori_loop(0, max_new_tokens, body, (buffer, out))
    return out
