"""Client-level differential privacy on the clients' side (``fl.dp``): each client clips what
it sends and adds Gaussian noise before it leaves, so neither the server nor anyone on the
wire sees an exact update; ``(epsilon, delta)`` from the RDP accountant of ``dp-accounting``.

What is privatised is a client's *update*: its trained adapter minus the adapter it started
the round from (``delta = updated - start``, every factor that trained). The whole update is
clipped to L2 norm ``clip`` and noise ``N(0, (noise_multiplier * clip)^2)`` is added to each of
its coordinates within the client's rank (the padding of a lower-rank client stays exactly
zero, as the server checks). It works the same for every strategy, stacking included: the
server only ever receives privatised adapters. (Server-side noise on the aggregate needs far
less noise for the same epsilon, but the server must then see exact updates, and FLoRA's
stacked adapter is no sum.)

Accounting: one client's release per round is a Gaussian mechanism; two datasets of a client
can move its clipped update by up to ``2 * clip``, so each round costs what a Gaussian of
noise multiplier ``noise_multiplier / 2`` costs under add/remove, composed over the rounds the
client took part in (no amplification by sampling is claimed). ``fl.dp.epsilon`` picks the
noise multiplier that reaches that epsilon after ``fl.rounds`` rounds.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ffrag_jax.errors import UserError
from ffrag_jax.federated.aggregation import apply_rank_mask


@dataclasses.dataclass(frozen=True)
class ClientDP:
    """Clipping norm and noise multiplier of each client's update (hashable: a static
    argument of the jitted round)."""

    clip: float
    noise_multiplier: float


def from_config(fl) -> ClientDP | None:
    """``fl.dp`` as a :class:`ClientDP` (None when off: ``clip`` 0), the noise multiplier
    calibrated to ``fl.dp.epsilon`` if that is set."""
    dp = fl.get("dp")
    if dp is None or not dp.clip:
        return None
    if dp.clip < 0:
        raise UserError(f"fl.dp.clip={dp.clip}: must be positive (0: no DP)")
    if not 0 < dp.delta < 1:
        raise UserError(f"fl.dp.delta={dp.delta}: must be in (0, 1)")
    if dp.epsilon:
        if dp.epsilon <= 0:
            raise UserError(f"fl.dp.epsilon={dp.epsilon}: must be positive")
        return ClientDP(float(dp.clip), calibrate(dp.epsilon, dp.delta, fl.rounds))
    if dp.noise_multiplier <= 0:
        raise UserError("fl.dp: give epsilon or a positive noise_multiplier with clip="
                        f"{dp.clip}")
    return ClientDP(float(dp.clip), float(dp.noise_multiplier))


def privatise(updated, start, masks, rngs: jax.Array, dp: ClientDP):
    """Clients' adapters ``[K, ...]`` as they may leave them: ``start + clip(updated -
    start) + noise``, noise within each client's rank (``masks`` ``[K, R]``; ``rngs``
    ``[K]``). ``updated``/``start`` may be dicts of adapters (every model a client trains,
    with a dict of masks): the update of all of them together is clipped (one mechanism per
    round, whatever the number of models)."""
    if isinstance(updated, dict):
        names = sorted(updated)
        masks = tuple(masks[n] for n in names)
        updated = tuple(updated[n] for n in names)
        start = tuple(start[n] for n in names)
        out = _privatise(updated, start, masks, rngs, dp)
        return dict(zip(names, out, strict=True))
    return _privatise(updated, start, masks, rngs, dp)


def _privatise(updated, start, masks, rngs, dp: ClientDP):
    def one(up, st, mask, rng):
        # What the client trained from: its start within its rank (update_clients masks it).
        st = _masked(st, mask)
        delta = jax.tree.map(jnp.subtract, up, st)
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                            for x in jax.tree.leaves(delta)))
        scale = jnp.minimum(1.0, dp.clip / jnp.maximum(norm, 1e-12))
        leaves, treedef = jax.tree.flatten(delta)
        keys = jax.random.split(rng, len(leaves))
        noisy = [x * scale + dp.noise_multiplier * dp.clip
                 * jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype)
                 for x, k in zip(leaves, keys, strict=True)]
        delta = _masked(jax.tree.unflatten(treedef, noisy), mask)
        return jax.tree.map(jnp.add, st, delta)

    return jax.vmap(one)(updated, start, masks, rngs)


def _masked(tree, mask):
    if isinstance(tree, tuple):  # several models, one mask each
        return tuple(apply_rank_mask(t, m) for t, m in zip(tree, mask, strict=True))
    return apply_rank_mask(tree, mask)


def spent(dp: ClientDP, participations: list[int], delta: float) -> dict:
    """The ``privacy`` record: the largest client epsilon after ``participations[k]``
    rounds of client ``k``, with the mechanism's settings."""
    return {"epsilon": epsilon(dp.noise_multiplier, max(participations), delta),
            "delta": delta, "noise_multiplier": dp.noise_multiplier, "clip": dp.clip}


@functools.lru_cache(maxsize=256)
def epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """A client's epsilon after taking part in ``rounds`` rounds."""
    from dp_accounting import GaussianDpEvent, SelfComposedDpEvent
    from dp_accounting.rdp import RdpAccountant

    if rounds == 0:
        return 0.0
    accountant = RdpAccountant()
    # Sensitivity 2 * clip (a client's data replaced): the multiplier per unit sensitivity.
    accountant.compose(SelfComposedDpEvent(GaussianDpEvent(noise_multiplier / 2), rounds))
    return float(accountant.get_epsilon(delta))


@functools.lru_cache(maxsize=16)  # the job, its validation and each client ask for it
def calibrate(target_epsilon: float, delta: float, rounds: int) -> float:
    """The smallest noise multiplier (to 1e-3) whose epsilon after ``rounds`` rounds is at
    most ``target_epsilon``."""
    from dp_accounting import GaussianDpEvent, SelfComposedDpEvent, calibrate_dp_mechanism
    from dp_accounting.rdp import RdpAccountant

    return float(calibrate_dp_mechanism(
        RdpAccountant,
        lambda sigma: SelfComposedDpEvent(GaussianDpEvent(sigma / 2), rounds),
        target_epsilon, delta, tol=1e-3))
