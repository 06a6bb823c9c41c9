"""A partitioned (IVF) recall index that searches with stock TensorFlow ops only.

Building may use any library; serving may not. At build time the item vectors are partitioned
by k-means (scikit-learn's trainer) and laid out for gathering; the search graph is

    queries [B, d] -> block scores [B, P] -> top-n blocks -> gather them [B, n * S, d]
        -> exact inner products [B, n * S] -> tf.math.top_k

(MatMul, TopKV2, ResourceGather, Mul, Sum, SelectV2, ...: every op is stock TensorFlow,
and every shape but the batch is static, so the graph holds no shape arithmetic;
the export serves on the stock TF Serving image, Triton's TensorFlow backend or TF Java). No
XLA (`jit_compile`): stock TF Serving refuses XLA:CPU functions unless started with
--xla_cpu_compilation_enabled.
This is the inverted-file index (IVF) of Jegou et al., "Product quantization for nearest
neighbor search", TPAMI 2011, used for maximum inner product search (MIPS).

MIPS and k-means: partitions trained on inner products gather items around a direction, and an
item with a large norm (a popular item: its first component is L_I + P_I) can sit in a
partition whose centroid is far from the query. The index therefore partitions the items after
the MIPS -> nearest-neighbour reduction of Bachrach et al., "Speeding up the Xbox recommender
system using a Euclidean transformation for inner-product spaces", RecSys 2014: every item x
gets an extra coordinate sqrt(M^2 - |x|^2) (M = the largest norm), so all items have norm M and
the nearest neighbour of [q, 0] is the item with the largest q . x. k-means runs on those
vectors (BENCHMARKS.md measures it against plain k-means).

Layout: every k-means partition is cut by recursive bisection along principal axes into
blocks of at most S slots (S = a quarter of the mean partition size; the blocks cut from one
partition are near-equal, so each is compact and at least half full), each with its own
centroid; every block is padded to S slots (id -1). Small blocks buy recall per slot read: on
the 1M-item catalog of BENCHMARKS.md, 32 blocks of 128 slots (4,096 items read) reach the
recall@100 that 31 blocks of 504 slots did.
A query ranks the blocks by q . c (c = the block's mean item vector; the nearest augmented
centroid gave the same recall there, with five more ops over [B, blocks]). Optional int8
quantization of the blocks (one scale per dimension) scores a shortlist approximately and
re-scores it exactly with the float vectors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fm_keras._tf import tf
from fm_keras.errors import ExportError
from fm_keras.exclusion import is_member

QUANTIZE = (None, "int8")
# Slots read per result at the default setting: 40 * 100 = 32 blocks of 128 for 1M items gave
# recall@100 1.0 (BENCHMARKS.md); half of that still gave 0.9995.
SLOTS_PER_K = 40


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
        """Settings by catalog size (n items, top k); every block is searched up to 20k items
        (exact search: there are at most n blocks). Above, blocks holding about SLOTS_PER_K * k
        slots are searched; tuned on a 1M-item catalog, BENCHMARKS.md."""
        if n <= 20_000:
            return cls(num_partitions=max(1, min(64, n // 256)), partitions_to_search=n)
        parts = int(min(max(2 * math.sqrt(n), 100), n / 100))
        probe = max(20, math.ceil(SLOTS_PER_K * k / block_slots(n, parts)))
        return cls(num_partitions=parts, partitions_to_search=probe, rescore=max(10 * k, 1000))


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
        # [d, P]: q @ centroids is a plain MatMul (a transposed operand costs twice as much).
        self.centroids = tf.Variable(np.ascontiguousarray(centroids.T), trainable=False,
                                     name="centroids")
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
        n = self._blocks_for(k)
        slots = n * self.block_size if isinstance(n, int) else -1  # static when k is
        _, chosen = tf.math.top_k(tf.matmul(queries, self.centroids), k=n)  # [B, n]
        ids = tf.reshape(tf.gather(self.block_ids, chosen), [-1, slots])  # [B, n * S]
        blocks = tf.reshape(tf.gather(self.blocks, chosen), [-1, slots, self.blocks.shape[-1]])
        if self._quantized:
            return inner_products(tf.cast(blocks, tf.float32), queries * self.scale), ids
        return inner_products(blocks, queries), ids  # [B, n * S]

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
        wide = max(k, self._rescore) if isinstance(k, int) else tf.maximum(k, self._rescore)
        _, short = _top_k(approx, ids, wide)
        vectors = tf.gather(self.vectors, tf.maximum(short, 0))  # [B, r, d]
        exact = inner_products(vectors, queries)  # [B, r]
        return _top_k(exact, short, k)


def inner_products(rows, queries):
    """rows [B, m, d], queries [B, d] -> [B, m]: rows[b] . queries[b].

    A multiply and a sum, not a batched matmul: oneDNN's BatchMatMulV2 (TensorFlow's default
    CPU kernel on x86) costs several times more for these [m, d] x [d, 1] products with a small
    d (BENCHMARKS.md).
    """
    return tf.reduce_sum(rows * queries[:, None, :], axis=2)


def _top_k(scores, ids, k):
    """Best k by score among slots with an item (id >= 0); -> (scores, ids)."""
    scores = tf.where(ids >= 0, scores, tf.constant(-np.inf, scores.dtype))
    slots = scores.shape[1]
    if isinstance(k, int) and slots is not None:  # static: no shape ops in the graph
        k = min(k, slots)
    else:
        k = tf.minimum(k, tf.shape(scores)[1])
    best, pos = tf.math.top_k(scores, k=k)
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
        centroids [P, d] float32 (each block's mean item vector), blocks [P, S, d] float32
        (item vectors, zero pads) and ids [P, S] int32 (item index, -1 pads); P >= the number
        of non-empty k-means partitions (a partition of m items becomes ceil(m / S) blocks).
    """
    points = augment(vectors)
    n = len(points)
    labels = _kmeans_labels(points, min(num_partitions, n), sample, seed)
    size = block_slots(n, num_partitions)
    groups = []
    for members in np.split(np.argsort(labels, kind="stable"),
                            np.cumsum(np.bincount(labels))[:-1]):
        if len(members):
            groups.extend(bisect(points, members, size))
    ids = np.full((len(groups), size), -1, np.int32)
    for b, g in enumerate(groups):
        ids[b, :len(g)] = g
    centroids = np.stack([vectors[g].mean(axis=0) for g in groups]).astype(np.float32)
    blocks = np.where((ids >= 0)[:, :, None], vectors[np.maximum(ids, 0)], 0.0)
    return centroids, blocks.astype(np.float32), ids


def bisect(points: np.ndarray, members: np.ndarray, size: int) -> list[np.ndarray]:
    """`members` (row indices of `points` [N, D]) cut into ceil(m / size) blocks of about
    m / ceil(m / size) items each (at most `size`) by recursive bisection along the principal
    axis, so that each block is compact; -> list of index arrays."""
    count = -(-len(members) // size)
    if count <= 1:
        return [members]
    centred = points[members] - points[members].mean(axis=0)
    axis = np.linalg.svd(centred, full_matrices=False)[2][0]
    members = members[np.argsort(centred @ axis, kind="stable")]
    cut = len(members) * (count // 2) // count  # blocks on each side stay balanced
    return bisect(points, members[:cut], size) + bisect(points, members[cut:], size)


def block_slots(n: int, num_partitions: int) -> int:
    """Block slots S: a quarter of the mean partition size, rounded up to a multiple of 8."""
    return max(8, 8 * math.ceil(n / num_partitions / 32))


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
