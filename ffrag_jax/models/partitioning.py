"""Activation sharding hints for the model code, active only under ``jax.set_mesh(mesh)``.

Parameters get their placement from :mod:`ffrag_jax.training.sharding`; activations would get
theirs from XLA's propagation alone, which inside a vmapped, scanned, rematerialised step
often settles on replicating the batch: every device then holds the whole batch's
activations (the AOT table of ``bench/aot_memory.py`` grew with the device count before these
hints). The hints pin the batch dimension to the data-parallel axes, and the vmapped client
dimension to ``clients`` (``jax.vmap(..., spmd_axis_name=...)``, :func:`client_axis`).
Outside a mesh, or where the mesh does not divide the batch, they do nothing; they never
change a value.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import PartitionSpec

BATCH_AXES = ("data", "fsdp")


def _mesh():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def shard_batch(x: jax.Array) -> jax.Array:
    """``x`` ``[B, ...]`` constrained to ``B`` over ``data`` x ``fsdp`` of the current mesh."""
    mesh = _mesh()
    if mesh is None or not set(BATCH_AXES) <= set(mesh.axis_names):
        return x
    size = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if size == 1 or x.shape[0] % size:
        return x
    return jax.lax.with_sharding_constraint(
        x, PartitionSpec(BATCH_AXES, *([None] * (x.ndim - 1))))


def client_axis() -> str | None:
    """``"clients"`` when the current mesh has that axis (the ``spmd_axis_name`` of a vmap
    over clients, so hints inside it keep each client on its devices), else None."""
    mesh = _mesh()
    return "clients" if mesh is not None and "clients" in mesh.axis_names else None
