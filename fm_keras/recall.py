"""Vector recall: item_tower over a catalog -> a ScaNN (or brute-force) index -> a recall export.

    saved_models/NAME_recall/<version>/
        serving_default    query features                    -> item_ids, scores, probabilities
        exclude_seen       query features + exclude_item_ids  -> the same, without those items
        exclude_seen_keys  query features + exclude_item_keys -> the same (the ids as int64
                           item keys, fm_keras.exclusion; catalogs of ids of 1-8 bytes only)

`scores` are FM logits (user_vector . item_vector + user_offset), so the order is exactly the
ranking model's order for that user, and `probabilities` are the calibrated click
probabilities: the ranking export's calibration (its metadata's "calibration" block), applied
in-graph to the scores, so they equal the ranking model's `probability` for the same rows.
A regression model's recall export has no `probabilities`: its `scores` are its predictions
(the ranking export's `prediction`), and a prediction is not a probability.
The ScaNN backend needs the ScaNN ops (`import scann` before loading; the ScaNN-enabled TF
Serving); `partitioned` (an IVF index, fm_keras.partitioned) and `brute_force` use stock ops
only and serve on stock TF Serving. Empty result slots (fewer than k items left after
exclusions) are padded with id "", score PAD_SCORE and probability 0.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from fm_keras import fsutil
from fm_keras._tf import tf
from fm_keras.calibration import Calibration
from fm_keras.errors import ExportError
from fm_keras.exclusion import (ItemIndex, catalog_keys, drop_excluded, fingerprint, item_keys,
                                search_excluding, slack)
from fm_keras.export import (METADATA, WARMUP, check_model_name, building, new_version_path,
                             signature_function, signature_info, write_warmup)
from fm_keras.interactions import read_catalog
from fm_keras.partitioned import PartitionedIndex, PartitionedParams
from fm_keras.progress import log
from fm_keras.servables import FORMAT_VERSION, load_export

FORMAT_RECALL = "fm_keras.recall"
BACKENDS = ("scann", "brute_force", "partitioned")
# Score of an empty result slot: float32's lowest finite value (JSON has no -Infinity).
PAD_SCORE = float(np.finfo(np.float32).min)


@dataclass(frozen=True)
class ScannParams:
    """ScaNN settings: partitioning (tree), asymmetric hashing (AH) and exact reordering.

    FM item vectors are short (k + 1 = 11 dims), which AH compresses coarsely, so recall needs
    more leaves searched and a larger reorder set than ScaNN's defaults.
    """

    num_leaves: int
    leaves_to_search: int
    reorder: int
    dimensions_per_block: int = 1
    anisotropic_quantization_threshold: float = 0.2
    training_sample_size: int = 100_000

    @classmethod
    def for_catalog(cls, n: int, k: int) -> ScannParams | None:
        """Settings by catalog size; None = small enough for exact search inside ScaNN."""
        if n <= 20_000:
            return None
        # A fifth of the leaves searched, 1000 reordered. An FM query is [1, S_Q]: its first
        # coordinate, the same for every user, weighs each leaf by its items' mean L_I + P_I,
        # so a user's top items spread over many leaves. A retrieval model over 100k items
        # (BENCHMARKS.md, session 21) gave recall@100 0.86-0.89 with 20 of 632 leaves (the
        # old 1/40), 0.98-0.99 with 80 and 0.999-1.0 with 126, at 1.5-2x the search time of
        # 20 leaves, still ~10x faster than exact search.
        leaves = int(min(max(2 * math.sqrt(n), 100), n / 100))
        return cls(num_leaves=leaves, leaves_to_search=max(20, leaves // 5),
                   reorder=max(10 * k, 1000))


class ScannIndex(tf.Module):
    """A ScaNN searcher over item vectors (dot product), saved with its model."""

    def __init__(self, vectors: np.ndarray, k: int, params: ScannParams | None):
        super().__init__(name="scann_index")
        from scann.scann_ops.py import scann_ops

        self._ops = scann_ops
        builder = scann_ops.builder(vectors, k, "dot_product")
        if params is None:
            builder = builder.score_brute_force()
        else:
            builder = builder.tree(
                num_leaves=params.num_leaves, num_leaves_to_search=params.leaves_to_search,
                training_sample_size=min(params.training_sample_size, len(vectors)))
            builder = builder.score_ah(
                params.dimensions_per_block,
                anisotropic_quantization_threshold=params.anisotropic_quantization_threshold,
                training_sample_size=min(params.training_sample_size, len(vectors)))
            builder = builder.reorder(params.reorder)
        self.state = builder.build().serialize_to_module()
        self._pre_reorder = -1 if params is None else params.reorder

    def search(self, queries, k):
        """queries [B, d] -> (scores [B, k], indices [B, k])."""
        searcher = self._ops.searcher_from_module(self.state)
        result = searcher.search_batched_parallel(
            queries, final_num_neighbors=k,
            pre_reorder_num_neighbors=tf.maximum(self._pre_reorder, k))
        return result.distances, result.indices


class BruteForceIndex(tf.Module):
    """Exact top-k by matrix product: stock TensorFlow ops only."""

    def __init__(self, vectors: np.ndarray):
        super().__init__(name="brute_force_index")
        self.vectors = tf.Variable(vectors, trainable=False, name="item_vectors")

    def search(self, queries, k):
        scores = tf.matmul(queries, self.vectors, transpose_b=True)
        return tf.math.top_k(scores, k=tf.minimum(k, tf.shape(self.vectors)[0]))


class RecallServable(tf.Module):
    """User features -> top-k item ids with FM scores; the saved recall model.

    Both signatures return k slots per user. A slot without an item (the catalog minus a
    user's excluded items holds fewer than k) has item id "", score PAD_SCORE and probability
    0 (finite, so a REST response stays valid JSON); excluded ids never come back.

    Args:
        task: the ranking model's ``model.task``: ``binary`` outputs ``item_ids``, ``scores``
            (logits) and ``probabilities`` (calibrated); ``regression`` outputs ``item_ids``
            and ``scores`` (its predictions) only.
        calibration: the ranking export's calibration of a binary model; None for regression.
    """

    def __init__(self, ranking, index, item_ids: np.ndarray, k: int, query_names: list[str],
                 calibration: Calibration | None, task: str = "binary"):
        super().__init__(name="fm_recall")
        self.ranking = ranking  # the loaded ranking export: its user_tower is reused as is
        self.index = index
        encoded = utf8(item_ids)
        self.item_ids = tf.Variable(encoded, trainable=False, dtype=tf.string, name="item_ids")
        # Excluded ids -> item indices (64-bit fingerprints), so exclusion is an integer test.
        self.item_index = ItemIndex(encoded)
        # Ids of 1-8 bytes: exact int64 keys a client computes (the exclude_seen_keys signature).
        keys = catalog_keys(encoded)
        self.keyed = keys is not None
        if self.keyed:
            self.item_keys = tf.Variable(keys, trainable=False, dtype=tf.int64, name="item_keys")
            self.key_index = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
                tf.constant(keys), tf.range(len(keys), dtype=tf.int32)), -1)
        self._items = len(encoded)
        self._k = int(k)
        self._calibration = calibration
        self.has_probabilities = task != "regression"
        self._query_names = list(query_names)

    def signatures(self) -> dict:
        """Signature name -> concrete function (`fm_keras.export.signature_function`)."""
        user_sig = self.ranking.signatures["user_tower"].structured_input_signature[1]
        inputs = {n: tf.TensorSpec(user_sig[n].shape, user_sig[n].dtype, name=n)
                  for n in self._query_names}
        exclude = {**inputs, "exclude_item_ids": tf.TensorSpec([None, None], tf.string,
                                                               name="exclude_item_ids")}
        out = {"serving_default": signature_function(self._recall, inputs),
               "exclude_seen": signature_function(self._recall_excluding, exclude)}
        if self.keyed:
            keyed = {**inputs, "exclude_item_keys": tf.TensorSpec([None, None], tf.int64,
                                                                  name="exclude_item_keys")}
            out["exclude_seen_keys"] = signature_function(self._recall_excluding_keys, keyed)
        return out

    def _user(self, features):
        out = self.ranking.signatures["user_tower"](**features)
        return out["user_vector"], out["user_offset"]

    def _found(self, scores, idx, offset):
        """Outputs of the slots that hold an item (idx >= 0, finite score), pads elsewhere."""
        found = tf.logical_and(idx >= 0, scores > -np.inf)
        logits = scores + offset[:, None]
        out = {"item_ids": tf.where(found, tf.gather(self.item_ids, tf.maximum(idx, 0)), ""),
               "scores": tf.where(found, logits, PAD_SCORE)}
        if self.has_probabilities:
            out["probabilities"] = tf.where(found, self._calibration.probability(logits), 0.0)
        return out

    def _recall(self, features):
        vectors, offset = self._user(features)
        scores, idx = self.index.search(vectors, self._k)
        return self._found(scores, idx, offset)

    def _recall_excluding(self, features):
        """Searches k + slack(k) candidates and drops the excluded ones (fm_keras.exclusion);
        rows with more than slack(k) excluded items among them are searched again with room
        for all of their excluded items."""
        features = dict(features)
        ids = features.pop("exclude_item_ids")

        def indices(rows):
            # The rows' ids as catalog indices (-1: not an item), fingerprint matches confirmed
            # by string: a wrong one must not drop an item.
            short_ids = tf.gather(ids, rows)
            sub = self.item_index(short_ids)
            return tf.where(tf.equal(tf.gather(self.item_ids, tf.maximum(sub, 0)), short_ids),
                            sub, -1)

        return self._excluding(features, fingerprint(ids), self.item_index.keys, ids, indices)

    def _recall_excluding_keys(self, features):
        """`_recall_excluding` with the excluded ids given as item keys, which are exact."""
        features = dict(features)
        keys = features.pop("exclude_item_keys")
        return self._excluding(features, keys, self.item_keys, None,
                               lambda rows: self.key_index.lookup(tf.gather(keys, rows)))

    def _excluding(self, features, keys, catalog_keys, ids, indices):
        """The search of both exclusion signatures: `keys` [B, n] of the excluded ids against
        `catalog_keys` [N]; `ids` [B, n] to confirm key matches by (None: keys are exact);
        `indices(rows)` -> those rows' excluded ids as catalog indices [R, n], -1 for none."""
        vectors, offset = self._user(features)
        wide = min(self._k + slack(self._k), self._items)
        scores, idx = self.index.search(vectors, wide)
        kept = drop_excluded(scores, idx, ids, keys, catalog_keys,
                             None if ids is None else self.item_ids, self._k,
                             complete=tf.constant(wide >= self._items))
        rows = tf.where(kept.short)[:, 0]

        def again():
            redo = search_excluding(self.index, tf.gather(vectors, rows), self._k,
                                    indices(rows), self._items)
            return tuple(tf.tensor_scatter_nd_update(t, rows[:, None], r)
                         for t, r in zip((kept.scores, kept.indices), redo))

        scores, idx = tf.cond(tf.size(rows) > 0, again, lambda: (kept.scores, kept.indices))
        return self._found(scores, idx, offset)


def catalog_ids(version_dir: str) -> np.ndarray:
    """The item ids of a recall export (`RecallServable.item_ids`), read from its variables
    without loading the model: UTF-8 bytes, object array [items], in catalog order."""
    reader = tf.train.load_checkpoint(os.path.join(version_dir, "variables", "variables"))
    return np.asarray(reader.get_tensor("item_ids/.ATTRIBUTES/VARIABLE_VALUE"), dtype=object)


def utf8(ids) -> np.ndarray:
    """Item ids as UTF-8 bytes (object array), whatever their script."""
    return np.array([i if isinstance(i, bytes) else str(i).encode("utf-8") for i in ids],
                    dtype=object)


def item_vectors(ranking, catalog: dict[str, np.ndarray], batch_size: int = 65_536) -> np.ndarray:
    """Runs item_tower over the catalog columns: [items, k + 1] float32."""
    fn = ranking.signatures["item_tower"]
    names = list(fn.structured_input_signature[1])
    n = len(catalog[names[0]])
    parts = [fn(**{k: tf.constant(catalog[k][s:s + batch_size]) for k in names})["item_vector"]
             .numpy() for s in range(0, n, batch_size)]
    return np.concatenate(parts).astype(np.float32)


def index_settings(backend: str, items: int, k: int, *, partitions: int | None = None,
                   partitions_to_search: int | None = None, rescore: int | None = None,
                   quantize: str | None = None):
    """A backend's settings sized by catalog (``for_catalog``), with the given ones overridden.

    ``partitions`` / ``partitions_to_search`` / ``rescore`` are ScaNN's num_leaves /
    leaves_to_search / reorder, and the partitioned index's k-means partitions / blocks
    searched / int8 shortlist. Returns ScannParams, PartitionedParams or None (exact search).

    Raises:
        ExportError: a setting the backend does not have, or an incomplete ScaNN tree.
    """
    given = {"--partitions": partitions, "--partitions-to-search": partitions_to_search,
             "--rescore": rescore, "--quantize": quantize}
    given = {flag: v for flag, v in given.items() if v is not None}
    unknown = sorted(given) if backend == "brute_force" else \
        ["--quantize"] if backend == "scann" and quantize is not None else []
    if unknown:
        raise ExportError(f"{unknown[0]} is not a setting of --backend {backend}")
    if backend == "brute_force":
        return None
    if backend == "partitioned":
        params = PartitionedParams.for_catalog(items, k)
        return replace(params, **_fields(partitions, partitions_to_search, rescore),
                       quantize=quantize)
    params = ScannParams.for_catalog(items, k)
    if not given:
        return params
    if params is None and (partitions is None or partitions_to_search is None):
        raise ExportError(f"a ScaNN tree over {items:,} items needs both --partitions and "
                          "--partitions-to-search (it is searched exactly by default)")
    params = params or ScannParams(num_leaves=partitions, leaves_to_search=partitions_to_search,
                                   reorder=max(10 * k, 1000))
    fields = _fields(partitions, partitions_to_search, rescore)
    names = {"num_partitions": "num_leaves", "partitions_to_search": "leaves_to_search",
             "rescore": "reorder"}
    return replace(params, **{names[f]: v for f, v in fields.items()})


def _fields(partitions, partitions_to_search, rescore) -> dict:
    given = {"num_partitions": partitions, "partitions_to_search": partitions_to_search,
             "rescore": rescore}
    return {f: v for f, v in given.items() if v is not None}


def make_index(backend: str, vectors: np.ndarray, k: int, params=None):
    """The search structure of `backend` over item vectors [N, d]: an object with
    ``search(queries [B, d], k) -> (scores [B, k], indices [B, k])``.

    Args:
        params: ScannParams (scann), PartitionedParams (partitioned) or None (sized by
            catalog; brute force has none).
    """
    if backend not in BACKENDS:
        raise ExportError(f"--backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "scann":
        return ScannIndex(vectors, k, params)
    if backend == "partitioned":
        return PartitionedIndex(vectors, params or PartitionedParams.for_catalog(len(vectors), k))
    return BruteForceIndex(vectors)


def build_index(model_dir: str, items: str, name: str, base: str = "saved_models",
                k: int = 100, backend: str = "scann", id_column: str = "item_id",
                version: int | None = None, params=None, settings: dict | None = None) -> str:
    """Exports ``base/name/<version>``: a recall model over the catalog; returns its path.

    Args:
        backend: "scann" (ScaNN custom ops), "brute_force" or "partitioned" (stock ops).
        params: the backend's settings (see `index_settings`); None = sized by catalog,
            with `settings` (keyword arguments of `index_settings`) overriding some.

    Raises:
        ExportError, DataError: bad arguments, catalog or model; nothing is left behind.
    """
    if backend not in BACKENDS:
        raise ExportError(f"--backend must be one of {BACKENDS}, got {backend!r}")
    if k < 1:
        raise ExportError(f"--k must be at least 1, got {k}")
    check_model_name(name)
    model_dir, ranking, meta = load_export(model_dir, expect="fm_keras.ranking")
    if "item_tower" not in ranking.signatures:
        raise ExportError(f"{model_dir}: the model has no item_tower signature (it needs both "
                          "query-side and item features for recall)")
    final = new_version_path(base, name, version)
    started = time.time()
    ids, columns = read_catalog(items, meta, id_column)
    vectors = item_vectors(ranking, columns)
    if k > len(ids):
        log(f"warning: --k {k} is larger than the catalog ({len(ids):,} items): the recall "
            f"model returns at most {len(ids):,} items")
        k = len(ids)
    if params is None:
        params = index_settings(backend, len(ids), k, **(settings or {}))
    index = make_index(backend, vectors, k, params)
    log(f"indexed {len(ids):,} items with {backend} "
        f"({asdict(params) if params else 'exact'}) in {time.time() - started:.1f}s")
    task = meta.get("task", "binary")  # exports made before the field were binary
    calibration = Calibration.from_dict(meta["calibration"]) if task != "regression" else None
    servable = RecallServable(ranking, index, ids, k, meta["query_features"], calibration, task)
    with building(final) as tmp:
        tf.saved_model.save(servable, tmp, signatures=servable.signatures())
        ops = saved_ops(tmp)
        custom_ops = [op for op in ops if ">" in op]
        loaded = tf.saved_model.load(tmp)
        rows = _sample_queries(ranking)
        extra = os.path.join(tmp, "assets.extra")
        os.makedirs(extra)
        first = ids[0].encode("utf-8")
        rows["exclude_item_ids"] = np.array([[first, b""]] * 4, dtype=object)
        rows["exclude_item_keys"] = np.repeat(item_keys(np.array([[first, b""]], object)), 4, 0)
        write_warmup(os.path.join(extra, WARMUP), loaded.signatures, rows)
        fsutil.write_json(os.path.join(extra, METADATA), {
            "format": FORMAT_RECALL, "format_version": FORMAT_VERSION, "name": name,
            "version": int(os.path.basename(final)),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "ranking_model": os.path.abspath(model_dir), "ranking_version": meta.get("version"),
            "backend": backend, "k": k, "items": len(ids), "catalog": os.path.abspath(items),
            "id_column": id_column,
            "scann": asdict(params) if backend == "scann" and params else None,
            "index": {"backend": backend, **(asdict(params) if params else {}),
                      **_layout(index)},
            "task": task, "query_features": meta["query_features"],
            "signatures": signature_info(loaded.signatures),
            **({"calibration": meta["calibration"]} if calibration else {}),
            "ops": ops, "custom_ops": custom_ops,
            "pad": {"item_id": "", "score": PAD_SCORE,
                    **({"probability": 0.0} if servable.has_probabilities else {})},
            "needs": "import scann before loading; ScaNN-enabled TF Serving" if custom_ops
                     else "stock TensorFlow / TF Serving",
            "versions": meta.get("versions", {}), "build_seconds": round(time.time() - started, 2),
        })
    log(f"exported {final} ({backend}, k={k}, custom ops: {custom_ops or 'none'})")
    return final


def _layout(index) -> dict:
    if not hasattr(index, "num_blocks"):
        return {}
    return {"blocks": index.num_blocks, "block_size": index.block_size}


def _sample_queries(ranking, n: int = 4) -> dict[str, np.ndarray]:
    """A few valid query rows for warmup: empty strings and zeros (the OOV / mean path)."""
    sig = ranking.signatures["user_tower"].structured_input_signature[1]
    return {name: (np.array([b""] * n, dtype=object) if spec.dtype == tf.string
                   else np.zeros(n, np.float32)) for name, spec in sig.items()}


def saved_ops(saved_model_dir: str) -> list[str]:
    """Every op type in a SavedModel's graphs and functions, sorted; custom ops (e.g.
    ``Scann>ScannSearchBatched``) have a ``>`` in their name."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(saved_model_dir, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    ops = set()
    for graph in proto.meta_graphs:
        ops.update(n.op for n in graph.graph_def.node)
        for fn in graph.graph_def.library.function:
            ops.update(n.op for n in fn.node_def)
    return sorted(ops)
