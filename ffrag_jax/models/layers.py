"""Layers shared by the models: the frozen linear projection with an optional LoRA term, used
by the Llama decoder and the BERT-family encoder alike."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name


class LoRALinear(nn.Module):
    """``y = x @ kernel (+ bias) + lora_scale * dropout(x) @ a @ b``.

    The LoRA term is present only when the ``lora`` collection holds ``a`` ``[in, r]`` and
    ``b`` ``[r, out]`` for this module; the frozen ``kernel`` is ``[in, out]``.
    """

    features: int
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora_scale: float = 1.0
    lora_dropout: float = 0.0
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features), self.param_dtype
        )
        x = x.astype(self.dtype)
        y = x @ kernel.astype(self.dtype)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        if self.has_variable("lora", "a"):
            a = self.get_variable("lora", "a").astype(self.dtype)
            b = self.get_variable("lora", "b").astype(self.dtype)
            y = y + ((self.dropout(x) @ a) @ b) * jnp.asarray(self.lora_scale, self.dtype)
        return y

    def dropout(self, x: jax.Array) -> jax.Array:
        """Inverted dropout on the LoRA input, as ``nn.Dropout``. The keep mask is named so the
        remat policies save it: recomputing threefry bits in the backward cost a few % of a step."""
        if self.deterministic or self.lora_dropout == 0.0:
            return x
        keep_prob = 1.0 - self.lora_dropout
        keep = jax.random.bernoulli(self.make_rng("dropout"), keep_prob, x.shape)
        keep = checkpoint_name(keep, "lora_dropout_mask")
        return jnp.where(keep, x / jnp.asarray(keep_prob, x.dtype), jnp.zeros((), x.dtype))
