"""Vector indexes: the jitted exact top-k against numpy and ScaNN's brute-force mode, ScaNN's
approximate index recall against exact search, save/load round trips, bad input."""

import numpy as np
import pytest

from ffrag_jax.errors import UserError
from ffrag_jax.retrieval import index as index_lib


def clustered(n, d=32, clusters=50, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, d))
    return (centers[rng.integers(0, clusters, n)] + 0.3 * rng.normal(size=(n, d))
            ).astype(np.float32)


@pytest.mark.parametrize("n,k,block", [(1000, 10, 256), (777, 5, 100), (50, 8, 64)])
def test_exact_top_k_matches_numpy(n, k, block):
    vectors, queries = clustered(n), clustered(40, seed=1)
    scores, ids = index_lib.exact_top_k(queries, vectors, k, block)
    full = queries @ vectors.T
    ref_ids = np.argsort(-full, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(np.asarray(ids), ref_ids)
    np.testing.assert_allclose(np.asarray(scores), np.take_along_axis(full, ref_ids, 1),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", ["dot", "cosine"])
def test_exact_index_matches_scann_brute_force(metric):
    from scann import scann_ops_pybind

    vectors, queries = clustered(3000), clustered(64, seed=2)
    ours_scores, ours_ids = index_lib.ExactIndex(vectors, metric).search(queries, 10)
    if metric == "cosine":
        vectors, queries = index_lib.normalize(vectors), index_lib.normalize(queries)
    ref = scann_ops_pybind.builder(vectors, 10, "dot_product").score_brute_force().build()
    ref_ids, ref_scores = ref.search_batched(queries)
    np.testing.assert_array_equal(ours_ids, ref_ids.astype(np.int32))
    np.testing.assert_allclose(ours_scores, ref_scores, rtol=1e-5, atol=1e-5)


def test_scann_recall_against_exact_and_round_trip(tmp_path):
    vectors, queries = clustered(30_000, d=64), clustered(200, d=64, seed=3)
    scann = index_lib.build(vectors, "dot")
    assert isinstance(scann, index_lib.ScannIndex)
    assert scann.settings["num_leaves"] == int(np.sqrt(30_000))
    _, exact_ids = index_lib.ExactIndex(vectors).search(queries, 10)
    _, ids = scann.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact_ids, strict=True)])
    assert recall >= 0.95, recall
    scann.save(tmp_path / "scann")
    loaded = index_lib.load(tmp_path / "scann")
    np.testing.assert_array_equal(loaded.search(queries, 10)[1], ids)


def test_exact_round_trip_k_beyond_corpus_and_bad_input(tmp_path):
    vectors = clustered(12)
    exact = index_lib.build(vectors, "cosine")
    assert isinstance(exact, index_lib.ExactIndex)
    scores, ids = exact.search(vectors[:3], 20)  # k > n: every vector, then -1 / -inf
    assert ids.shape == (3, 20) and (ids[:, 12:] == -1).all() and np.isneginf(scores[:, 12:]).all()
    assert sorted(ids[0, :12]) == list(range(12)) and ids[0, 0] == 0
    exact.save(tmp_path / "exact")
    again = index_lib.load(tmp_path / "exact")
    for a, b in zip(again.search(vectors, 5), exact.search(vectors, 5), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(UserError, match="k must be a positive integer"):
        exact.search(vectors, 0)
    with pytest.raises(UserError, match="queries have dimension 16, the index has 32"):
        exact.search(np.zeros((2, 16)), 3)
    with pytest.raises(UserError, match="queries contain NaN"):
        exact.search(np.full((1, 32), np.nan), 3)
    with pytest.raises(UserError, match="zero vectors"):
        index_lib.build(np.zeros((0, 32)))
    with pytest.raises(UserError, match="no index.json"):
        index_lib.load(tmp_path)
