"""Payload compression of the adapters a round sends (``fl.payload``), as codec objects chosen
once (:func:`get`): what a client uploads and what it downloads is ``decode(encode(x))``, and
its size is :meth:`Codec.nbytes`.

* ``fp32``: the adapters as they are (4 bytes a value);
* ``fp16`` / ``bf16``: cast to half precision (2 bytes a value);
* ``int8``: blockwise absmax quantisation, as bitsandbytes' blockwise int8 (Dettmers et al.,
  2022): every ``block`` consecutive values of a leaf (flattened) share one float32 scale
  ``max |x| / 127`` and are sent as ``round(x / scale)`` in int8 (1 byte a value plus 4 per
  block). A block of zeros stays exactly zero.

Codecs are pure functions of pytrees, jittable: the local engine applies them inside the
round, so a compressed run computes with exactly what a real server would receive.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from ffrag_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Codec:
    """The interface; frozen and hashable (a jitted round takes it as a static argument)."""

    name: ClassVar[str]
    description: ClassVar[str]

    def encode(self, tree):
        """The payload of ``tree`` (a pytree of float arrays), as it would travel."""
        return tree

    def decode(self, payload, like):
        """The arrays a receiver reconstructs, with ``like``'s dtypes and shapes."""
        return payload

    def roundtrip(self, tree):
        """``decode(encode(tree))``: what the other side computes with."""
        return self.decode(self.encode(tree), tree)

    def value_bytes(self, count: int) -> int:
        """Bytes of ``count`` values of one leaf in this codec."""
        return 4 * count

    def nbytes(self, shapes) -> int:
        """Bytes of a payload of arrays with these shapes (a pytree of shapes or arrays)."""
        return sum(self.value_bytes(int(np.prod(getattr(x, "shape", x))))
                   for x in jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple)))


class FP32(Codec):
    name = "fp32"
    description = "the adapters as they are (4 bytes a value)"


class Cast(Codec):
    """Half precision: every value cast to ``dtype`` and back."""

    dtype: ClassVar = jnp.float16

    def encode(self, tree):
        return jax.tree.map(lambda x: x.astype(self.dtype), tree)

    def decode(self, payload, like):
        return jax.tree.map(lambda p, x: p.astype(x.dtype), payload, like)

    def value_bytes(self, count):
        return 2 * count


class FP16(Cast):
    name = "fp16"
    description = "cast to float16 (2 bytes a value)"
    dtype = jnp.float16


class BF16(Cast):
    name = "bf16"
    description = "cast to bfloat16 (2 bytes a value; float32's range)"
    dtype = jnp.bfloat16


@dataclasses.dataclass(frozen=True)
class Int8(Codec):
    """Blockwise absmax int8: ``(q [n_blocks, block] int8, scale [n_blocks] float32)`` per
    leaf; the last block of a leaf is zero-padded."""

    name: ClassVar[str] = "int8"
    description: ClassVar[str] = "blockwise absmax int8, one float32 scale per block"
    block: int = 64

    def __post_init__(self):
        if self.block < 1:
            raise UserError(f"fl.payload_block={self.block}: must be a positive integer")

    def _blocks(self, x):
        flat = x.reshape(-1).astype(jnp.float32)
        pad = -flat.shape[0] % self.block
        return jnp.pad(flat, (0, pad)).reshape(-1, self.block)

    def encode(self, tree):
        def one(x):
            blocks = self._blocks(x)
            scale = jnp.max(jnp.abs(blocks), axis=1) / 127.0
            safe = jnp.where(scale > 0, scale, 1.0)  # an all-zero block: q = 0, scale 0
            q = jnp.clip(jnp.round(blocks / safe[:, None]), -127, 127).astype(jnp.int8)
            return {"q": q, "scale": scale}
        return jax.tree.map(one, tree)

    def decode(self, payload, like):
        def one(x, p):  # like's leaves are prefixes of payload's {"q", "scale"} entries
            values = (p["q"].astype(jnp.float32) * p["scale"][:, None]).reshape(-1)
            return values[:x.size].reshape(x.shape).astype(x.dtype)
        return jax.tree.map(one, like, payload)

    def value_bytes(self, count):
        return count + 4 * math.ceil(count / self.block)


REGISTRY: dict[str, type[Codec]] = {c.name: c for c in (FP32, FP16, BF16, Int8)}


def get(name: str, block: int = 64) -> Codec:
    """The codec called ``name`` (``fl.payload``); one line naming the valid ones otherwise."""
    if name not in REGISTRY:
        raise UserError(f"fl.payload={name!r}; choose one of {', '.join(REGISTRY)} ("
                        + "; ".join(f"{n}: {c.description}" for n, c in REGISTRY.items())
                        + ")")
    return Int8(block) if name == "int8" else REGISTRY[name]()
