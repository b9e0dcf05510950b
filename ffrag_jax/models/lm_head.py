"""The LM head and its cross-entropy in one pass, token chunk by token chunk.

``logits = hidden @ kernel`` is the largest activation of a small-model training step: float32
``[B, T, vocab]`` (64 MB for 8 x 512 tokens and a 4k vocabulary; 2 GB per 4k-token sequence
with a 128k vocabulary). The plain loss writes it, reads it for the log-softmax, reads it again
in the backward to form ``softmax - onehot``, and writes that before the transposed matmul.

:func:`linear_cross_entropy` never holds more than one chunk of logits. Its forward computes,
per chunk of tokens, the logits, their log-sum-exp, the weighted NLL and, since the loss is a
scalar whose cotangent is just a number, the gradient as well: ``d_hidden = (softmax - onehot)
* weight @ kernel.T`` (and ``d_kernel = hidden.T @ (softmax - onehot) * weight`` only when the
kernel is trained). The backward scales those by the incoming cotangent. No logits are saved
and none are recomputed, so the FLOPs are the plain loss's. On the 2-core CPU, head + loss +
gradient for 1,024 tokens (D=256, 4k vocabulary) took 30 ms against the plain loss's 44 ms.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_CHUNK_LOGIT_BYTES = 4 << 20  # one chunk's float32 logits: within L3, never in main memory
_MIN_CHUNK, _MAX_CHUNK = 64, 1024


def chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk: a power of two whose float32 logits fill about 4 MB."""
    tokens = _MAX_CHUNK
    while tokens > _MIN_CHUNK and tokens * vocab_size * 4 > _CHUNK_LOGIT_BYTES:
        tokens //= 2
    return tokens


def linear_cross_entropy(hidden: jax.Array, kernel: jax.Array, targets: jax.Array,
                         weights: jax.Array, chunk: int | None = None) -> jax.Array:
    """``sum_n weights[n] * -log softmax(hidden[n] @ kernel)[targets[n]]``, a float32 scalar.

    ``hidden`` ``[N, D]`` and ``kernel`` ``[D, V]`` in the compute dtype (the logits are
    computed in it and cast to float32, as the model's own head does); ``targets`` int
    ``[N]``; ``weights`` float32 ``[N]`` (0 leaves a token out; it gets no gradient).
    ``chunk`` tokens per step, default :func:`chunk_tokens`; ``N`` need not divide by it.
    """
    chunk = min(chunk or chunk_tokens(kernel.shape[1]), hidden.shape[0])
    pad = -hidden.shape[0] % chunk
    if pad:  # padding rows have weight 0: no loss, no gradient
        hidden = jnp.pad(hidden, ((0, pad), (0, 0)))
        targets, weights = jnp.pad(targets, (0, pad)), jnp.pad(weights, (0, pad))
    return _linear_cross_entropy(hidden, kernel, targets, weights, chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _linear_cross_entropy(hidden, kernel, targets, weights, chunk):
    return _forward(hidden, kernel, targets, weights, chunk, False, False)[0]


def _forward(hidden, kernel, targets, weights, chunk, want_d_hidden, want_d_kernel):
    """Loss, and (``d_hidden`` ``[N, D]`` or None, ``d_kernel`` ``[D, V]`` or None)."""
    num, dim = hidden.shape
    vocab = kernel.shape[1]

    def one_chunk(d_kernel, xs):
        h, t, w = xs
        logits = jnp.dot(h, kernel, preferred_element_type=jnp.float32)
        row_max = jnp.max(logits, axis=-1, keepdims=True)
        exp = jnp.exp(logits - row_max)
        row_sum = jnp.sum(exp, axis=-1, keepdims=True)
        target_logit = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
        nll = (row_max[:, 0] + jnp.log(row_sum[:, 0]) - target_logit) * w
        d_h = None
        if want_d_hidden or want_d_kernel:
            d_logits = exp / row_sum - jax.nn.one_hot(t, vocab, dtype=jnp.float32)
            d_logits = (d_logits * w[:, None]).astype(kernel.dtype)
            if want_d_hidden:
                # contract with the kernel's vocab axis in place (no transposed copy), the
                # form autodiff gives the transpose of ``h @ kernel``
                d_h = jax.lax.dot_general(d_logits, kernel, (((1,), (1,)), ((), ())),
                                          preferred_element_type=jnp.float32)
                d_h = d_h.astype(hidden.dtype)
            if want_d_kernel:
                d_kernel = d_kernel + jax.lax.dot_general(
                    h, d_logits, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return d_kernel, (jnp.sum(nll), d_h)

    xs = (hidden.reshape(-1, chunk, dim), targets.reshape(-1, chunk),
          weights.astype(jnp.float32).reshape(-1, chunk))
    d_kernel0 = jnp.zeros(kernel.shape, jnp.float32) if want_d_kernel else None
    d_kernel, (nll, d_hidden) = jax.lax.scan(one_chunk, d_kernel0, xs)
    if d_hidden is not None:
        d_hidden = d_hidden.reshape(num, dim)
    if d_kernel is not None:
        d_kernel = d_kernel.astype(kernel.dtype)
    return jnp.sum(nll), (d_hidden, d_kernel)


def _fwd(hidden, kernel, targets, weights, chunk):
    return _forward(hidden.value, kernel.value, targets.value, weights.value, chunk,
                    hidden.perturbed, kernel.perturbed)


def _bwd(chunk, grads, cotangent):
    del chunk
    d_hidden, d_kernel = grads
    scale = lambda g: None if g is None else (g * cotangent).astype(g.dtype)  # noqa: E731
    return scale(d_hidden), scale(d_kernel), None, None


_linear_cross_entropy.defvjp(_fwd, _bwd, symbolic_zeros=True)
