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
from ffrag_jax.models.partitioning import BATCH_AXES  # one definition, for params and hints

MESH_AXES = ("clients", "data", "fsdp", "tensor")

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
    if needed < len(devices) and jax.process_count() > 1:
        raise UserError(f"mesh {asked} uses {needed} of the {len(devices)} devices of "
                        f"{jax.process_count()} processes; a multi-process run's mesh uses "
                        "them all (set one axis to -1)")
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
    if jax.process_count() > 1:  # a global array reaches this process's device via host
        tree = to_host(tree)
    return jax.device_put(tree, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))


def to_host(tree):
    """``tree``'s arrays as numpy arrays on every process, including arrays sharded over
    devices of several processes (gathered: a collective, so every process must call it,
    in the same order)."""
    def one(x):
        if not isinstance(x, jax.Array):
            return x
        if x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(x)
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


class _HostKeys:
    """A PRNG key array's key data on the host (numpy cannot hold typed keys)."""

    def __init__(self, data: np.ndarray, impl):
        self.data, self.impl = data, impl


def _host_copy(x):
    """The value of an array this process can read whole (local, or replicated), on the
    host; a PRNG key array as :class:`_HostKeys`."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return _HostKeys(np.asarray(jax.random.key_data(x)), jax.random.key_impl(x))
    return np.asarray(x)


def _place(x, s):
    """``jax.device_put(x, s)`` of a host value (key data placed, then typed again)."""
    if isinstance(x, _HostKeys):
        return jax.random.wrap_key_data(jax.device_put(x.data, s), impl=x.impl)
    return jax.device_put(x, s)


def put(tree, shardings):
    """``jax.device_put(tree, shardings)`` that also works when a sharding spans several
    processes: there an array that lives on this process (a numpy array, or a jax array on
    local devices) goes through host memory and each process places only its own shards.
    Every process holds the same values (the program is SPMD), so the pieces form one global
    array. One process: exactly ``jax.device_put``."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    local = lambda x: isinstance(x, jax.Array) and x.is_fully_addressable  # noqa: E731
    return jax.tree.map(lambda x, s: _place(_host_copy(x), s) if local(x) else
                        jax.device_put(x, s), tree, shardings)


def process_local_to_global(tree):
    """In a multi-process run, every array of ``tree`` that lives on this process only (a
    scalar the host made, a key) as the same value replicated over all devices: orbax saves
    only global arrays there. One process: ``tree`` itself."""
    if jax.process_count() == 1:
        return tree
    everywhere = NamedSharding(Mesh(np.asarray(jax.devices()), ("all",)), PartitionSpec())

    def one(x):
        local = isinstance(x, jax.Array) and x.is_fully_addressable
        return put(x, everywhere) if local else x

    return jax.tree.map(one, tree)


def global_to_process_local(tree, like):
    """The inverse of :func:`process_local_to_global`: each array of ``tree`` whose
    counterpart in ``like`` lives on this process only goes back to ``like``'s placement
    (a restored checkpoint continues exactly like the run that saved it)."""
    if jax.process_count() == 1:
        return tree

    def one(x, ref):
        if isinstance(ref, jax.Array) and ref.is_fully_addressable:
            return _place(_host_copy(x), ref.sharding)  # x is replicated: readable whole
        return x

    return jax.tree.map(one, tree, like)


def shard(tree, mesh: Mesh, rules=PARAM_RULES):
    """Places ``tree`` on ``mesh`` according to ``rules``."""
    return put(tree, tree_shardings(tree, mesh, rules))
