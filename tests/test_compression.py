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


def _lora(a, b):
    from ffrag_jax.models.lora import LoRA
    return LoRA({"layer": {"q_proj": {"a": jnp.asarray(a, jnp.float32),
                                      "b": jnp.asarray(b, jnp.float32)}}}, scale=1.0)


def test_strategies_compute_with_what_travels():
    from ffrag_jax.federated import aggregation, strategies

    int8 = compression.get("int8", block=2)
    rng = np.random.default_rng(1)
    clients = _lora(rng.normal(size=(2, 3, 2)), rng.normal(size=(2, 2, 3)))  # 2 clients, r 2
    weights, accepted, selected = jnp.asarray([0.3, 0.7]), jnp.asarray([True, True]), \
        jnp.arange(2)
    fedavg = strategies.get("fedavg", payload=int8)
    start = _lora(rng.normal(size=(3, 2)), rng.normal(size=(2, 3)))
    server = fedavg.server_update({"params": {}, "global": start}, clients, weights, accepted,
                                  selected)
    # what arrived (each client encoded its own adapter), averaged
    want = aggregation.weighted_mean(jax.vmap(int8.roundtrip)(clients), weights)
    jax.tree.map(np.testing.assert_array_equal, server["global"], want)
    assert not np.allclose(server["global"].weights["layer"]["q_proj"]["a"],
                           aggregation.weighted_mean(clients, weights).weights["layer"][
                               "q_proj"]["a"], rtol=0, atol=1e-7)
    # Clients start from what they download.
    got = fedavg.client_start(server, selected, None)
    jax.tree.map(lambda g, w: np.testing.assert_array_equal(g[1], w), got,
                 int8.roundtrip(server["global"]))
    # FF-LoRA: each client keeps its own adapter as it trained it; the global one is the
    # downloaded stack of what arrived.
    ff = strategies.get("ff", payload=int8)
    server = ff.server_update({"params": {}, "personal": clients, "global": None}, clients,
                              weights, accepted, selected)
    jax.tree.map(np.testing.assert_array_equal, server["personal"], clients)
    stacked = aggregation.stack_padded(jax.vmap(int8.roundtrip)(clients), weights)
    jax.tree.map(np.testing.assert_array_equal, server["global"], int8.roundtrip(stacked))
    # A block never spans two clients: with blocks of 4, client 1's first values share a
    # scale with nothing of client 0's (a batch-wide encoding would mix them).
    int8_4 = strategies.get("fedavg", payload=compression.get("int8", block=4))
    got = int8_4.server_update({"params": {}, "global": start}, clients, weights, accepted,
                               selected)["global"]
    per_client = [compression.get("int8", block=4).roundtrip(aggregation.client(clients, k))
                  for k in range(2)]
    want = jax.tree.map(lambda x, y: 0.3 * x + 0.7 * y, *per_client)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6), got, want)
    # Bytes: a rank-2 adapter of a 3x3 module is 6 + 6 values: 12 int8 and 6 scales of 2.
    assert fedavg.payload_bytes(start, 2, 2) == (12 + 4 * 6, 12 + 4 * 6)
    assert strategies.get("fedavg").payload_bytes(start, 2, 2) == (48, 48)
    assert strategies.get("ffa", payload=compression.get("bf16")).payload_bytes(start, 2, 2) \
        == (12, 12)  # b alone, 2 bytes a value
