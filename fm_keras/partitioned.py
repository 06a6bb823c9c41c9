"""A partitioned (IVF) recall index that searches with stock TensorFlow ops only.

Building may use any library; serving may not. At build time the item vectors are partitioned
by k-means (scikit-learn's trainer) and laid out for gathering; the search graph is

    queries [B, d] -> block scores [B, P] -> top-n blocks -> gather them [B, n * S, d]
        -> exact inner products [B, n * S] -> tf.math.top_k

(MatMul, TopKV2, GatherV2, BatchMatMulV2, Cast, SelectV2, ...: every op is in stock TensorFlow,
so the export serves on the stock TF Serving image, Triton's TensorFlow backend or TF Java).
This is the inverted-file index (IVF) of Jegou et al., "Product quantization for nearest
neighbor search", TPAMI 2011, used for maximum inner product search (MIPS).

MIPS and k-means: partitions trained on inner products gather items around a direction, and an
item with a large norm (a popular item: its first component is L_I + P_I) can sit in a
partition whose centroid is far from the query. The index therefore partitions the items after
the MIPS -> nearest-neighbour reduction of Bachrach et al., "Speeding up the Xbox recommender
system using a Euclidean transformation for inner-product spaces", RecSys 2014: every item x
gets an extra coordinate sqrt(M^2 - |x|^2) (M = the largest norm), so all items have norm M and
the nearest neighbour of [q, 0] is the item with the largest q . x. k-means runs on those
vectors and a query picks the partitions nearest to [q/|q|, 0] in that space (BENCHMARKS.md
measures it against plain k-means with inner-product partition scores).

Layout: a k-means partition larger than the block size S is cut along its principal axis into
several blocks, each with its own centroid; every block is padded to S slots (id -1). Optional
int8 quantization of the blocks (one scale per dimension) scores a shortlist approximately and
re-scores it exactly with the float vectors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fm_keras._tf import tf
from fm_keras.errors import ExportError

QUANTIZE = (None, "int8")


@dataclass(frozen=True)
class PartitionedParams:
    """Settings of a partitioned (IVF) index.

    Attributes:
        num_partitions: k-means partitions trained over the catalog.
        partitions_to_search: blocks searched per query (the recall / speed knob).
        quantize: None (float32 blocks) or "int8" (a quarter of the bytes gathered; the
            shortlist is re-scored exactly).
        rescore: shortlist size re-scored with the float vectors when quantized (at least k).
        training_sample_size: items k-means is trained on (all items are then assigned).
    """

    num_partitions: int
    partitions_to_search: int
    quantize: str | None = None
    rescore: int = 0
    training_sample_size: int = 100_000

    def __post_init__(self):
        if self.num_partitions < 1 or self.partitions_to_search < 1:
            raise ExportError(f"partitions ({self.num_partitions}) and partitions to search "
                              f"({self.partitions_to_search}) must be at least 1")
        if self.quantize not in QUANTIZE:
            raise ExportError(f"--quantize must be one of {QUANTIZE[1:]} or left out, "
                              f"got {self.quantize!r}")
        if self.rescore < 0:
            raise ExportError(f"--rescore must be at least 0, got {self.rescore}")

    @classmethod
    def for_catalog(cls, n: int, k: int) -> PartitionedParams:
        """Settings by catalog size (n items, top k); every block is searched below 20k items
        (exact search). Tuned on a 1M-item catalog, BENCHMARKS.md."""
        if n <= 20_000:
            parts = max(1, min(64, n // 256))
            return cls(num_partitions=parts, partitions_to_search=4 * parts)
        parts = int(min(max(2 * math.sqrt(n), 100), n / 100))
        return cls(num_partitions=parts, partitions_to_search=max(20, parts // 64),
                   rescore=max(10 * k, 1000))


class PartitionedIndex(tf.Module):
    """IVF index for maximum inner product search; `search` uses stock TensorFlow ops only.

    Args:
        vectors: item vectors [N, d] float32 (row i is item index i).
        params: the partitioning and search settings.
        seed: k-means seed (the layout is deterministic for a seed).

    Raises:
        ExportError: no items, or vectors that are not finite.
    """

    def __init__(self, vectors: np.ndarray, params: PartitionedParams, seed: int = 0):
        super().__init__(name="partitioned_index")
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim != 2 or len(vectors) == 0 or not np.all(np.isfinite(vectors)):
            raise ExportError(f"item vectors must be a finite [N, d] array with N >= 1, got "
                              f"shape {vectors.shape}")
        self.params = params
        centroids, blocks, ids = partition(vectors, params.num_partitions,
                                           params.training_sample_size, seed)
        # Probing m blocks holds at least k items when the m smallest blocks hold k.
        self._fill_cumsum = np.cumsum(np.sort((ids >= 0).sum(axis=1))).astype(np.int32)
        self.fill_cumsum = tf.constant(self._fill_cumsum)
        # A block's distance to [q/|q|, 0] in the augmented space ranks as q.c/|q| - |c|^2/2.
        self.centroids = tf.Variable(centroids[:, :-1], trainable=False, name="centroids")
        self.centroid_bias = tf.Variable(-0.5 * np.sum(np.square(centroids), axis=1),
                                         trainable=False, name="centroid_bias")
        self.block_ids = tf.Variable(ids, trainable=False, name="block_ids")
        self._quantized = params.quantize == "int8"
        if self._quantized:
            scale = np.maximum(np.abs(vectors).max(axis=0), 1e-30) / 127.0
            self.scale = tf.Variable(scale.astype(np.float32), trainable=False, name="scale")
            self.blocks = tf.Variable(np.round(blocks / scale).astype(np.int8), trainable=False,
                                      name="blocks_int8")
            self.vectors = tf.Variable(vectors, trainable=False, name="item_vectors")
        else:
            self.blocks = tf.Variable(blocks, trainable=False, name="blocks")
        self._probe = min(params.partitions_to_search, len(centroids))
        self._rescore = params.rescore

    @property
    def num_blocks(self) -> int:
        return int(self.block_ids.shape[0])

    @property
    def block_size(self) -> int:
        return int(self.block_ids.shape[1])

    def search(self, queries, k):
        """queries [B, d] float32, k scalar -> (scores [B, k'], indices [B, k'] int32).

        k' = min(k, items in the searched blocks); slots without an item (fewer than k items
        in the catalog) have index -1 and score -inf.
        """
        scores, ids = self._candidates(queries, k)
        if self._quantized:
            return self._rescored(queries, scores, ids, k)
        return _top_k(scores, ids, k)

    def search_excluding(self, queries, k, excluded):
        """`search` without the items `excluded` [B, n] int32 (item indices, -1 = none).

        The excluded items are masked among the candidates before the top k, so the search
        reads as many blocks as without exclusions (not k + n results as for other indexes).
        """
        scores, ids = self._candidates(queries, k)
        ids = tf.where(is_member(ids, excluded), -1, ids)
        if self._quantized:
            return self._rescored(queries, scores, ids, k)
        return _top_k(scores, ids, k)

    def _candidates(self, queries, k):
        """Scores [B, n * S] (exact, or int8-approximate) and item indices of the searched
        blocks."""
        # (Few ops: on a single query the search costs about one dispatch per op.)
        inverse_norm = tf.math.rsqrt(tf.maximum(
            tf.reduce_sum(tf.square(queries), axis=1, keepdims=True), 1e-30))
        near = (tf.matmul(queries, self.centroids, transpose_b=True) * inverse_norm
                + self.centroid_bias)  # [B, P]
        _, chosen = tf.math.top_k(near, k=self._blocks_for(k))  # [B, n]
        batch = tf.shape(queries)[0]
        ids = tf.reshape(tf.gather(self.block_ids, chosen), [batch, -1])  # [B, n * S]
        blocks = tf.reshape(tf.gather(self.blocks, chosen), [batch, -1, self.blocks.shape[-1]])
        if self._quantized:
            approx = tf.matmul(tf.cast(blocks, tf.float32), (queries * self.scale)[:, :, None])
            return approx[:, :, 0], ids
        return tf.matmul(blocks, queries[:, :, None])[:, :, 0], ids  # [B, n * S]

    def _blocks_for(self, k):
        """Blocks to search: the setting, or more so that they hold at least k items."""
        if isinstance(k, (int, np.integer)):  # known when the graph is traced
            need = int(np.searchsorted(self._fill_cumsum, k, side="left")) + 1
            return min(max(self._probe, need), self.num_blocks)
        k = tf.convert_to_tensor(k, tf.int32)
        need = tf.searchsorted(self.fill_cumsum, k[None], side="left")[0] + 1
        return tf.minimum(tf.maximum(self._probe, need), self.num_blocks)

    def _rescored(self, queries, approx, ids, k):
        """The best k of an int8-scored shortlist, re-scored with the float vectors."""
        _, short = _top_k(approx, ids, tf.maximum(k, self._rescore))
        vectors = tf.gather(self.vectors, tf.maximum(short, 0))  # [B, r, d]
        exact = tf.matmul(vectors, queries[:, :, None])[:, :, 0]  # [B, r]
        return _top_k(exact, short, k)


def is_member(values, sets):
    """values [B, m] int32, sets [B, n] int32 -> [B, m] bool: values[b, j] in sets[b, :].

    A sort and a binary search per row (O((m + n) log n)), not an [B, m, n] comparison.
    """
    ordered = tf.sort(tf.concat([sets, tf.fill([tf.shape(sets)[0], 1], -2)], axis=1), axis=1)
    pos = tf.searchsorted(ordered, values, side="left")
    pos = tf.minimum(pos, tf.shape(ordered)[1] - 1)
    return tf.equal(tf.gather(ordered, pos, batch_dims=1), values)


def _top_k(scores, ids, k):
    """Best k by score among slots with an item (id >= 0); -> (scores, ids)."""
    scores = tf.where(ids >= 0, scores, tf.constant(-np.inf, scores.dtype))
    best, pos = tf.math.top_k(scores, k=tf.minimum(k, tf.shape(scores)[1]))
    return best, tf.gather(ids, pos, batch_dims=1)


def augment(vectors: np.ndarray) -> np.ndarray:
    """The MIPS -> nearest-neighbour transform (Bachrach et al. 2014), scaled to unit norm:
    [N, d] -> [N, d + 1], row i = [x_i, sqrt(M^2 - |x_i|^2)] / M with M = max |x_i|."""
    norms = np.sum(np.square(vectors, dtype=np.float64), axis=1)
    top = max(float(norms.max()), 1e-30)
    extra = np.sqrt(np.maximum(top - norms, 0.0))[:, None]
    return (np.concatenate([vectors, extra], axis=1) / math.sqrt(top)).astype(np.float32)


def partition(vectors: np.ndarray, num_partitions: int, sample: int = 100_000,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """k-means partitions of the augmented vectors laid out as padded blocks.

    Returns:
        centroids [P, d + 1] float32 (augmented space), blocks [P, S, d] float32 (item
        vectors, zero pads) and ids [P, S] int32 (item index, -1 pads); P >= the number of
        non-empty k-means partitions (a large one is split into several blocks).
    """
    points = augment(vectors)
    n = len(points)
    labels = _kmeans_labels(points, min(num_partitions, n), sample, seed)
    size = _block_size(n, num_partitions)
    groups = []
    for members in np.split(np.argsort(labels, kind="stable"),
                            np.cumsum(np.bincount(labels))[:-1]):
        if len(members) > size:  # cut along its principal axis, so each block stays compact
            centred = points[members] - points[members].mean(axis=0)
            axis = np.linalg.svd(centred, full_matrices=False)[2][0]
            members = members[np.argsort(centred @ axis, kind="stable")]
        groups.extend(members[s:s + size] for s in range(0, len(members), size))
    groups = [g for g in groups if len(g)]
    ids = np.full((len(groups), size), -1, np.int32)
    for b, g in enumerate(groups):
        ids[b, :len(g)] = g
    centroids = np.stack([points[g].mean(axis=0) for g in groups]).astype(np.float32)
    blocks = np.where((ids >= 0)[:, :, None], vectors[np.maximum(ids, 0)], 0.0)
    return centroids, blocks.astype(np.float32), ids


def _block_size(n: int, num_partitions: int) -> int:
    """Block slots: the mean partition size rounded up to a multiple of 8."""
    return max(8, 8 * math.ceil(n / num_partitions / 8))


def _kmeans_labels(points: np.ndarray, clusters: int, sample: int, seed: int) -> np.ndarray:
    """Lloyd's k-means (scikit-learn) on a sample, then every point's nearest centroid."""
    from sklearn.cluster import KMeans

    if clusters <= 1:
        return np.zeros(len(points), np.int64)
    rng = np.random.default_rng(seed)
    train = points if len(points) <= sample else points[rng.choice(len(points), sample,
                                                                    replace=False)]
    model = KMeans(n_clusters=min(clusters, len(train)), n_init=1, max_iter=20,
                   random_state=seed).fit(train)
    labels = np.concatenate([model.predict(points[s:s + 100_000])
                             for s in range(0, len(points), 100_000)])
    # Renumber 0..C-1 over the clusters that received points.
    return np.unique(labels, return_inverse=True)[1].astype(np.int64)
