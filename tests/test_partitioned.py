"""Partitioned (IVF) index: exact when every block is searched, recall when not, the layout,
the MIPS transform and the settings (NumPy references throughout)."""

import numpy as np
import pytest
import tensorflow as tf

from fm_keras.errors import ExportError
from fm_keras.partitioned import (PartitionedIndex, PartitionedParams, augment, bisect,
                                  block_slots, inner_products, partition)


def _vectors(n, d=11, seed=0, clusters=40):
    """FM-like item vectors: clustered, first component a bias spread over a wide range."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (clusters, d))
    x = centers[rng.integers(0, clusters, n)] + rng.normal(0, 0.4, (n, d))
    x[:, 0] = rng.normal(0, 2, n)
    return x.astype(np.float32)


def _queries(b, d=11, seed=1):
    rng = np.random.default_rng(seed)
    return np.concatenate([np.ones((b, 1)), rng.normal(0, 1, (b, d - 1))], 1).astype(np.float32)


def _exact(queries, vectors, k):
    scores = queries @ vectors.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), order


@pytest.mark.parametrize("n,parts,k,quantize", [(500, 7, 10, None), (3000, 20, 50, None),
                                                (3000, 20, 50, "int8"), (37, 3, 37, None)])
def test_searching_every_block_is_exact(n, parts, k, quantize):
    """All blocks searched (and, quantized, a shortlist of every item) -> the ids and scores of
    exact search, as brute force returns them."""
    vectors, queries = _vectors(n), _queries(16)
    params = PartitionedParams(num_partitions=parts, partitions_to_search=10 * n,
                               quantize=quantize, rescore=n)
    scores, ids = PartitionedIndex(vectors, params).search(tf.constant(queries), k)
    want_scores, want_ids = _exact(queries, vectors, k)
    np.testing.assert_array_equal(ids.numpy(), want_ids)
    np.testing.assert_allclose(scores.numpy(), want_scores, rtol=1e-5, atol=1e-5)


def test_partial_search_recall_against_exact():
    """30k clustered vectors, a few % of the blocks searched: recall@100 by score (ties are not
    errors) against NumPy exact search; the quantized index with a shortlist of 1000 as well."""
    vectors, queries = _vectors(30_000, clusters=200), _queries(200)
    params = PartitionedParams.for_catalog(len(vectors), 100)
    assert params.num_partitions <= len(vectors) / 100
    kth = _exact(queries, vectors, 100)[0][:, -1:]
    for quantize in (None, "int8"):
        index = PartitionedIndex(vectors, PartitionedParams(
            params.num_partitions, params.partitions_to_search, quantize, 1000))
        got, _ = index.search(tf.constant(queries), 100)
        recall = np.mean(np.sum(got.numpy() >= kth - 1e-4, axis=1) / 100)
        assert recall >= 0.95, (quantize, recall)


def test_layout_holds_every_item_once():
    vectors = _vectors(5000)
    centroids, blocks, ids = partition(vectors, 30, seed=0)
    real = ids[ids >= 0]
    assert sorted(real.tolist()) == list(range(5000))
    assert blocks.shape == (len(ids), ids.shape[1], 11) and centroids.shape == (len(ids), 11)
    np.testing.assert_array_equal(blocks[ids >= 0], vectors[real])
    assert np.all(blocks[ids < 0] == 0)
    assert ids.shape[1] == block_slots(5000, 30) == 48  # a quarter of 5000 / 30, to 8s
    means = np.array([vectors[row[row >= 0]].mean(axis=0) for row in ids])
    np.testing.assert_allclose(centroids, means, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m,size", [(1, 8), (128, 128), (129, 128), (256, 200), (1001, 128),
                                    (4999, 64)])
def test_bisect_cuts_balanced_compact_blocks(m, size):
    """ceil(m / size) blocks of at most `size` items, sizes within one item of each other, every
    member once; each cut is along the principal axis (two separated clouds stay apart)."""
    rng = np.random.default_rng(0)
    points = rng.normal(0, 1, (m, 4))
    points[: m // 2, 0] += 50.0  # two clouds far apart along the first axis
    blocks = bisect(points, np.arange(m), size)
    sizes = [len(b) for b in blocks]
    assert len(blocks) == -(-m // size) and max(sizes) <= size and max(sizes) - min(sizes) <= 1
    assert sorted(np.concatenate(blocks).tolist()) == list(range(m))
    if len(blocks) == 2 and m % 2 == 0:
        assert {tuple(np.sort(b)) for b in blocks} == {tuple(range(m // 2)),
                                                       tuple(range(m // 2, m))}


def test_augment_turns_inner_products_into_distances():
    """Bachrach et al. 2014: all rows have norm 1, and for a query [q, 0] the nearest item is
    the one with the largest inner product."""
    vectors, q = _vectors(2000), _queries(5)
    aug = augment(vectors)
    np.testing.assert_allclose(np.linalg.norm(aug, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(aug[:, :-1] * np.linalg.norm(vectors, axis=1).max(), vectors,
                               rtol=1e-4, atol=1e-4)
    query = np.concatenate([q, np.zeros((5, 1), np.float32)], 1)
    distance = ((query[:, None, :] - aug[None, :, :]) ** 2).sum(-1)
    np.testing.assert_array_equal(distance.argmin(1), (q @ vectors.T).argmax(1))


def test_fewer_items_than_k_and_large_k():
    """k beyond the catalog: every item once, in order; the rest of k is not invented."""
    vectors, queries = _vectors(30), _queries(3)
    index = PartitionedIndex(vectors, PartitionedParams(num_partitions=4, partitions_to_search=1))
    scores, ids = index.search(tf.constant(queries), 50)
    want_scores, want_ids = _exact(queries, vectors, 30)
    got = ids.numpy()
    assert got.shape[1] >= 30
    np.testing.assert_array_equal(got[:, :30], want_ids)
    assert np.all(got[:, 30:] == -1) and np.all(np.isneginf(scores.numpy()[:, 30:]))


def test_enough_blocks_are_searched_for_k():
    """One block searched but k larger than a block: the search widens until k items."""
    vectors, queries = _vectors(4000), _queries(4)
    index = PartitionedIndex(vectors, PartitionedParams(num_partitions=40, partitions_to_search=1))
    _, ids = index.search(tf.constant(queries), 400)
    assert np.all(ids.numpy() >= 0) and ids.shape == (4, 400)
    assert all(len(set(row)) == 400 for row in ids.numpy())


def test_settings_by_catalog_and_checks():
    small = PartitionedParams.for_catalog(5000, 100)
    assert small.partitions_to_search >= small.num_partitions  # exact
    big = PartitionedParams.for_catalog(1_000_000, 100)
    assert big.num_partitions == 2000 and big.partitions_to_search < big.num_partitions
    assert big.partitions_to_search * block_slots(1_000_000, 2000) == 32 * 128  # 40 slots per k
    with pytest.raises(ExportError, match="--quantize"):
        PartitionedParams(10, 2, quantize="int4")
    with pytest.raises(ExportError, match="at least 1"):
        PartitionedParams(0, 2)
    with pytest.raises(ExportError, match="finite"):
        PartitionedIndex(np.full((10, 3), np.nan, np.float32), PartitionedParams(2, 2))


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_search_excluding_masks_before_the_top_k(quantize):
    """Excluded items never come back and the rest is the exact top k of the others (every
    block searched); -1 in the exclusions means none."""
    vectors, queries = _vectors(800), _queries(4)
    index = PartitionedIndex(vectors, PartitionedParams(8, 100, quantize, 800))
    full = _exact(queries, vectors, 800)[1]
    excluded = np.stack([full[:, 0], full[:, 2], np.full(4, -1)], axis=1).astype(np.int32)
    scores, ids = index.search_excluding(tf.constant(queries), 10, tf.constant(excluded))
    for b in range(4):
        want = [i for i in full[b] if i not in excluded[b]][:10]
        np.testing.assert_array_equal(ids.numpy()[b], want)
    everything = np.tile(np.arange(800, dtype=np.int32), (4, 1))
    _, ids = index.search_excluding(tf.constant(queries), 10, tf.constant(everything))
    assert np.all(ids.numpy() == -1)


def test_inner_products_matches_numpy():
    rng = np.random.default_rng(0)
    rows, queries = rng.normal(size=(3, 50, 11)), rng.normal(size=(3, 11))
    got = inner_products(tf.constant(rows, tf.float32), tf.constant(queries, tf.float32))
    np.testing.assert_allclose(got.numpy(), np.einsum("bmd,bd->bm", rows, queries), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_search_graph_has_no_batch_matmul_nor_shape_arithmetic(quantize):
    """Regression (issue 16): oneDNN's BatchMatMulV2 took ~430 us of a single-user call for the
    block scores; with k known at tracing, every shape but the batch is static."""
    index = PartitionedIndex(_vectors(3000), PartitionedParams(20, 4, quantize, 200))
    fn = tf.function(lambda q: index.search(q, 50),
                     input_signature=[tf.TensorSpec([None, 11], tf.float32)])
    ops = {op.type for op in fn.get_concrete_function().graph.get_operations()}
    assert not ops & {"BatchMatMulV2", "BatchMatMulV3", "Einsum", "Shape", "Minimum"}, ops
    assert {"MatMul", "TopKV2", "ResourceGather", "Sum"} <= ops
