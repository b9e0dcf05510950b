"""Server aggregation: FLoRA stacking is exact for heterogeneous ranks; FedAvg/zero-padding
baselines; FF-LoRA fusion; client selection and weights (issue 3, aggregation part)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ffrag_jax import federated, lora
from ffrag_jax.errors import UserError
from ffrag_jax.models import llama

CFG = llama.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=4, num_kv_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def params():
    return llama.init_params(jax.random.key(0), CFG)


def _client(params, seed, rank, alpha=None, targets=("q_proj", "v_proj")):
    """A trained-looking adapter: random a and b."""
    lo = lora.init(jax.random.key(seed), params, list(targets), rank,
                   alpha if alpha is not None else 2.0 * rank)
    leaves, tree = jax.tree.flatten(lo.weights)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    leaves = [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    return lo.replace(weights=jax.tree.unflatten(tree, leaves))


def _rel(x, y):
    return float(jnp.linalg.norm(x - y) / jnp.linalg.norm(y))


def test_stacking_is_exact_for_heterogeneous_ranks(params):
    ranks = [64, 32, 16, 8, 4]  # the reference's heterogeneous list, capped at the layer size
    ranks = [min(r, 32) for r in ranks]
    clients = [_client(params, i, r) for i, r in enumerate(ranks)]
    weights = federated.client_weights([120, 40, 300, 0, 57])
    stacked = federated.stack(clients, weights)
    kept_ranks = [r for r, w in zip(ranks, weights, strict=True) if w > 0]
    assert stacked.ranks["layers/self_attn/q_proj"] == sum(kept_ranks)
    expected = {p: sum(w * d[p] for w, d in zip(weights, map(lora.delta, clients), strict=True))
                for p in lora.delta(clients[0])}
    for path, d in lora.delta(stacked).items():
        assert _rel(d, expected[path]) <= 1e-6


def test_stacked_merge_equals_forward_with_stacked_adapter(params):
    clients = [_client(params, i, r) for i, r in enumerate([16, 8, 4])]
    stacked = federated.stack(clients, federated.client_weights([1, 2, 3]))
    ids = jax.random.randint(jax.random.key(9), (2, 16), 0, 96)
    merged = llama.forward(lora.merge(params, stacked), CFG, ids)
    np.testing.assert_allclose(merged, llama.forward(params, CFG, ids, None, stacked), atol=1e-4)


def test_heterogeneous_scales_are_folded_exactly(params):
    a, b = _client(params, 1, 8, alpha=16.0), _client(params, 2, 4, alpha=1.0)  # 2.0 vs 0.25
    stacked = federated.stack([a, b], [0.3, 0.7])
    for path, d in lora.delta(stacked).items():
        assert _rel(d, 0.3 * lora.delta(a)[path] + 0.7 * lora.delta(b)[path]) <= 1e-6


def test_fedavg_averages_factors_not_products(params):
    clients = [_client(params, i, 8) for i in range(3)]
    weights = federated.client_weights([1, 1, 2])
    avg = federated.fedavg(clients, weights)
    q = [c.weights["layers"]["self_attn"]["q_proj"] for c in clients]
    np.testing.assert_allclose(avg.weights["layers"]["self_attn"]["q_proj"]["a"],
                               sum(w * x["a"] for w, x in zip(weights, q, strict=True)), rtol=1e-6)
    # and it is not the exact aggregate (that is what stacking is for)
    exact = federated.stack(clients, weights)
    path = ("layers", "self_attn", "q_proj")
    assert _rel(lora.delta(avg)[path], lora.delta(exact)[path]) > 0.1


def test_zeropad_pads_then_averages(params):
    small, big = _client(params, 1, 4), _client(params, 2, 8)
    small, big = small.replace(scale=2.0), big.replace(scale=2.0)
    padded = federated.zeropad([small, big], [0.5, 0.5])
    qa = padded.weights["layers"]["self_attn"]["q_proj"]["a"]
    assert qa.shape[-1] == 8
    np.testing.assert_allclose(qa[..., 4:], 0.5 * big.weights["layers"]["self_attn"]["q_proj"][
        "a"][..., 4:], rtol=1e-6)


def test_fuse_is_additive(params):
    global_lora = federated.stack([_client(params, i, 8) for i in range(2)], [0.5, 0.5])
    personal = _client(params, 7, 4)
    fused = federated.fuse(global_lora, personal)
    for path, d in lora.delta(fused).items():
        assert _rel(d, lora.delta(global_lora)[path] + lora.delta(personal)[path]) <= 1e-6


def test_select_clients_matches_the_reference_seeding():
    np.random.seed(3)
    ref = sorted(np.random.choice(np.arange(10), 5, replace=False).tolist())
    assert federated.select_clients(3, 10, 0.5) == ref
    assert federated.select_clients(0, 10, 0.01) and len(federated.select_clients(0, 10, 0.01)) == 1
    assert federated.select_clients(1, 10, 1.0) == list(range(10))


def test_bad_aggregation_input(params):
    with pytest.raises(UserError, match="no selected client has any training examples"):
        federated.client_weights([0, 0])
    with pytest.raises(UserError, match="fedavg needs equal ranks"):
        federated.fedavg([_client(params, 1, 4), _client(params, 2, 8)], [0.5, 0.5])
    with pytest.raises(UserError, match="targets other modules"):
        federated.stack([_client(params, 1, 4), _client(params, 2, 4, targets=("k_proj",))],
                        [0.5, 0.5])
    with pytest.raises(UserError, match="3 weights for 2 client adapters"):
        federated.stack([_client(params, 1, 4)] * 2, [0.2, 0.3, 0.5])
