"""Llama decoder in Flax, numerically the same model as Hugging Face's ``LlamaForCausalLM``.

RMSNorm, rotary embeddings (default, ``linear`` and Llama-3 ``llama3`` scaling), grouped-query
attention, SwiGLU MLP, tied or untied embeddings, causal + padding mask, float32 or bfloat16
params and compute.

The layers are one ``nn.scan`` over a stacked layer axis, so every per-layer parameter has a
leading ``[L]`` axis and compile time does not grow with depth. Parameter names follow Hugging
Face's module names (``self_attn/q_proj/kernel``), which keeps the HF key-mapping table and LoRA
target names obvious.

LoRA never lives in ``params``: it is passed as the separate ``lora`` variable collection with
the same paths (``layers/self_attn/q_proj/{a,b}``), and each projection adds
``scale * dropout(x) @ a @ b`` when its entry is present. See :mod:`ffrag_jax.models.lora`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ffrag_jax.errors import UserError
from ffrag_jax.models.attention import causal_attention
from ffrag_jax.models.layers import LoRALinear
from ffrag_jax.models.partitioning import shard_batch
from ffrag_jax.models.rope import apply_rope, rope_cos_sin

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
LINEAR_MODULES = ATTENTION_PROJECTIONS + MLP_PROJECTIONS

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# Activation rematerialisation per decoder layer. "dots" keeps the projection matmul outputs and
# recomputes attention scores and elementwise ops in the backward: on CPU it is faster than
# storing the [B, heads, T, T] attention probabilities of every layer ("none"); "full" keeps
# only the layer inputs (least memory).
_cp = jax.checkpoint_policies
REMAT_POLICIES = {
    "none": None,
    "full": _cp.nothing_saveable,
    # Projection outputs and the LoRA dropout masks (random bits are dear to recompute).
    "dots": _cp.save_from_both_policies(
        _cp.dots_with_no_batch_dims_saveable, _cp.save_only_these_names("lora_dropout_mask")
    ),
    # "dots" plus the attention output and log-sum-exp of the custom-VJP attention.
    "dots_attn": _cp.save_from_both_policies(
        _cp.dots_with_no_batch_dims_saveable,
        _cp.save_only_these_names("attn_out", "attn_lse", "lora_dropout_mask"),
    ),
}
# "auto": the custom-VJP attention on CPU, jax.nn.dot_product_attention (cuDNN where it can)
# elsewhere. "xla" forces jax.nn.dot_product_attention, "ffrag" the custom one.
ATTENTION_IMPLS = ("auto", "ffrag", "xla")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama model. Frozen and hashable so it can be a static jit argument.

    ``rope_scaling`` is stored as a sorted tuple of ``(key, value)`` pairs (hashable); read it
    with :meth:`rope_scaling_dict`. ``dtype`` is the compute dtype, ``param_dtype`` the storage
    dtype of the parameters.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0: hidden_size // num_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"  # see REMAT_POLICIES
    attention: str = "auto"  # see ATTENTION_IMPLS
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        if self.num_heads % self.num_kv_heads:
            raise UserError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.attention not in ATTENTION_IMPLS:
            raise UserError(
                f"attention={self.attention!r}; choose one of {', '.join(ATTENTION_IMPLS)}"
            )
        if self.remat not in REMAT_POLICIES:
            raise UserError(f"remat={self.remat!r}; choose one of {', '.join(REMAT_POLICIES)}")
        rope_type = self.rope_type
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UserError(
                f"rope_scaling type {rope_type!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_ROPE_TYPES)}"
            )

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling or ())

    @property
    def rope_type(self) -> str:
        scaling = self.rope_scaling_dict
        return scaling.get("rope_type", scaling.get("type", "default"))

    def replace(self, **changes) -> LlamaConfig:
        return dataclasses.replace(self, **changes)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        # As in HF: normalise in float32, cast back, then multiply by the weight.
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * normed.astype(self.dtype)


class _Block(nn.Module):
    """Shared fields of the modules that hold LoRA-able projections."""

    cfg: LlamaConfig
    lora_scale: float = 1.0
    lora_dropout: float = 0.0
    deterministic: bool = True

    def linear(self, features: int, name: str, use_bias: bool) -> LoRALinear:
        return LoRALinear(
            features,
            use_bias=use_bias,
            dtype=jnp.dtype(self.cfg.dtype),
            param_dtype=jnp.dtype(self.cfg.param_dtype),
            lora_scale=self.lora_scale,
            lora_dropout=self.lora_dropout,
            deterministic=self.deterministic,
            name=name,
        )

    def norm(self, name: str) -> RMSNorm:
        dtype, param_dtype = jnp.dtype(self.cfg.dtype), jnp.dtype(self.cfg.param_dtype)
        return RMSNorm(self.cfg.rms_norm_eps, dtype, param_dtype, name=name)


class Attention(_Block):
    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None):
        """x ``[B, T, D]``, cos/sin ``[B, T, head_dim]``, key-padding mask bool ``[B, T]``.

        With ``cache = (keys, values, slots)`` (keys/values ``[B, S, kv_heads, head_dim]``,
        slots int ``[B, T]``) the new keys and values are written at ``slots`` and the queries
        attend to the whole cache; ``mask`` is then ``[B, T, S]`` (which slots each query
        sees). Returns ``(out, (keys, values))``, or ``(out, None)`` without a cache.
        """
        cfg = self.cfg
        batch, length, _ = x.shape
        bias = cfg.attention_bias
        q = self.linear(cfg.num_heads * cfg.head_dim, "q_proj", bias)(x)
        k = self.linear(cfg.num_kv_heads * cfg.head_dim, "k_proj", bias)(x)
        v = self.linear(cfg.num_kv_heads * cfg.head_dim, "v_proj", bias)(x)
        q = apply_rope(q.reshape(batch, length, cfg.num_heads, cfg.head_dim), cos, sin)
        k = apply_rope(k.reshape(batch, length, cfg.num_kv_heads, cfg.head_dim), cos, sin)
        v = v.reshape(batch, length, cfg.num_kv_heads, cfg.head_dim)
        if cache is not None:
            keys, values, slots = cache
            rows = jnp.arange(batch)[:, None]
            keys = keys.at[rows, slots].set(k.astype(keys.dtype))
            values = values.at[rows, slots].set(v.astype(values.dtype))
            out = jax.nn.dot_product_attention(q, keys.astype(q.dtype), values.astype(q.dtype),
                                               mask=mask[:, None], scale=cfg.head_dim**-0.5)
            out = out.reshape(batch, length, cfg.num_heads * cfg.head_dim)
            return self.linear(cfg.hidden_size, "o_proj", bias)(out), (keys, values)
        impl = cfg.attention
        if impl == "auto":
            impl = "ffrag" if jax.default_backend() == "cpu" else "xla"
        if impl == "ffrag":
            out = causal_attention(q, k, v, mask, cfg.head_dim**-0.5)
        else:  # GQA is native (num_heads a multiple of num_kv_heads); on GPU it may use cuDNN
            out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :],
                                               scale=cfg.head_dim**-0.5, is_causal=True)
        out = out.reshape(batch, length, cfg.num_heads * cfg.head_dim)
        return self.linear(cfg.hidden_size, "o_proj", bias)(out), None


class MLP(_Block):
    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        gate = self.linear(cfg.intermediate_size, "gate_proj", cfg.mlp_bias)(x)
        up = self.linear(cfg.intermediate_size, "up_proj", cfg.mlp_bias)(x)
        return self.linear(cfg.hidden_size, "down_proj", cfg.mlp_bias)(nn.silu(gate) * up)


class DecoderLayer(_Block):
    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None, slots=None):
        """One layer; ``cache`` is this layer's ``(keys, values)`` (see :class:`Attention`) and
        comes back updated as the scan's per-layer output."""
        x = shard_batch(x)  # the layer's input is what remat keeps: one batch slice per device
        kw = dict(
            cfg=self.cfg,
            lora_scale=self.lora_scale,
            lora_dropout=self.lora_dropout,
            deterministic=self.deterministic,
        )
        layer_cache = None if cache is None else (*cache, slots)
        attended, cache = Attention(**kw, name="self_attn")(
            self.norm("input_layernorm")(x), cos, sin, mask, layer_cache)
        x = x + attended
        x = x + MLP(**kw, name="mlp")(self.norm("post_attention_layernorm")(x))
        return x, cache


class Llama(_Block):
    """The causal LM. ``__call__`` returns float32 logits ``[B, T, vocab]``."""

    @nn.compact
    def __call__(self, input_ids, attention_mask, positions, cache=None, return_hidden=False):
        """Without ``cache``: logits. With ``cache`` (keys/values ``[L, B, S, kv_heads, D]``,
        see :func:`forward_cached`): ``(logits, cache)``, the tokens written at ``positions``
        and ``attention_mask`` the ``[B, T, S]`` slot visibility. ``return_hidden``: the final
        normed hidden states ``[B, T, D]`` (compute dtype) instead of the logits."""
        cfg = self.cfg
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            embedding_init=nn.initializers.normal(0.02),
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
            name="embed_tokens",
        )
        x = shard_batch(embed(input_ids))
        cos, sin = rope_cos_sin(cfg, positions)
        # Key-padding mask only, [B, S]: causality is applied inside the attention, cheaper than
        # materialising a [B, 1, T, T] mask.
        mask = attention_mask.astype(bool)

        layer_cls = DecoderLayer
        if cfg.remat != "none":
            layer_cls = nn.remat(DecoderLayer, prevent_cse=False, policy=REMAT_POLICIES[cfg.remat])
        # The cache, if any, is scanned over (one layer's slice each) and stacked back.
        in_axes = (nn.broadcast,) * 3 + (() if cache is None else (0, nn.broadcast))
        layers = nn.scan(
            layer_cls,
            variable_axes={"params": 0, "lora": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=in_axes,
            length=cfg.num_layers,
        )(
            cfg=cfg,
            lora_scale=self.lora_scale,
            lora_dropout=self.lora_dropout,
            deterministic=self.deterministic,
            name="layers",
        )
        extra = () if cache is None else (cache, positions)
        x, cache = layers(x, cos, sin, mask, *extra)
        x = self.norm("norm")(x)
        if return_hidden:
            return x
        if cfg.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = LoRALinear(
                cfg.vocab_size,
                dtype=jnp.dtype(cfg.dtype),
                param_dtype=jnp.dtype(cfg.param_dtype),
                name="lm_head",
            )(x)
        logits = logits.astype(jnp.float32)
        return logits if cache is None else (logits, cache)


def check_length(cfg: LlamaConfig, length: int) -> None:
    if length > cfg.max_position_embeddings:
        raise UserError(
            f"sequence length {length} is longer than the model's max_position_embeddings "
            f"{cfg.max_position_embeddings}"
        )


def init_params(rng: jax.Array, cfg: LlamaConfig) -> dict:
    """Random parameters, initialised as HF does (normal(0.02) weights, unit norms)."""
    dummy = jnp.zeros((1, 1), jnp.int32)
    return Llama(cfg).init(rng, dummy, jnp.ones_like(dummy), dummy)["params"]


def forward(
    params: dict,
    cfg: LlamaConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    lora=None,
    *,
    positions: jax.Array | None = None,
    dropout_rng: jax.Array | None = None,
    return_hidden: bool = False,
) -> jax.Array:
    """Logits ``[B, T, vocab]`` (float32) for ``input_ids`` ``[B, T]``.

    ``attention_mask`` ``[B, T]`` is 1 for real tokens, 0 for padding (keys that are masked
    out). ``positions`` ``[B, T]`` defaults to ``arange(T)`` as in transformers when no
    position ids are given. ``lora`` is a :class:`ffrag_jax.models.lora.LoRA` or None; LoRA
    dropout is
    active only when ``dropout_rng`` is given. ``return_hidden``: the final normed hidden states
    ``[B, T, D]`` in the compute dtype instead (``hidden @ lm_head_kernel(params, cfg)`` are
    the logits).
    """
    batch, length = input_ids.shape
    check_length(cfg, length)
    if attention_mask is None:
        attention_mask = jnp.ones((batch, length), jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(length)[None], (batch, length))
    variables = {"params": params}
    lora_scale, lora_dropout = 1.0, 0.0
    if lora is not None:
        variables["lora"] = lora.weights
        lora_scale, lora_dropout = lora.scale, lora.dropout
    model = Llama(
        cfg,
        lora_scale=lora_scale,
        lora_dropout=lora_dropout,
        deterministic=dropout_rng is None,
    )
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    return model.apply(variables, input_ids, attention_mask, positions,
                       return_hidden=return_hidden, rngs=rngs)


def lm_head_kernel(params: dict, cfg: LlamaConfig) -> jax.Array:
    """The LM head as a ``[D, vocab]`` matrix in the compute dtype (the transposed
    embedding when they are tied)."""
    if cfg.tie_word_embeddings:
        kernel = params["embed_tokens"]["embedding"].T
    else:
        kernel = params["lm_head"]["kernel"]
    return kernel.astype(jnp.dtype(cfg.dtype))


def init_cache(cfg: LlamaConfig, batch: int, length: int) -> tuple[jax.Array, jax.Array]:
    """An empty key/value cache ``(keys, values)``, each ``[layers, B, length, kv_heads,
    head_dim]`` in the compute dtype."""
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    zeros = jnp.zeros(shape, jnp.dtype(cfg.dtype))
    return zeros, zeros


def forward_cached(
    params: dict,
    cfg: LlamaConfig,
    input_ids: jax.Array,
    positions: jax.Array,
    cache: tuple[jax.Array, jax.Array],
    lora=None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Logits ``[B, T, vocab]`` of ``input_ids`` ``[B, T]`` at ``positions`` ``[B, T]`` with
    their keys and values written into ``cache`` at those slots (slot = position), and the
    updated cache.

    A query at position ``p`` sees the slots ``<= p``: this is the causal mask of
    :func:`forward` as long as every slot below ``p`` holds the token at that position, which
    is what prefill-then-decode of right-padded prompts gives (a prompt's padding slots are
    overwritten by its generated tokens before any query can see them).
    """
    slots = jnp.arange(cache[0].shape[2])
    visible = slots[None, None, :] <= positions[:, :, None]
    variables = {"params": params}
    lora_scale = 1.0
    if lora is not None:
        variables["lora"] = lora.weights
        lora_scale = lora.scale
    model = Llama(cfg, lora_scale=lora_scale)
    return model.apply(variables, input_ids, visible, positions, cache)
