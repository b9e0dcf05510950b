"""Causal grouped-query attention with a hand-written backward (for XLA on CPU).

XLA's generic attention keeps the float32 ``[B, heads, T, S]`` probabilities for the backward
and transposes them there. On CPU that costs about 3x torch's fused kernel, although the FLOPs
are small (see bench/results). :func:`causal_attention` uses flash attention's algebra instead:
the forward saves only the output and the log-sum-exp ``[B, heads, T]``. The backward
recomputes the probabilities in one pass, ``P = exp(S - lse)``, and forms
``dS = P * (dP - rowsum(dO * O))``. The query heads of one KV group are folded into the query
axis (``[B, K, G*T, H]``), so GQA needs no repeated K/V.

It still materialises one ``[B, K, G*T, S]`` block per call, so it is not memory-efficient for
long contexts. On GPUs ``jax.nn.dot_product_attention`` (cuDNN) is the better choice; see
``LlamaConfig.attention``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

_MASKED = -1e30  # finite, so fully masked (padding) rows give a uniform softmax, not NaN


def _scores(q, k, kv_mask, scale, length):
    """Masked float32 scores ``[B, K, G*T, S]`` (q ``[B, K, G*T, H]``, k ``[B, K, S, H]``)."""
    s = jnp.einsum("bkqh,bksh->bkqs", q, k, preferred_element_type=jnp.float32) * scale
    query_pos = jnp.arange(q.shape[2]) % length
    causal = jnp.arange(k.shape[2])[None, :] <= query_pos[:, None]
    return jnp.where(causal[None, None] & kv_mask[:, None, None, :], s, _MASKED)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attend(q, k, v, kv_mask, scale, length):
    return _attend_fwd(q, k, v, kv_mask, scale, length)[0]


def _attend_fwd(q, k, v, kv_mask, scale, length):
    s = _scores(q, k, kv_mask, scale, length)
    row_max = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - row_max)
    row_sum = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bkqs,bksh->bkqh", p.astype(v.dtype), v) / row_sum.astype(v.dtype)
    # Named so a remat policy can keep them ("dots_attn") instead of redoing this forward.
    out = checkpoint_name(out, "attn_out")
    lse = checkpoint_name((row_max + jnp.log(row_sum))[..., 0], "attn_lse")
    return out, (q, k, v, kv_mask, out, lse)


def _attend_bwd(scale, length, residuals, d_out):
    q, k, v, kv_mask, out, lse = residuals
    p = jnp.exp(_scores(q, k, kv_mask, scale, length) - lse[..., None])
    dv = jnp.einsum("bkqs,bkqh->bksh", p.astype(d_out.dtype), d_out)
    dp = jnp.einsum("bkqh,bksh->bkqs", d_out, v, preferred_element_type=jnp.float32)
    row_dot = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1, keepdims=True)
    ds = (p * (dp - row_dot) * scale).astype(q.dtype)
    dq = jnp.einsum("bkqs,bksh->bkqh", ds, k)
    dk = jnp.einsum("bkqs,bkqh->bksh", ds, q)
    return dq, dk, dv, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def causal_attention(q, k, v, kv_mask, scale: float):
    """Causal attention. ``q`` ``[B, T, N, H]``, ``k``/``v`` ``[B, T, K, H]`` (``N`` a multiple
    of ``K``), ``kv_mask`` bool ``[B, T]`` (False: padding key). Returns ``[B, T, N, H]``."""
    batch, length, heads, dim = q.shape
    groups = k.shape[2]
    per_group = heads // groups
    qg = q.reshape(batch, length, groups, per_group, dim).transpose(0, 2, 3, 1, 4)
    qg = qg.reshape(batch, groups, per_group * length, dim)
    out = _attend(qg, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), kv_mask, scale, length)
    out = out.reshape(batch, groups, per_group, length, dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, length, heads, dim)
