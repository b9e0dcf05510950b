"""Training invariants: only LoRA moves, loss falls, accumulation is exact, shardings agree."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ffrag_jax.models import llama, lora
from ffrag_jax.training import sharding, train

CFG = llama.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=4, num_kv_heads=2, max_position_embeddings=64)


def _batch(seed, num_micro, micro_batch, length=24):
    ids = jax.random.randint(jax.random.key(seed), (num_micro, micro_batch, length), 0, 96)
    lengths = jax.random.randint(jax.random.key(seed + 1), (num_micro, micro_batch), 8, length)
    attention = (jnp.arange(length) < lengths[..., None]).astype(jnp.int32)
    loss_mask = (jnp.arange(length) >= 4).astype(jnp.int32) * attention  # "response" from 4 on
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask}


@pytest.fixture(scope="module")
def params():
    return llama.init_params(jax.random.key(0), CFG)


def _run(params, adapter, batch, steps, mesh, lr=1e-2, use_dropout=False, optimizer=None):
    optimizer = optimizer or train.make_optimizer(lr, 100, warmup_steps=2, weight_decay=0.01)
    state = train.init_train_state(sharding.shard(adapter, mesh), optimizer)
    frozen = sharding.shard(params, mesh)
    step = train.jit_train_step(CFG, optimizer, "lora", mesh, state, frozen,
                                use_dropout=use_dropout)
    losses = []
    for i in range(steps):
        state, metrics = step(state, frozen, batch, jax.random.key(i))
        losses.append(float(metrics["loss"]))
    return state, losses


def test_only_lora_changes_and_loss_decreases(params):
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    before = jax.tree.map(np.array, params)
    adapter = lora.init(jax.random.key(1), params, ["q_proj", "v_proj"], 8, 16.0, dropout=0.1)
    batch = _batch(0, 2, 4)
    state, losses = _run(params, adapter, batch, 40, mesh, lr=3e-2, use_dropout=True)
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, params))
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), adapter.weights,
                           state.trainable.weights)
    assert all(jax.tree.leaves(changed))
    assert isinstance(state.trainable, lora.LoRA)
    assert losses[-1] < losses[0] - 0.3, losses
    assert np.mean(losses[-5:]) < np.mean(losses[5:10]) < np.mean(losses[:5]), losses
    # optimizer state exists only for the LoRA tree
    n_lora = sum(x.size for x in jax.tree.leaves(adapter.weights))
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert n_opt == 2 * n_lora  # Adam's mu and nu


def test_gradient_accumulation_equals_one_big_batch(params):
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    adapter = lora.init(jax.random.key(1), params, "all-linear", 4, 8.0)
    adapter = adapter.replace(weights=jax.tree.map(lambda x: x + 0.01, adapter.weights))
    micro = _batch(3, 4, 2)  # 4 micro-batches of 2, ragged lengths
    whole = jax.tree.map(lambda x: x.reshape(1, 8, -1), micro)
    a, la = _run(params, adapter, micro, 3, mesh)
    b, lb = _run(params, adapter, whole, 3, mesh)
    np.testing.assert_allclose(la, lb, rtol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6),
                 a.trainable.weights, b.trainable.weights)


def test_response_only_loss_ignores_prompt_tokens(params):
    batch = jax.tree.map(lambda x: x[0], _batch(5, 1, 3))
    total, count = train.causal_lm_loss(params, CFG, batch)
    scored = batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]
    assert float(count) == float(jnp.sum(scored))
    # with nothing marked as response, nothing is scored
    nothing = dict(batch, loss_mask=jnp.zeros_like(batch["loss_mask"]))
    assert float(train.causal_lm_loss(params, CFG, nothing)[1]) == 0.0
    assert np.isfinite(float(total))


@pytest.mark.eight_devices
def test_sharded_step_matches_single_device(params):
    """data=2 x fsdp=2 x tensor=2 over 8 devices == 1 device, and params really are split."""
    assert len(jax.devices()) == 8
    adapter = lora.init(jax.random.key(1), params, "all-linear", 4, 8.0)
    batch = _batch(7, 2, 8)
    one = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    eight = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    # SGD: the update is linear in the gradient, so the comparison sees the sharded gradient
    # itself (Adam would magnify float-order noise in near-zero gradients of A while B ~ 0).
    sgd = optax.sgd(0.5)
    a, la = _run(params, adapter, batch, 3, one, optimizer=sgd)
    b, lb = _run(params, adapter, batch, 3, eight, optimizer=sgd)
    np.testing.assert_allclose(la, lb, rtol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6),
                 a.trainable.weights, jax.device_get(b.trainable.weights))
    q = b.trainable.weights["layers"]["self_attn"]["q_proj"]["a"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    assert len(q.sharding.device_set) == 8


def test_full_mode_trains_params():
    params = llama.init_params(jax.random.key(0), CFG)
    mesh = sharding.make_mesh({"data": -1})
    optimizer = train.make_optimizer(3e-3, 20)
    state = train.init_train_state(sharding.shard(params, mesh), optimizer)
    step = train.jit_train_step(CFG, optimizer, "full", mesh, state)
    batch = _batch(9, 1, 8)
    losses = []
    for i in range(10):
        state, m = step(state, None, batch, jax.random.key(i))
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.5


def test_warmup_linear_decay_schedule():
    schedule = train.warmup_linear_decay(1.0, total_steps=10, warmup_steps=2)
    np.testing.assert_allclose([float(schedule(s)) for s in (0, 1, 2, 6, 10)],
                               [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)


@pytest.mark.eight_devices
def test_mesh_errors_name_the_problem():
    from ffrag_jax.errors import UserError

    with pytest.raises(UserError, match="needs 16 devices, 8 available"):
        sharding.make_mesh({"data": 16})
    with pytest.raises(UserError, match="does not divide 8 devices"):
        sharding.make_mesh({"data": 3, "fsdp": -1})
    assert sharding.make_mesh({"data": 2}).devices.size == 2  # the first 2 of 8
    with pytest.raises(UserError, match="unknown mesh axis 'model'"):
        sharding.make_mesh({"model": 2})


def test_a_batch_of_the_wrong_layout_is_one_clear_error(params):
    from ffrag_jax.errors import UserError

    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    optimizer = train.make_optimizer(1e-2, 10, warmup_steps=0)
    adapter = lora.init(jax.random.key(1), params, ["q_proj"], 4, 8.0)
    state = train.init_train_state(adapter, optimizer)
    step = train.jit_train_step(CFG, optimizer, "lora", mesh, state, params)
    batch = _batch(0, 1, 4)  # [accum=1, B=4, T]
    flat = {k: v[0] for k, v in batch.items()}  # [B, T]: a sharding error inside jit before
    with pytest.raises(UserError, match=r"a training step takes \[accum, B, T\] leaves"):
        step(state, params, flat, jax.random.key(0))
    partial = {k: v for k, v in batch.items() if k != "loss_mask"}  # a bare KeyError before
    with pytest.raises(UserError, match=r"the batch lacks 'loss_mask'"):
        step(state, params, partial, jax.random.key(0))
    state, metrics = step(state, params, batch, jax.random.key(0))  # the right one runs
    assert np.isfinite(float(metrics["loss"]))
