"""What crosses the wire between the Flower server and its clients: pytrees of arrays as
Flower ``ArrayRecord``s (keyed by their tree paths), the run's config as JSON, and the checks
a received tree must pass before anything computes with it.

A tree is sent as ``{path: array}`` (adapters in the run's payload codec, ``fl.payload``:
:func:`encode`, :func:`decode`) and read back into the structure the receiver expects
(``like``: a tree of the same structure, or of ``jax.ShapeDtypeStruct``), never into a
structure the sender chose: a client that sends other paths, shapes or dtypes is refused with
the first difference named.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from flwr.app import Array, ArrayRecord
from ml_collections import ConfigDict


class RefusedUpdate(ValueError):
    """A received tree that fails validation (its message names the party and the reason)."""


def _paths(tree) -> list[tuple[str, object]]:
    return [(jax.tree_util.keystr(p), leaf)
            for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def to_record(tree) -> ArrayRecord:
    """``tree``'s leaves as an ``ArrayRecord`` keyed by their tree paths (host numpy)."""
    return ArrayRecord({path: Array(np.asarray(leaf)) for path, leaf in _paths(tree)})


def from_record(record: ArrayRecord, like, *, who: str = "a client"):
    """The tree of ``like``'s structure held in ``record`` (:func:`to_record`); a
    :class:`RefusedUpdate` naming ``who`` for a missing or extra path, or a shape or dtype
    other than ``like``'s."""
    expected = _paths(like)
    keys = set(record.keys())
    missing = [p for p, _ in expected if p not in keys]
    if missing:
        raise RefusedUpdate(f"{who} sent no {missing[0]} ({len(missing)} arrays missing)")
    extra = sorted(keys - {p for p, _ in expected})
    if extra:
        raise RefusedUpdate(f"{who} sent an unexpected array {extra[0]}")
    leaves = []
    for path, ref in expected:
        value = record[path].numpy()
        if tuple(value.shape) != tuple(ref.shape):
            raise RefusedUpdate(f"{who} sent {path} of shape {tuple(value.shape)}, expected "
                                f"{tuple(ref.shape)}")
        if np.dtype(value.dtype) != np.dtype(ref.dtype):
            raise RefusedUpdate(f"{who} sent {path} as {value.dtype}, expected {ref.dtype}")
        leaves.append(value)
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def encode(tree, codec) -> ArrayRecord:
    """``tree`` as it travels in ``codec`` (``fl.payload``): its encoded leaves (int8: ``q``
    and ``scale`` per leaf; fp16/bf16: the cast values) as a record."""
    return to_record(jax.tree.map(np.asarray, codec.encode(tree)))


def decode(record: ArrayRecord, like, codec, *, who: str = "a client"):
    """The tree of ``like``'s structure, shapes and dtypes that :func:`encode` sent: the
    payload checked against what ``codec`` makes of ``like`` (a :class:`RefusedUpdate`
    naming ``who`` otherwise), then decoded."""
    payload = from_record(record, jax.eval_shape(codec.encode, like), who=who)
    return jax.tree.map(np.asarray, codec.decode(payload, like))


def config_to_json(config: ConfigDict) -> str:
    return config.to_json_best_effort(sort_keys=True)


def config_from_json(text: str) -> ConfigDict:
    """The config :func:`config_to_json` wrote (JSON lists back to the tuples configs use)."""
    def tuples(x):
        if isinstance(x, dict):
            return {k: tuples(v) for k, v in x.items()}
        if isinstance(x, list):
            return tuple(tuples(v) for v in x)
        return x
    return ConfigDict(tuples(json.loads(text)))


def fingerprint(config: ConfigDict) -> str:
    """A short hash of the config: server and clients compare it to refuse a client run with
    another config."""
    import hashlib

    return hashlib.sha256(config_to_json(config).encode()).hexdigest()[:16]
