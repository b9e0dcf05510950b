"""Client-level differential privacy (ffrag_jax.federated.privacy): clipping and noise on a
hand-computed case, the noise's scale, and the accountant against dp-accounting's tight
Gaussian bound."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from ffrag_jax.errors import UserError
from ffrag_jax.federated import privacy
from ffrag_jax.models import lora as lora_lib


def adapter(a, b, scale=1.0):
    """A one-module adapter with factors a [1, 3, R] and b [1, R, 2] (leading client axis)."""
    return lora_lib.LoRA(weights={"layers": {"q_proj": {"a": jnp.asarray(a, jnp.float32),
                                                        "b": jnp.asarray(b, jnp.float32)}}},
                         scale=scale, dropout=0.0)


def test_clipping_scales_the_update_to_the_norm():
    # start 0; update a = [[3, 0], [0, 0], [0, 0]], b = [[4, 0], [0, 0]]: norm 5
    a = np.zeros((1, 3, 2)), np.zeros((1, 3, 2))
    a[1][0, 0, 0] = 3.0
    b = np.zeros((1, 2, 2)), np.zeros((1, 2, 2))
    b[1][0, 0, 0] = 4.0
    start, updated = adapter(a[0], b[0]), adapter(a[1], b[1])
    masks = jnp.ones((1, 2))
    rngs = jax.random.split(jax.random.key(0), 1)
    clipped = privacy.privatise(updated, start, masks, rngs, privacy.ClientDP(1.0, 0.0))
    w = clipped.weights["layers"]["q_proj"]
    np.testing.assert_allclose(w["a"][0, 0, 0], 3 / 5, rtol=1e-6)
    np.testing.assert_allclose(w["b"][0, 0, 0], 4 / 5, rtol=1e-6)
    # Within the norm: unchanged (relative to a non-zero start too).
    start2 = adapter(a[0] + 1.0, b[0] - 2.0)
    up2 = adapter(a[1] / 10 + 1.0, b[1] / 10 - 2.0)
    same = privacy.privatise(up2, start2, masks, rngs, privacy.ClientDP(1.0, 0.0))
    for x, y in zip(jax.tree.leaves(same), jax.tree.leaves(up2), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6)


def test_noise_has_its_scale_and_spares_the_padding():
    k, r = 4, 8
    zeros = adapter(np.zeros((k, 64, r)), np.zeros((k, r, 64)))
    masks = jnp.stack([(jnp.arange(r) < rank).astype(jnp.float32) for rank in (8, 4, 2, 1)])
    out = privacy.privatise(zeros, zeros, masks, jax.random.split(jax.random.key(1), k),
                            privacy.ClientDP(0.5, 3.0))
    a = np.asarray(out.weights["layers"]["q_proj"]["a"])
    assert np.all(a[1][:, 4:] == 0) and np.all(a[3][:, 1:] == 0)  # padding exactly zero
    assert abs(a[0].std() - 1.5) < 0.05  # std = noise_multiplier * clip over 512 values
    assert not np.allclose(a[0], a[1][:, :8])  # every client draws its own noise


def test_accountant_and_calibration():
    # One round: the RDP bound is at least the tight Gaussian epsilon, and not far above it.
    for sigma in (1.0, 2.0, 4.0):
        tight = __import__("dp_accounting").get_epsilon_gaussian(sigma / 2, 1e-5)
        assert tight <= privacy.epsilon(sigma, 1, 1e-5) <= 1.5 * tight
    assert privacy.epsilon(2.0, 1, 1e-5) < privacy.epsilon(2.0, 3, 1e-5)
    sigma = privacy.calibrate(2.0, 1e-5, 3)
    assert privacy.epsilon(sigma, 3, 1e-5) <= 2.0 < privacy.epsilon(sigma - 0.01, 3, 1e-5)


def test_bad_dp_settings_are_named():
    fl = ConfigDict(dict(rounds=3, dp=dict(clip=0.0, noise_multiplier=0.0, epsilon=None,
                                           delta=1e-5)))
    assert privacy.from_config(fl) is None
    fl.dp.clip = 1.0
    with pytest.raises(UserError, match="give epsilon or a positive noise_multiplier"):
        privacy.from_config(fl)
    fl.dp.delta = 1.5
    with pytest.raises(UserError, match=r"fl.dp.delta=1.5: must be in \(0, 1\)"):
        privacy.from_config(fl)
    fl.dp.update(dict(delta=1e-5, epsilon=-1.0))
    with pytest.raises(UserError, match="fl.dp.epsilon=-1.0: must be positive"):
        privacy.from_config(fl)
