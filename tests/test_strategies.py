"""Server strategies beyond averaging (issue 18, part 5): the robust rules and the server
optimisers, each against a case computed by hand, chosen once from the config, and
checkpointed with the round."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from ffrag_jax.errors import UserError
from ffrag_jax.federated import aggregation, strategies
from ffrag_jax.models.lora import LoRA
from ffrag_jax.training import checkpoint
from ffrag_jax.training.metrics import MetricsLog


def _adapter(a, b) -> LoRA:
    """A one-module adapter; ``a`` ``[..., 2, 1]`` and ``b`` ``[..., 1, 2]`` from nested lists."""
    return LoRA({"layer": {"q_proj": {"a": jnp.asarray(a, jnp.float32),
                                      "b": jnp.asarray(b, jnp.float32)}}}, scale=2.0)


def _a(lo: LoRA) -> np.ndarray:
    return np.asarray(lo.weights["layer"]["q_proj"]["a"])


# Six clients, one coordinate pair each in a (b mirrors a): client 3 is far off, client 5 was
# rejected by the server (already zeroed; its huge value must not count either way).
A = [[[1.0], [4.0]], [[2.0], [-1.0]], [[9.0], [0.0]], [[100.0], [3.0]], [[5.0], [10.0]],
     [[1e9], [1e9]]]
ACCEPTED = jnp.asarray([True, True, True, True, True, False])


def _clients():
    return _adapter(A, [[[x[0][0], x[1][0]]] for x in A])


def _round(strategy, server, clients, weights=None):
    weights = jnp.full((6,), 0.2).at[5].set(0.0) if weights is None else weights
    return strategy.aggregate(server, clients, weights, ACCEPTED, jnp.arange(6))


def test_median_and_trimmed_mean_by_hand():
    # accepted a[0] values 1, 2, 9, 100, 5 -> sorted 1 2 5 9 100; a[1]: 4 -1 0 3 10 -> -1 0 3 4 10
    server = {"params": {}, "global": _adapter([[0.0], [0.0]], [[0.0, 0.0]])}
    median = _round(strategies.get("median"), server, _clients())["global"]
    np.testing.assert_allclose(_a(median), [[5.0], [3.0]])
    np.testing.assert_allclose(median.weights["layer"]["q_proj"]["b"], [[5.0, 3.0]])
    assert median.scale == 2.0
    trimmed = _round(strategies.get("trimmed_mean", settings={"trim": 0.2}), server,
                     _clients())["global"]  # floor(0.2 * 5) = 1 dropped at each end
    np.testing.assert_allclose(_a(trimmed), [[16.0 / 3], [7.0 / 3]], rtol=1e-6)
    untrimmed = _round(strategies.get("trimmed_mean", settings={"trim": 0.0}), server,
                       _clients())["global"]
    np.testing.assert_allclose(_a(untrimmed), [[117.0 / 5], [16.0 / 5]], rtol=1e-6)
    # An even count averages the middle two: without client 4, 1 2 9 100 -> 5.5
    even = aggregation.coordinate_median(_clients(), ACCEPTED.at[4].set(False))
    np.testing.assert_allclose(_a(even), [[5.5], [1.5]])


def test_fedavgm_by_hand_and_fedavg_as_its_special_case():
    start = _adapter([[1.0], [1.0]], [[1.0, 1.0]])
    m = strategies.get("fedavgm", settings={"lr": 1.0, "momentum": 0.9})
    server = m.init_server({}, start=start)
    # Round 1: every client at 0.5 -> g = 1 - 0.5 = 0.5, v = 0.5, x = 1 - 0.5 = 0.5.
    half = _adapter([[[0.5], [0.5]]] * 6, [[[0.5, 0.5]]] * 6)
    server = _round(m, server, half)
    np.testing.assert_allclose(_a(server["global"]), [[0.5], [0.5]])
    # Round 2: clients at 0 -> g = 0.5, v = 0.9 * 0.5 + 0.5 = 0.95, x = 0.5 - 0.95 = -0.45.
    zero = _adapter([[[0.0], [0.0]]] * 6, [[[0.0, 0.0]]] * 6)
    server = _round(m, server, zero)
    np.testing.assert_allclose(_a(server["global"]), [[-0.45], [-0.45]], rtol=1e-6)
    # lr 1 without momentum is FedIT: the global adapter becomes the weighted mean.
    plain = strategies.get("fedavgm", settings={"lr": 1.0, "momentum": 0.0})
    weights = jnp.asarray([0.1, 0.2, 0.3, 0.0, 0.4, 0.0])
    got = _round(plain, plain.init_server({}, start=start), _clients(), weights)["global"]
    want = aggregation.weighted_mean(_clients(), weights)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), got, want)


def _reddi(kind, x, means, lr, b1, b2, tau):
    """Adaptive federated optimisation written out (Reddi et al., 2021, Algorithm 2, with
    bias-corrected moments as optax's Adam and Yogi; optax's Yogi starts both moments at
    1e-6): the global value after each round whose client average is ``means[t]``."""
    m = v = 1e-6 if kind == "yogi" else 0.0
    out = []
    for t, mean in enumerate(means, 1):
        g = x - mean  # the pseudo-gradient
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g if kind == "adam" else v - (1 - b2) * g * g * np.sign(
            v - g * g)
        x = x - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + tau)
        out.append(x)
    return out


@pytest.mark.parametrize("name,kind", [("fedadam", "adam"), ("fedyogi", "yogi")])
def test_adaptive_server_optimisers_by_hand(name, kind):
    settings = {"lr": 0.1, "b1": 0.9, "b2": 0.99, "tau": 1e-3}
    opt = strategies.get(name, settings=settings)
    if kind == "adam":
        # Round 1 by hand: g = 0.5, m = 0.05, v = 0.0025, m_hat = 0.5, v_hat = 0.25,
        # x = 1 - 0.1 * 0.5 / (0.5 + 0.001)
        assert _reddi(kind, 1.0, [0.5], **settings)[0] == pytest.approx(1 - 0.05 / 0.501)
    server = opt.init_server({}, start=_adapter([[1.0], [-2.0]], [[0.5, 3.0]]))
    means = [0.5, 0.2, 0.9, -0.3]
    for mean in means:
        clients = _adapter([[[mean], [mean]]] * 6, [[[mean, mean]]] * 6)
        server = _round(opt, server, clients)
    for start, got in ((1.0, _a(server["global"])[0, 0]), (-2.0, _a(server["global"])[1, 0]),
                       (3.0, server["global"].weights["layer"]["q_proj"]["b"][0, 1])):
        assert float(got) == pytest.approx(_reddi(kind, start, means, **settings)[-1],
                                           rel=1e-5)


def test_server_optimiser_state_survives_a_checkpoint(tmp_path):
    """The optimiser's moments are part of what a round checkpoint holds: a resumed server
    takes the same next step as one that never stopped."""
    opt = strategies.get("fedadam", settings={"lr": 0.1})
    server = _round(opt, opt.init_server({}, start=_adapter([[1.0], [2.0]], [[3.0, 4.0]])),
                    _clients())
    mngr = checkpoint.manager(tmp_path / "ckpt")
    checkpoint.save(mngr, 1, opt.checkpointed(server), MetricsLog(tmp_path / "m.jsonl"))
    mngr.wait_until_finished()
    fresh = opt.init_server({}, start=_adapter([[0.0], [0.0]], [[0.0, 0.0]]))
    step, saved = checkpoint.restore_latest(mngr, opt.checkpointed(fresh))
    assert step == 1
    resumed = {**fresh, **saved}
    nxt, nxt_resumed = _round(opt, server, _clients()), _round(opt, resumed, _clients())
    jax.tree.map(np.testing.assert_array_equal, nxt, nxt_resumed)
    assert int(nxt_resumed["server_opt"][0].count) == 2


def test_strategies_read_their_settings_from_fl_settings():
    fl = ConfigDict(dict(strategy="fedadam", fusion="add", settings=ConfigDict(dict(
        lr=0.05, momentum=0.9, b1=0.8, b2=0.95, tau=1e-4, trim=0.1))))
    opt = strategies.from_config(fl)
    assert (type(opt), opt.lr, opt.b1, opt.b2, opt.tau) == (strategies.FedAdam, 0.05, 0.8,
                                                           0.95, 1e-4)
    fl.strategy = "trimmed_mean"
    assert strategies.from_config(fl).trim == 0.1
    fl.strategy = "fedavg"  # no settings of its own: the section is not its business
    assert type(strategies.from_config(fl)) is strategies.FedAvg
    fl.settings.lr_typo = 1.0
    with pytest.raises(UserError, match=r"unknown key fl.settings.lr_typo; fl.settings keys: lr,"):
        strategies.from_config(fl)
    for name, key, value in (("fedadam", "lr", 0.0), ("fedavgm", "momentum", 1.0),
                             ("fedyogi", "b2", 1.5), ("trimmed_mean", "trim", 0.5),
                             ("fedadam", "tau", -1.0)):
        with pytest.raises(UserError, match=rf"^fl.settings.{key}={value!r}: must be in"):
            strategies.get(name, settings={key: value})
    # Zero-padded like zeropad: heterogeneous ranks are fine.
    for name in ("fedavgm", "fedadam", "fedyogi", "median", "trimmed_mean"):
        strategies.get(name).check([8, 4])


# --------------------------------------------------------------------------------------------
# Strategies that change local training: FedProx, FFA-LoRA, FedSA-LoRA


def _sgd_steps(tx, w0, grads):
    """``w`` after plain gradient steps of ``tx`` from ``w0`` with the given gradients."""
    w = {"w": jnp.asarray(w0)}
    state = tx.init(w)
    for g in grads:
        updates, state = tx.update({"w": jnp.asarray(g)}, state, w)
        w = optax.apply_updates(w, updates)
    return float(w["w"])


def test_the_proximal_anchor_is_a_buffer_of_its_own():
    """A train state holds the start and FedProx's anchor; a jitted step that donates the
    state (FF-RAG's rag_step) must not get one buffer twice."""
    from ffrag_jax.federated import client_rules

    params = {"a": jnp.ones((3,))}
    state = client_rules.proximal(0.1).init(params)
    step = jax.jit(lambda p, s: jax.tree.map(lambda x: x + 1, (p, s)), donate_argnums=(0, 1))
    out = step(params, state)  # raised "donate the same buffer twice" with the anchor shared
    np.testing.assert_allclose(out[1].anchor["a"], 2.0)


def test_fedprox_adds_the_proximal_gradient_by_hand():
    # lr 0.1, mu 0.2, gradient 0.5 twice from w0 = 1: step 1 has no pull (w = w0), w = 0.95;
    # step 2's gradient is 0.5 + 0.2 (0.95 - 1) = 0.49, w = 0.95 - 0.049 = 0.901.
    prox = strategies.get("fedprox", settings={"mu": 0.2})
    tx = prox.client_optimizer(lambda num_steps: optax.sgd(0.1))(2)  # a factory, as jobs pass
    assert _sgd_steps(tx, 1.0, [0.5, 0.5]) == pytest.approx(0.901, abs=1e-7)
    assert _sgd_steps(strategies.get("fedavg").client_optimizer(optax.sgd(0.1)), 1.0,
                      [0.5, 0.5]) == pytest.approx(0.9, abs=1e-7)
    with pytest.raises(UserError, match=r"^fl.settings.mu=-1.0: must be in"):
        strategies.get("fedprox", settings={"mu": -1.0})


def test_ffa_never_moves_a_and_averages_b_exactly():
    ffa = strategies.get("ffa")
    start = _adapter([[0.3], [-0.7]], [[0.0, 0.0]])
    tx = ffa.client_optimizer(optax.adamw(0.1, weight_decay=0.1))
    lo, state = start, tx.init(start)
    for _ in range(3):
        grads = jax.tree.map(jnp.ones_like, lo)
        updates, state = tx.update(grads, state, lo)
        lo = optax.apply_updates(lo, updates)
    np.testing.assert_array_equal(_a(lo), _a(start))  # bit for bit, weight decay included
    assert not np.allclose(lo.weights["layer"]["q_proj"]["b"], 0.0)
    # Clients share a, so averaging b averages the products: a_0 (0.25 b_1 + 0.75 b_2).
    clients = _adapter([[[0.3], [-0.7]]] * 2, [[[1.0, 2.0]], [[3.0, -2.0]]])
    server = ffa.aggregate({"params": {}, "global": start}, clients, jnp.asarray([0.25, 0.75]),
                           jnp.asarray([True, True]), jnp.arange(2))
    new = server["global"]
    np.testing.assert_array_equal(_a(new), _a(start))
    np.testing.assert_allclose(new.weights["layer"]["q_proj"]["b"], [[2.5, -1.0]])
    up, down = ffa.payload_bytes(start, 1, 1)
    assert up == down == 2 * 4  # b alone: rank 1 x 2 outputs, float32


def test_fedsa_shares_a_and_keeps_each_clients_b():
    fedsa = strategies.get("fedsa")
    personal = _adapter([[[1.0], [1.0]], [[5.0], [5.0]], [[9.0], [9.0]]],
                        [[[0.0, 0.0]]] * 3)  # 3 clients; client 0's a is everyone's start
    server = fedsa.init_server({}, personal=personal)
    start = fedsa.client_start(server, jnp.asarray([1, 2]), None)
    np.testing.assert_array_equal(np.asarray(start.weights["layer"]["q_proj"]["a"]),
                                  [[[1.0], [1.0]]] * 2)
    # Clients 1 and 2 trained; client 2 was rejected (zeroed, weight 0).
    updated = _adapter([[[2.0], [4.0]], [[0.0], [0.0]]], [[[1.0, -1.0]], [[0.0, 0.0]]])
    server = fedsa.aggregate(server, updated, jnp.asarray([1.0, 0.0]),
                             jnp.asarray([True, False]), jnp.asarray([1, 2]))
    np.testing.assert_allclose(_a(server["global"]), [[2.0], [4.0]])
    for k, b in ((0, [[0.0, 0.0]]), (1, [[1.0, -1.0]]), (2, [[0.0, 0.0]])):
        own = fedsa.client_adapter(server, k)
        np.testing.assert_allclose(_a(own), [[2.0], [4.0]])  # the shared a
        np.testing.assert_allclose(own.weights["layer"]["q_proj"]["b"], b)  # its own b
        jax.tree.map(np.testing.assert_array_equal, fedsa.fused_adapter(server, k), own)
    assert fedsa.payload_bytes(_adapter([[0.0], [0.0]], [[0.0, 0.0]]), 1, 1) == (8, 8)
    with pytest.raises(UserError, match="one rank for all clients"):
        fedsa.check([4, 2])


@pytest.mark.parametrize("k,trim", [(5, 0.2), (6, 0.25), (7, 0.1)])
def test_robust_rules_equal_flowers(k, trim):
    """Coordinate-wise median and trimmed mean against Flower's own (``aggregate_median``,
    ``aggregate_trimmed_avg``), on random client trees; a rejected client is left out as
    if it never answered."""
    agg = pytest.importorskip("flwr.server.strategy.aggregate")
    from ffrag_jax.federated.aggregation import coordinate_median, trimmed_mean

    rng = np.random.default_rng(k)
    tree = {"a": rng.normal(size=(k, 3, 4)).astype(np.float32),
            "b": rng.normal(size=(k, 4, 2)).astype(np.float32)}
    accepted = np.ones(k, bool)
    accepted[1] = False
    kept = [([tree["a"][i], tree["b"][i]], 1) for i in range(k) if accepted[i]]
    med = coordinate_median(jax.tree.map(jnp.asarray, tree), jnp.asarray(accepted))
    for ours, theirs in zip((med["a"], med["b"]), agg.aggregate_median(kept), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    tm = trimmed_mean(jax.tree.map(jnp.asarray, tree), jnp.asarray(accepted), trim)
    for ours, theirs in zip((tm["a"], tm["b"]), agg.aggregate_trimmed_avg(kept, trim),
                            strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)


def test_stacking_by_its_merged_deltas_is_the_stacked_product_by_hand():
    """Secure aggregation's form of FLoRA: each client's dense ``scale a_k b_k``, averaged,
    merged into the kernel, is the stacked merge. By hand: client k's delta is 2 a_k b_k."""
    stack = strategies.get("stack")
    kernel = jnp.zeros((2, 2))
    server = {"params": {"layer": {"q_proj": {"kernel": kernel}}}}
    two = _adapter([[[1.0], [2.0]], [[0.0], [1.0]]], [[[3.0, 1.0]], [[1.0, -1.0]]])
    deltas = [stack.secure_form(_adapter(A_, B_)) for A_, B_ in (
        ([[1.0], [2.0]], [[3.0, 1.0]]), ([[0.0], [1.0]], [[1.0, -1.0]]))]
    np.testing.assert_allclose(deltas[0]["layer/q_proj"], [[6.0, 2.0], [12.0, 4.0]])
    np.testing.assert_allclose(deltas[1]["layer/q_proj"], [[0.0, 0.0], [2.0, -2.0]])
    w = jnp.asarray([0.25, 0.75])
    mean = aggregation.weighted_mean(
        jax.tree.map(lambda *xs: jnp.stack(xs), *deltas), w)
    secure = stack.aggregate_mean(server, mean)["params"]["layer"]["q_proj"]["kernel"]
    np.testing.assert_allclose(secure, [[1.5, 0.5], [4.5, -0.5]])
    plain = stack.aggregate(server, two, w, jnp.asarray([True, True]), jnp.arange(2), (1, 1))
    np.testing.assert_allclose(plain["params"]["layer"]["q_proj"]["kernel"], secure, rtol=1e-6)


@pytest.mark.parametrize("name", [n for n, c in strategies.REGISTRY.items() if c.summable])
def test_every_summable_strategy_aggregates_its_weighted_mean(name):
    """What secure aggregation gives a summable strategy (the weighted mean of its clients'
    secure forms) leads to the same server state as its plain rule."""
    s = strategies.get(name)
    start = _adapter([[0.5], [0.5]], [[0.5, 0.5]])
    server = s.init_server({"layer": {"q_proj": {"kernel": jnp.zeros((2, 2))}}}, start=start)
    weights = jnp.asarray([0.1, 0.2, 0.3, 0.0, 0.4, 0.0])
    clients = _adapter([[[1.0], [2.0]], [[0.0], [1.0]], [[3.0], [-1.0]], [[0.0], [0.0]],
                        [[2.0], [2.0]], [[0.0], [0.0]]],
                       [[[1.0, 2.0]], [[0.5, 0.0]], [[1.0, 1.0]], [[0.0, 0.0]], [[2.0, -1.0]],
                        [[0.0, 0.0]]])
    plain = s.aggregate(server, clients, weights, weights > 0, jnp.arange(6), (1,) * 6)
    forms = [s.secure_form(aggregation.client(clients, k)) for k in range(6)]
    mean = aggregation.weighted_mean(jax.tree.map(lambda *xs: jnp.stack(xs), *forms), weights)
    secure = s.aggregate_mean(server, mean)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7),
                 plain, secure)
