"""Causal grouped-query attention, cache-blocked, with a hand-written backward (XLA on CPU).

On a CPU the cost of attention is memory traffic, not FLOPs: XLA's generic attention writes
the float32 ``[B, heads, T, S]`` scores and probabilities to main memory and reads them back in
several passes (and once more, transposed, in the backward). On the 2-core benchmark machine an
elementwise pass over an in-cache block is ~15x faster than over a 64 MB array. So
:func:`causal_attention` works like flash attention, one small block at a time:

* a loop (``lax.map``) over (batch row, KV head) pairs, a few pairs per step (vmapped, so
  the step's matmuls are batched; see :func:`default_pairs_per_step`), the query heads of a group
  folded into the query rows (row ``r`` is position ``r // G``), so GQA needs no repeated K/V;
* queries in blocks of ``block`` positions; block ``j`` sees only keys ``[0, (j+1)*block)``,
  so the masked upper triangle is mostly never computed; each ``[block*G, keys]`` score block
  stays in L2 while it is masked, exponentiated, summed and multiplied with V;
* the forward saves only the output and the log-sum-exp; the backward recomputes each block's
  probabilities ``P = exp(S - lse)`` and forms ``dS = P * (dP - rowsum(dO * O))``.

On GPUs ``jax.nn.dot_product_attention`` (cuDNN) is the better choice; see
``LlamaConfig.attention``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

_MASKED = -1e30  # finite, so fully masked (padding) rows give a uniform softmax, not NaN
DEFAULT_BLOCK = 32  # query positions per block (32 * G score rows)
# How many (batch row, KV head) pairs one step of the loop over them takes (vmapped, so its
# matmuls are batched): as many as keep a step's f32 score blocks within half of a core's L2.
# When the score blocks of *all* pairs fit in _LOOP_FREE_BYTES there is no loop at all: at short
# lengths the loop's per-step cost is larger than what the cache saves (2-core CPU, B=8, 4 KV
# heads, T=128: 4.4-4.9 ms per layer forward + backward without the loop, 8-8.5 ms with one
# pair per step; T=512: 56-58 ms with 2 pairs per step, 64-68 ms with 1, 110 ms with all 32).
_STEP_SCORE_BYTES = 256 << 10
_LOOP_FREE_BYTES = 1 << 20


def _query_blocks(length: int, block: int) -> list[tuple[int, int]]:
    return [(start, min(start + block, length)) for start in range(0, length, block)]


def _key_end(start_end: tuple[int, int], length: int, causal: bool) -> int:
    """Keys a query block sees: its causal prefix, or all of them."""
    return start_end[1] if causal else length


def _block_scores(q_rows, k, kv_mask, scale, start, end, groups, causal):
    """Masked f32 scores ``[(end-start)*G, keys]`` of query positions ``[start, end)`` (rows
    ``q_rows`` ``[(end-start)*G, H]``) against the keys they can see: ``k[:end]`` when
    ``causal``, else all of ``k``."""
    keys = _key_end((start, end), k.shape[0], causal)
    s = jnp.dot(q_rows, k[:keys].T, preferred_element_type=jnp.float32) * scale
    visible = kv_mask[None, :keys]
    if causal:
        query_pos = start + jnp.arange((end - start) * groups) // groups
        visible = visible & (jnp.arange(keys)[None, :] <= query_pos[:, None])
    return jnp.where(visible, s, _MASKED)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _attend(q, k, v, kv_mask, scale, groups, block, causal, pairs_per_step):
    return _attend_fwd(q, k, v, kv_mask, scale, groups, block, causal, pairs_per_step)[0]


def _attend_fwd(q, k, v, kv_mask, scale, groups, block, causal, pairs_per_step):
    """q ``[BK, T*G, H]``, k/v ``[BK, T, H]``, kv_mask ``[BK, T]`` -> out ``[BK, T*G, H]``."""
    length = k.shape[1]

    def one_head(args):
        q1, k1, v1, mask1 = args
        outs, lses = [], []
        for start, end in _query_blocks(length, block):
            keys = _key_end((start, end), length, causal)
            s = _block_scores(q1[start * groups:end * groups], k1, mask1, scale, start, end,
                              groups, causal)
            row_max = jnp.max(s, axis=-1, keepdims=True)
            p = jnp.exp(s - row_max)
            row_sum = jnp.sum(p, axis=-1, keepdims=True)
            outs.append(jnp.dot(p.astype(v1.dtype), v1[:keys]) / row_sum.astype(v1.dtype))
            lses.append((row_max + jnp.log(row_sum))[:, 0])
        return jnp.concatenate(outs), jnp.concatenate(lses)

    out, lse = jax.lax.map(one_head, (q, k, v, kv_mask), batch_size=_batch_size(pairs_per_step))
    # Named so a remat policy can keep them ("dots_attn") instead of redoing this forward.
    out = checkpoint_name(out, "attn_out")
    lse = checkpoint_name(lse, "attn_lse")
    return out, (q, k, v, kv_mask, out, lse)


def _attend_bwd(scale, groups, block, causal, pairs_per_step, residuals, d_out):
    q, k, v, kv_mask, out, lse = residuals
    length = k.shape[1]

    def one_head(args):
        q1, k1, v1, mask1, out1, lse1, d_out1 = args
        dk = jnp.zeros(k1.shape, jnp.float32)
        dv = jnp.zeros(v1.shape, jnp.float32)
        row_dot = jnp.sum(d_out1.astype(jnp.float32) * out1.astype(jnp.float32), -1)
        dqs = []
        for start, end in _query_blocks(length, block):
            keys = _key_end((start, end), length, causal)
            rows = slice(start * groups, end * groups)
            q_rows, d_rows = q1[rows], d_out1[rows]
            s = _block_scores(q_rows, k1, mask1, scale, start, end, groups, causal)
            p = jnp.exp(s - lse1[rows][:, None])
            dv = dv.at[:keys].add(
                jnp.dot(p.T.astype(d_rows.dtype), d_rows, preferred_element_type=jnp.float32))
            dp = jnp.dot(d_rows, v1[:keys].T, preferred_element_type=jnp.float32)
            ds = (p * (dp - row_dot[rows][:, None]) * scale).astype(q1.dtype)
            dqs.append(jnp.dot(ds, k1[:keys]))
            dk = dk.at[:keys].add(jnp.dot(ds.T, q_rows, preferred_element_type=jnp.float32))
        return jnp.concatenate(dqs), dk.astype(k1.dtype), dv.astype(v1.dtype)

    dq, dk, dv = jax.lax.map(one_head, (q, k, v, kv_mask, out, lse, d_out),
                              batch_size=_batch_size(pairs_per_step))
    return dq, dk, dv, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def default_pairs_per_step(pairs: int, rows: int, keys: int) -> int:
    """(batch row, KV head) pairs per loop step, of ``pairs``, for score blocks of
    ``rows x keys`` float32: all of them when they fit in 1 MB, else as many as fit in 256 KB."""
    pair_bytes = rows * keys * 4
    if pairs * pair_bytes <= _LOOP_FREE_BYTES:
        return pairs
    return max(1, min(pairs, _STEP_SCORE_BYTES // pair_bytes))


def _batch_size(pairs_per_step: int) -> int | None:
    """``lax.map``'s ``batch_size``: None for one pair per step (a plain, unbatched loop)."""
    return pairs_per_step if pairs_per_step > 1 else None


def causal_attention(q, k, v, kv_mask, scale: float, block: int = DEFAULT_BLOCK,
                     pairs_per_step: int | None = None):
    """:func:`attention` with the causal mask (the Llama's)."""
    return attention(q, k, v, kv_mask, scale, block, causal=True, pairs_per_step=pairs_per_step)


def attention(q, k, v, kv_mask, scale: float, block: int = DEFAULT_BLOCK, *,
              causal: bool = True, pairs_per_step: int | None = None):
    """Blocked attention. ``q`` ``[B, T, N, H]``, ``k``/``v`` ``[B, T, K, H]`` (``N`` a
    multiple of ``K``), ``kv_mask`` bool ``[B, T]`` (False: padding key). Returns
    ``[B, T, N, H]``. ``causal=False`` lets every query see every real key (encoders).

    ``block`` (query positions per block) trades loop overhead against cache use, and
    ``pairs_per_step`` ((batch row, KV head) pairs per loop step, vmapped; None: the
    :func:`default_pairs_per_step` policy) loop steps against batched matmuls; neither changes the
    result beyond float rounding.
    """
    batch, length, heads, dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    # [B, T, K, G, H] -> [B*K, T*G, H]: row r of a (batch, kv head) is position r // G.
    q_rows = q.reshape(batch, length, kv_heads, groups, dim).transpose(0, 2, 1, 3, 4)
    q_rows = q_rows.reshape(batch * kv_heads, length * groups, dim)
    k_rows = k.transpose(0, 2, 1, 3).reshape(batch * kv_heads, length, dim)
    v_rows = v.transpose(0, 2, 1, 3).reshape(batch * kv_heads, length, dim)
    mask_rows = jnp.repeat(kv_mask, kv_heads, axis=0)
    block = min(block, length)
    if pairs_per_step is None:
        pairs_per_step = default_pairs_per_step(batch * kv_heads, block * groups, length)
    out = _attend(q_rows, k_rows, v_rows, mask_rows, scale, groups, block, causal,
                  pairs_per_step)
    out = out.reshape(batch, kv_heads, length, groups, dim).transpose(0, 2, 1, 3, 4)
    return out.reshape(batch, length, heads, dim)
