"""Vector indexes: exact (jitted, blocked top-k) and ScaNN (tree + asymmetric hashing + exact
reorder), with one interface: ``search(queries [Q, D], k) -> (scores [Q, k], ids [Q, k])``.

Metrics: ``dot`` (inner product) and ``cosine`` (vectors and queries are L2-normalised, then
inner product). :func:`build` picks exact search below :data:`EXACT_BELOW` vectors (where
brute force is as fast and has recall 1) and ScaNN above, unless told. ScaNN settings follow
its own guidance (``scann/docs/algorithms.md``): ``num_leaves ~ sqrt(n)``, a training sample of
up to 250k vectors, asymmetric hashing with 2 dimensions per block and anisotropic threshold
0.2, and an exact reorder of ``10 * k`` (at least 100) candidates.

An index saves to and loads from a folder (``save`` / :func:`load`). ``k`` larger than the
number of vectors returns every vector (ids -1 and scores -inf fill the rest).
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ffrag_jax import files
from ffrag_jax.errors import UserError

METRICS = ("dot", "cosine")
EXACT_BELOW = 20_000
_BLOCK = 16_384  # corpus rows scored at once by the exact search (scores stay ~Q x 16k)


def _check_vectors(x: np.ndarray, what: str, dim: int | None = None) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise UserError(f"{what} must be a 2-D array [n, d], got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise UserError(f"{what} have dimension {x.shape[1]}, the index has {dim}")
    if not np.isfinite(x).all():
        raise UserError(f"{what} contain NaN or inf")
    return x.astype(np.float32, copy=False)


def normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("k", "block"))
def exact_top_k(queries: jax.Array, vectors: jax.Array, k: int, block: int = _BLOCK
                ) -> tuple[jax.Array, jax.Array]:
    """Exact inner-product top-``k``: ``(scores [Q, k], ids [Q, k])``, best first.

    The corpus is scored block by block (``lax.scan``) with a running top-k, so memory is
    ``Q x block`` scores rather than ``Q x N``. Ties keep the lower id first.
    """
    n, d = vectors.shape
    num_blocks = -(-n // block)
    padded = jnp.pad(vectors, ((0, num_blocks * block - n), (0, 0)))
    blocks = padded.reshape(num_blocks, block, d)
    q = queries.shape[0]
    init = (jnp.full((q, k), -jnp.inf, jnp.float32), jnp.full((q, k), -1, jnp.int32))

    def step(carry, xs):
        best_scores, best_ids = carry
        i, rows = xs
        scores = jnp.einsum("qd,nd->qn", queries, rows, preferred_element_type=jnp.float32)
        ids = i * block + jnp.arange(block, dtype=jnp.int32)
        scores = jnp.where(ids[None] < n, scores, -jnp.inf)
        # Running best first, so equal scores keep the lower (earlier) id.
        scores = jnp.concatenate([best_scores, scores], axis=1)
        ids = jnp.concatenate([best_ids, jnp.broadcast_to(ids, (q, block))], axis=1)
        top, where = jax.lax.top_k(scores, k)
        return (top, jnp.take_along_axis(ids, where, axis=1)), None

    (scores, ids), _ = jax.lax.scan(step, init, (jnp.arange(num_blocks), blocks))
    return scores, jnp.where(jnp.isfinite(scores), ids, -1)


class ExactIndex:
    """Brute-force search (jitted); recall 1 by construction."""

    kind = "exact"

    def __init__(self, vectors: np.ndarray, metric: str = "dot"):
        if metric not in METRICS:
            raise UserError(f"metric {metric!r}; choose one of {', '.join(METRICS)}")
        vectors = _check_vectors(vectors, "vectors")
        if len(vectors) == 0:
            raise UserError("cannot build an index over zero vectors")
        self.metric = metric
        self.vectors = normalize(vectors) if metric == "cosine" else vectors
        self._device_vectors = jnp.asarray(self.vectors)

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def search(self, queries: np.ndarray, k: int, *, batch_size: int = 256
               ) -> tuple[np.ndarray, np.ndarray]:
        queries = _prepare_queries(self, queries, k)
        kk = min(k, len(self))
        scores, ids = [], []
        for start in range(0, len(queries), batch_size):
            chunk = queries[start : start + batch_size]
            real = len(chunk)
            # Padded to a power of two (at most batch_size): a few compiled shapes whatever
            # the number of queries, instead of one per count.
            rows = min(batch_size, 1 << (real - 1).bit_length())
            if real < rows:
                chunk = np.concatenate([chunk, np.zeros((rows - real, self.dim), np.float32)])
            s, i = exact_top_k(jnp.asarray(chunk), self._device_vectors, kk,
                               min(_BLOCK, len(self)))
            scores.append(np.asarray(s)[:real])
            ids.append(np.asarray(i)[:real])
        return _pad_k(np.concatenate(scores), np.concatenate(ids), k)

    def save(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "vectors.npy", self.vectors)
        _write_meta(folder, {"kind": "exact", "metric": self.metric, "count": len(self),
                             "dim": self.dim})


class ScannIndex:
    """ScaNN: partitioning tree, asymmetric hashing, exact reorder (see module docstring)."""

    kind = "scann"

    def __init__(self, vectors: np.ndarray, metric: str = "dot", *, k: int = 10,
                 num_leaves: int | None = None, num_leaves_to_search: int | None = None,
                 reorder: int | None = None, training_sample_size: int = 250_000,
                 _searcher=None, _count: int | None = None, _dim: int | None = None):
        if metric not in METRICS:
            raise UserError(f"metric {metric!r}; choose one of {', '.join(METRICS)}")
        self.metric = metric
        if _searcher is not None:  # loaded from disk
            self.searcher, self.count, self._dim = _searcher, _count, _dim
            self.settings = {}
            return
        scann_ops = _scann()
        vectors = _check_vectors(vectors, "vectors")
        n = len(vectors)
        if n == 0:
            raise UserError("cannot build an index over zero vectors")
        if metric == "cosine":
            vectors = normalize(vectors)
        num_leaves = num_leaves or max(1, min(int(math.sqrt(n)), n // 2 or 1))
        num_leaves_to_search = num_leaves_to_search or max(1, math.ceil(num_leaves / 10))
        reorder = reorder or max(100, 10 * k)
        self.settings = dict(num_leaves=num_leaves, num_leaves_to_search=num_leaves_to_search,
                             reorder=reorder, training_sample_size=min(training_sample_size, n),
                             dimensions_per_block=2, anisotropic_quantization_threshold=0.2)
        builder = scann_ops.builder(vectors, k, "dot_product")
        if num_leaves > 1:
            builder = builder.tree(num_leaves=num_leaves,
                                   num_leaves_to_search=num_leaves_to_search,
                                   training_sample_size=min(training_sample_size, n))
        self.searcher = (builder.score_ah(2, anisotropic_quantization_threshold=0.2)
                         .reorder(reorder).build())
        self.count, self._dim = n, vectors.shape[1]

    def __len__(self) -> int:
        return self.count

    @property
    def dim(self) -> int:
        return self._dim

    def search(self, queries: np.ndarray, k: int, *, batch_size: int = 256,
               leaves_to_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`ExactIndex.search`; ``leaves_to_search`` overrides the built setting
        (more leaves: higher recall, fewer queries/s). Queries run on all cores."""
        queries = _prepare_queries(self, queries, k)
        kk = min(k, len(self))
        ids, scores = self.searcher.search_batched_parallel(
            queries, final_num_neighbors=kk, batch_size=batch_size,
            leaves_to_search=leaves_to_search)
        ids = np.asarray(ids, np.int64).astype(np.int32)
        scores = np.asarray(scores, np.float32)
        # ScaNN may return fewer than kk hits for a query (few leaves searched): mark them.
        ids = np.where(np.isfinite(scores), ids, -1)
        return _pad_k(scores, ids, k)

    def save(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "scann").mkdir(exist_ok=True)
        self.searcher.serialize(str(folder / "scann"))
        _write_meta(folder, {"kind": "scann", "metric": self.metric, "count": len(self),
                             "dim": self.dim, "settings": self.settings})


def _scann():
    try:
        from scann import scann_ops_pybind
    except ImportError:
        raise UserError("ScaNN is not installed (pip install scann; Linux only); use "
                        "kind='exact'") from None
    return scann_ops_pybind


def _prepare_queries(index, queries: np.ndarray, k: int) -> np.ndarray:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise UserError(f"k must be a positive integer, got {k!r}")
    queries = _check_vectors(queries, "queries", index.dim)
    return normalize(queries) if index.metric == "cosine" else queries


def _pad_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``k`` columns: a k above the corpus size gets ids -1 and scores -inf after the real
    hits."""
    missing = k - scores.shape[1]
    if missing > 0:
        scores = np.pad(scores, ((0, 0), (0, missing)), constant_values=-np.inf)
        ids = np.pad(ids, ((0, 0), (0, missing)), constant_values=-1)
    return scores, ids


def _write_meta(folder: Path, meta: dict) -> None:
    files.atomic_write_json(folder / "index.json", meta)


def build(vectors: np.ndarray, metric: str = "dot", kind: str = "auto", **scann_options):
    """An :class:`ExactIndex` or :class:`ScannIndex` (``kind='auto'``: ScaNN from
    :data:`EXACT_BELOW` vectors up)."""
    if kind not in ("auto", "exact", "scann"):
        raise UserError(f"index kind {kind!r}; choose auto, exact or scann")
    if kind == "exact" or (kind == "auto" and len(vectors) < EXACT_BELOW):
        return ExactIndex(vectors, metric)
    return ScannIndex(vectors, metric, **scann_options)


def load(folder: str | os.PathLike):
    """The index saved in ``folder``."""
    folder = Path(folder)
    meta_file = folder / "index.json"
    if not meta_file.exists():
        raise UserError(f"{folder}: no index.json (not a saved index)")
    meta = json.loads(meta_file.read_text())
    if meta["kind"] == "exact":
        index = ExactIndex.__new__(ExactIndex)
        index.metric = meta["metric"]
        index.vectors = np.load(folder / "vectors.npy")
        index._device_vectors = jnp.asarray(index.vectors)
        return index
    searcher = _scann().load_searcher(str(folder / "scann"))
    index = ScannIndex(None, meta["metric"], _searcher=searcher, _count=meta["count"],
                       _dim=meta["dim"])
    index.settings = meta.get("settings", {})
    return index
