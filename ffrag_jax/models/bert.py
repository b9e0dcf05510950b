"""The BERT-family sentence encoder in Flax (MiniLM / BGE / E5): word + position + token-type
embeddings with LayerNorm, post-LN transformer layers (bidirectional attention, GELU MLP) as
one ``nn.scan`` with stacked ``[L]`` params, then the folder's pooling (mean over real tokens
or CLS) and optional L2 normalisation. The projections are :class:`LoRALinear`, so
``ffrag_jax.models.lora.init(rng, params, ["query", "value"], ...)`` adapts them.
Reading and writing sentence-transformers folders is :mod:`ffrag_jax.retrieval.encoder`.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from ffrag_jax.errors import UserError
from ffrag_jax.models.attention import attention
from ffrag_jax.models.layers import LoRALinear

ATTENTION_PROJECTIONS = ("query", "key", "value", "attention_output")
MLP_PROJECTIONS = ("intermediate", "output")

ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # HF "gelu" is the erf form
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Static shape and behaviour of the encoder (hashable: a jit static argument)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pooling: str = "mean"  # mean | cls
    normalize: bool = True
    max_seq_length: int = 256  # sentence-transformers truncation
    attention: str = "auto"  # as LlamaConfig.attention: ffrag (CPU default) | xla
    dtype: str = "float32"
    param_dtype: str = "float32"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def embedding_dim(self) -> int:
        return self.hidden_size


class AdaptedModule(nn.Module):
    """A module of the encoder family whose projections are ``LoRALinear`` (the encoder's
    layers, the reranker's head): the LoRA settings and the one way to make a projection."""

    cfg: EncoderConfig
    lora_scale: float = 1.0
    lora_dropout: float = 0.0
    deterministic: bool = True

    def linear(self, features: int, name: str) -> LoRALinear:
        return LoRALinear(features, use_bias=True, dtype=jnp.dtype(self.cfg.dtype),
                          param_dtype=jnp.dtype(self.cfg.param_dtype),
                          lora_scale=self.lora_scale, lora_dropout=self.lora_dropout,
                          deterministic=self.deterministic, name=name)


class _Layer(AdaptedModule):

    def norm(self, name: str) -> nn.LayerNorm:
        return nn.LayerNorm(self.cfg.layer_norm_eps, dtype=jnp.dtype(self.cfg.dtype),
                            param_dtype=jnp.dtype(self.cfg.param_dtype), name=name)

    @nn.compact
    def __call__(self, x, mask):
        """x ``[B, T, D]``; mask bool ``[B, T]`` (False: padding key)."""
        cfg = self.cfg
        batch, length, _ = x.shape
        heads = lambda t: t.reshape(batch, length, cfg.num_heads, cfg.head_dim)
        q = heads(self.linear(cfg.hidden_size, "query")(x))
        k = heads(self.linear(cfg.hidden_size, "key")(x))
        v = heads(self.linear(cfg.hidden_size, "value")(x))
        impl = cfg.attention
        if impl == "auto":
            impl = "ffrag" if jax.default_backend() == "cpu" else "xla"
        if impl == "ffrag":  # blocked, in-cache (see models/attention.py): ~2x on CPU
            context = attention(q, k, v, mask, cfg.head_dim**-0.5, causal=False)
        else:
            context = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :],
                                                   scale=cfg.head_dim**-0.5)
        context = context.reshape(batch, length, -1)
        x = self.norm("attention_norm")(x + self.linear(cfg.hidden_size, "attention_output")(
            context))
        hidden = ACTIVATIONS[cfg.hidden_act](self.linear(cfg.intermediate_size,
                                                          "intermediate")(x))
        x = self.norm("output_norm")(x + self.linear(cfg.hidden_size, "output")(hidden))
        return x, None


class Embeddings(nn.Module):
    """Word + position + token-type embeddings (type 0 everywhere unless ``token_type_ids``:
    a cross-encoder's query 0, passage 1), then LayerNorm."""

    cfg: EncoderConfig

    @nn.compact
    def __call__(self, input_ids, token_type_ids=None):
        cfg = self.cfg
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        embed = lambda n, name: nn.Embed(n, cfg.hidden_size, dtype=dtype,
                                         param_dtype=param_dtype, name=name)
        positions = jnp.arange(input_ids.shape[1])[None]
        x = (embed(cfg.vocab_size, "word_embeddings")(input_ids)
             + embed(cfg.max_position_embeddings, "position_embeddings")(positions)
             + embed(cfg.type_vocab_size, "token_type_embeddings")(
                 jnp.zeros_like(input_ids) if token_type_ids is None else token_type_ids))
        return nn.LayerNorm(cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype,
                            name="norm")(x)


class Encoder(nn.Module):
    """Token states ``[B, T, D]`` of a BERT-family encoder."""

    cfg: EncoderConfig
    lora_scale: float = 1.0
    lora_dropout: float = 0.0
    deterministic: bool = True

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None):
        cfg = self.cfg
        x = Embeddings(cfg, name="embeddings")(input_ids, token_type_ids)
        layers = nn.scan(_Layer, variable_axes={"params": 0, "lora": 0},
                         split_rngs={"params": True, "dropout": True},
                         in_axes=(nn.broadcast,), length=cfg.num_layers)(
            cfg=cfg, lora_scale=self.lora_scale, lora_dropout=self.lora_dropout,
            deterministic=self.deterministic, name="layers")
        x, _ = layers(x, attention_mask.astype(bool))
        return x


def pool(cfg: EncoderConfig, states: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Sentence embeddings ``[B, D]`` (float32) from token states ``[B, T, D]``: the mean over
    real tokens or the CLS state, L2-normalised when ``cfg.normalize`` (as sentence-transformers'
    Pooling and Normalize modules)."""
    states = states.astype(jnp.float32)
    if cfg.pooling == "cls":
        out = states[:, 0]
    else:
        mask = attention_mask.astype(jnp.float32)[..., None]
        out = (states * mask).sum(1) / jnp.maximum(mask.sum(1), 1e-9)
    if cfg.normalize:
        out = out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
    return out


def encode(params: dict, cfg: EncoderConfig, input_ids: jax.Array, attention_mask: jax.Array,
           lora=None, *, dropout_rng: jax.Array | None = None) -> jax.Array:
    """Sentence embeddings ``[B, D]`` (float32) of right-padded ``input_ids`` ``[B, T]`` with
    ``attention_mask`` ``[B, T]`` (1 = real token). ``lora`` is an ``ffrag_jax.models.lora.LoRA`` on
    the encoder's projections or None; its dropout is active only with ``dropout_rng``."""
    if input_ids.shape[1] > cfg.max_position_embeddings:
        raise UserError(f"sequence length {input_ids.shape[1]} is longer than the encoder's "
                        f"max_position_embeddings {cfg.max_position_embeddings}")
    states = apply_adapted(Encoder, params, cfg, lora, dropout_rng, input_ids, attention_mask)
    return pool(cfg, states, attention_mask)


def apply_adapted(module: type[AdaptedModule] | type[nn.Module], params: dict,
                  cfg: EncoderConfig, lora, dropout_rng: jax.Array | None, *inputs):
    """``module(cfg)`` applied to ``inputs`` with weights ``params`` and the adapter ``lora``
    (its scale and dropout; None: none), dropout active only with ``dropout_rng``."""
    variables = {"params": params}
    scale, dropout = 1.0, 0.0
    if lora is not None:
        variables["lora"] = lora.weights
        scale, dropout = lora.scale, lora.dropout
    model = module(cfg, lora_scale=scale, lora_dropout=dropout,
                   deterministic=dropout_rng is None)
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    return model.apply(variables, *inputs, rngs=rngs)


def init_params(rng: jax.Array, cfg: EncoderConfig) -> dict:
    dummy = jnp.zeros((1, 1), jnp.int32)
    return Encoder(cfg).init(rng, dummy, jnp.ones_like(dummy))["params"]
