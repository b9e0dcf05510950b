"""Payload codecs (issue 18, part 4): blockwise int8 by hand, half precision, sizes, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ffrag_jax.errors import UserError
from ffrag_jax.federated import compression


def test_blockwise_int8_by_hand():
    codec = compression.get("int8", block=4)
    # Block 1: absmax 1 -> scale 1/127; 1, -0.5, 0.25, 0 -> 127, -64 (half to even), 32, 0.
    # Block 2: all zero -> scale 0, stays exactly zero. Block 3: 2 and padding.
    x = jnp.asarray([1.0, -0.5, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0])
    payload = codec.encode({"w": x})["w"]
    assert payload["q"].dtype == jnp.int8 and payload["q"].shape == (3, 4)
    np.testing.assert_array_equal(payload["q"], [[127, -64, 32, 0], [0, 0, 0, 0],
                                                 [127, 0, 0, 0]])
    np.testing.assert_allclose(payload["scale"], [1 / 127, 0.0, 2 / 127], rtol=1e-7)
    got = codec.roundtrip({"w": x})["w"]
    np.testing.assert_allclose(got, [1.0, -64 / 127, 32 / 127, 0, 0, 0, 0, 0, 2.0],
                               rtol=1e-6)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert codec.nbytes({"w": (9,)}) == 9 + 3 * 4  # a byte a value, a float32 scale a block


def test_codec_errors_bytes_and_jit():
    rng = np.random.default_rng(0)
    tree = {"a": jnp.asarray(rng.normal(size=(2, 64, 8)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(2, 8, 64)), jnp.float32)}
    values = 2 * 2 * 64 * 8
    for name, size, tol in (("fp32", 4 * values, 0.0), ("fp16", 2 * values, 2.0**-11),
                            ("bf16", 2 * values, 2.0**-8), ("int8", values + 4 * values // 64,
                                                         0.5 / 127)):
        codec = compression.get(name)
        assert codec.nbytes(tree) == size
        got = jax.jit(codec.roundtrip)(tree)
        for g, x in zip(jax.tree.leaves(got), jax.tree.leaves(tree), strict=True):
            assert g.dtype == x.dtype
            # within half a step of the format: relative for floats, of the block's absmax
            # for int8
            bound = tol * (np.max(np.abs(x)) if name == "int8" else np.abs(x))
            assert np.all(np.abs(np.asarray(g) - np.asarray(x)) <= bound + 1e-12), name
    with pytest.raises(UserError, match=r"^fl.payload='int4'; choose one of fp32, fp16, bf16, "
                                        r"int8"):
        compression.get("int4")
    with pytest.raises(UserError, match=r"^fl.payload_block=0: must be a positive integer"):
        compression.get("int8", block=0)
