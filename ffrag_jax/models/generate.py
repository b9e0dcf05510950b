"""Decoding with fixed shapes (compiles once per prompt length, batch size and settings).

Prompts are right-padded; token ``t`` of each sequence goes to position ``prompt_len + t``.
Decoding keeps a key/value cache (:func:`ffrag_jax.models.llama.forward_cached`): one prefill
pass over the padded prompts, then one single-token pass per new token. A prompt's padding
slots are overwritten by its own generated tokens before any query can see them, so no
padding mask is needed.

Sampling follows ``transformers``' ``generate(do_sample=True)``: temperature, then top-k, then
top-p (nucleus), then a categorical draw; :func:`filter_logits` is tested against the
``transformers`` logits warpers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ffrag_jax.models.llama import LlamaConfig, check_length, forward_cached, init_cache


def filter_logits(logits: jax.Array, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
    """Logits ``[..., V]`` divided by ``temperature`` with the tokens outside the top-k and
    outside the top-p nucleus set to -inf (``top_k=0``/``top_p=1`` disable those filters).

    As in ``transformers``: top-k keeps ties with the k-th value; top-p drops the tokens whose
    cumulative probability in ascending order is ``<= 1 - top_p`` and always keeps the most
    likely token.
    """
    logits = logits.astype(jnp.float32) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(logits, axis=-1)  # ascending
        ascending = jnp.take_along_axis(logits, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
        drop_sorted = (cumulative <= 1.0 - top_p).at[..., -1].set(False)
        # Back to vocabulary order: the inverse permutation of ``order``.
        drop = jnp.take_along_axis(drop_sorted, jnp.argsort(order, axis=-1), axis=-1)
        logits = jnp.where(drop, -jnp.inf, logits)
    return logits


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_k",
                                             "top_p", "abstain"))
def generate(
    params: dict,
    cfg: LlamaConfig,
    input_ids: jax.Array,
    prompt_len: jax.Array,
    max_new_tokens: int,
    lora=None,
    rng: jax.Array | None = None,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    abstain: tuple[int, float] | None = None,
) -> jax.Array:
    """New tokens ``[B, max_new_tokens]`` for right-padded prompts ``input_ids`` ``[B, P]``
    whose real lengths are ``prompt_len`` ``[B]``.

    ``temperature == 0`` is greedy (``rng`` unused); otherwise tokens are sampled with
    :func:`filter_logits` and ``rng`` (a key; step ``t`` uses ``fold_in(rng, t)``). Tokens
    after an EOS are still produced; callers cut at the first EOS.

    ``abstain = (token, threshold)``: the first token decides between answering and abstaining
    (a knowledge boundary's one-token abstention): it is ``token`` when that token's
    probability is at least ``threshold``, else the pick among the other tokens. Plain greedy
    decoding would compare the abstention with the likeliest *first token* of an answer, and
    abstain whenever the answers' probability is spread over several first tokens, however
    unlikely the abstention itself.
    """
    if temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs an rng key")
    batch, length = input_ids.shape
    check_length(cfg, length + max_new_tokens)
    rows = jnp.arange(batch)

    def pick(logits, t):
        if temperature > 0:
            logits = filter_logits(logits, temperature, top_k, top_p)
            return jax.random.categorical(jax.random.fold_in(rng, t), logits, axis=-1)
        return jnp.argmax(logits, axis=-1)

    # Prefill: the whole padded prompt in one pass fills slots [0, P) of the cache.
    cache = init_cache(cfg, batch, length + max_new_tokens)
    positions = jnp.broadcast_to(jnp.arange(length)[None], (batch, length))
    logits, cache = forward_cached(params, cfg, input_ids, positions, cache, lora)
    last = logits[rows, prompt_len - 1]
    if abstain is None:
        first = pick(last, 0)
    else:
        token, threshold = abstain
        p_abstain = jax.nn.softmax(last.astype(jnp.float32), axis=-1)[:, token]
        first = jnp.where(p_abstain >= threshold, token,
                          pick(last.at[:, token].set(-jnp.inf), 0))
    first = first.astype(input_ids.dtype)

    def body(t, carry):
        # Decode: the token generated at step t - 1 sits at position prompt_len + t - 1.
        cache, token, out = carry
        pos = (prompt_len + t - 1)[:, None]
        logits, cache = forward_cached(params, cfg, token[:, None], pos, cache, lora)
        token = pick(logits[:, 0], t).astype(input_ids.dtype)
        return cache, token, out.at[:, t].set(token)

    out = jnp.zeros((batch, max_new_tokens), input_ids.dtype).at[:, 0].set(first)
    _, _, out = jax.lax.fori_loop(1, max_new_tokens, body, (cache, first, out))
    return out


def greedy_generate(params: dict, cfg: LlamaConfig, input_ids: jax.Array, prompt_len: jax.Array,
                    max_new_tokens: int, lora=None) -> jax.Array:
    """:func:`generate` with greedy decoding."""
    return generate(params, cfg, input_ids, prompt_len, max_new_tokens, lora)
