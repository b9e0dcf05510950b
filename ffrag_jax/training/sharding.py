"""Device mesh and partitioning rules.

One ``jax.sharding.Mesh`` with named axes ``clients`` (federated clients of a round), ``data``
(batch), ``fsdp`` (parameters sharded over the batch devices) and ``tensor`` (model
parallel). A single CPU is simply a mesh whose axes all have size 1.

Parameters get their :class:`PartitionSpec` from :data:`PARAM_RULES`, regexes on the ``/``-joined
pytree path matched with ``re.search``. Because they match the end of the path, the same rules
place optimizer state (``.../mu/layers/self_attn/q_proj/a``) like the tree it mirrors. A dimension
that the named mesh axis does not divide is replicated instead (tiny models on many devices).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ffrag_jax.errors import UserError

MESH_AXES = ("clients", "data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

_IN = r"(q_proj|k_proj|v_proj|gate_proj|up_proj)"  # column-parallel: shard the output dim
_OUT = r"(o_proj|down_proj)"  # row-parallel: shard the input dim

# (regex on the path, spec of the trailing dims); the first match wins. Leading dims such as
# the stacked-layer axis are never sharded.
PARAM_RULES: tuple[tuple[str, tuple], ...] = (
    (r"embed_tokens/embedding$", ("tensor", "fsdp")),
    (r"lm_head/kernel$", ("fsdp", "tensor")),
    (_IN + r"/kernel$", ("fsdp", "tensor")),
    (_OUT + r"/kernel$", ("tensor", "fsdp")),
    (_IN + r"/bias$", ("tensor",)),
    # LoRA a [in, r] follows the kernel's input dim, b [r, out] its output dim.
    (_IN + r"/a$", ("fsdp", None)),
    (_IN + r"/b$", (None, "tensor")),
    (_OUT + r"/a$", ("tensor", None)),
    (_OUT + r"/b$", (None, "fsdp")),
    (r".*", ()),
)


def make_mesh(axis_sizes: Mapping[str, int], devices=None) -> Mesh:
    """Mesh over ``devices`` (default: all) with :data:`MESH_AXES`.

    ``axis_sizes`` maps axis names to sizes; one axis may be -1 to take the remaining devices.
    Missing axes have size 1.
    """
    devices = list(jax.devices() if devices is None else devices)
    unknown = set(axis_sizes) - set(MESH_AXES)
    if unknown:
        raise UserError(f"unknown mesh axis {sorted(unknown)[0]!r}; axes: {', '.join(MESH_AXES)}")
    sizes = [int(axis_sizes.get(name, 1)) for name in MESH_AXES]
    if sizes.count(-1) > 1:
        raise UserError("at most one mesh axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    asked = dict(zip(MESH_AXES, sizes, strict=True))
    if -1 in sizes:
        if len(devices) % known:
            raise UserError(f"mesh {asked} does not divide {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    needed = int(np.prod(sizes))
    if needed > len(devices):
        raise UserError(f"mesh {asked} needs {needed} devices, {len(devices)} available")
    if needed < len(devices):
        # Fixed sizes that use fewer devices than exist run on the first ones (one GPU of a
        # node, or a 1-device reference run): allowed, but said, since it is rarely meant.
        logging.warning("mesh %s uses %d of %d devices", asked, needed, len(devices))
    return Mesh(np.asarray(devices[:needed]).reshape(sizes), MESH_AXES)


def path_str(path) -> str:
    """``'layers/self_attn/q_proj/kernel'`` from a ``jax.tree_util`` key path."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return "/".join(parts)


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh, rules=PARAM_RULES) -> PartitionSpec:
    """PartitionSpec of one array at ``path`` under ``rules``."""
    trailing = next(spec for pattern, spec in rules if re.search(pattern, path))
    trailing = tuple(trailing)[-len(shape) :] if shape else ()
    spec = [None] * (len(shape) - len(trailing)) + list(trailing)
    for i, axis in enumerate(spec):
        if axis is not None and shape[i] % mesh.shape[axis]:
            spec[i] = None
    return PartitionSpec(*spec)


def tree_shardings(tree, mesh: Mesh, rules=PARAM_RULES):
    """A tree of NamedSharding matching ``tree`` (arrays or ShapeDtypeStructs)."""

    def one(path, leaf):
        return NamedSharding(mesh, spec_for(path_str(path), tuple(np.shape(leaf)), mesh, rules))

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, ndim: int, batch_dim: int = 0) -> NamedSharding:
    """Shards dim ``batch_dim`` of an ``ndim``-array over the data-parallel axes."""
    spec = [None] * ndim
    spec[batch_dim] = BATCH_AXES
    return NamedSharding(mesh, PartitionSpec(*spec))


def on_one_device(tree):
    """``tree`` committed to the first local device with a plain single-device sharding.

    For the RAG jobs' host-driven loops: a jitted step whose inputs mix uncommitted arrays,
    mesh shardings and single-device ones compiles again once its outputs (committed) come
    back as inputs; everything committed one way compiles once."""
    return jax.device_put(tree, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard(tree, mesh: Mesh, rules=PARAM_RULES):
    """Places ``tree`` on ``mesh`` according to ``rules``."""
    return jax.device_put(tree, tree_shardings(tree, mesh, rules))
