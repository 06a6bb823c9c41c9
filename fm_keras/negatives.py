"""Negatives sampled from the item catalog for ``task: binary`` on implicit logs.

``training.negatives: {per_positive: N, sampler: uniform | popularity}``: for every positive
row of a training batch, N catalog items are drawn inside the tf.data pipeline (so every
epoch sees new ones) and join the batch as label-0 rows with the positive row's query-side
(user + context) features and the sampled item's catalog features. A sampled item that the
user has a positive for in the training log gets weight 0 (it is not a negative). ``uniform``
draws every catalog item alike; ``popularity`` in proportion to (its positives + 1), the
word2vec-style choice that makes popular items the harder negatives.

What ``probability`` means then: the model learns P(observed | user, item) where the
alternatives are the N sampled catalog items per positive, i.e. odds relative to N random
items of the catalog. It ranks items for a user (and recalls them); it is not a click
probability. Validation (early stopping on AUC) gets N sampled negatives per positive once,
with a fixed seed, so the metric compares epochs on the same rows; the test split gets its own
fixed draw (another seed), so the test AUC, logloss and ECE of the run are sampled metrics
too, and the run's metrics say how the negatives were drawn (`SampledNegatives.description`).
"""

from __future__ import annotations

import functools

import numpy as np

from fm_keras._tf import tf
from fm_keras.batches import batched_dataset, epoch_seeds
from fm_keras.config import ExperimentConfig
from fm_keras.data import Split
from fm_keras.errors import ConfigError
from fm_keras.features import FeatureEncoder
from fm_keras.interactions import Catalog, load_catalog, query_keys
from fm_keras.progress import log
from fm_keras.retrieval import catalog_path
from fm_keras.towers import side_slot_order


class SampledNegatives:
    """Draws catalog negatives for the positives of a labeled split.

    Args:
        config: the experiment (``training.negatives``, ``data.items``, ``data.item_id``).
        encoder: the model's feature encoder.
        train: the labeled training split; ``data.item_id`` must be an item feature.

    Raises:
        ConfigError: ``data.item_id`` is not an item feature.
    """

    def __init__(self, config: ExperimentConfig, encoder: FeatureEncoder, train: Split):
        self.config = config
        item_id = config.data.item_id
        if item_id not in encoder.side_names(query_side=False):
            raise ConfigError(f"{config.source}: data: item_id: training: negatives needs the "
                              f"item id column {item_id!r} as an item feature (tower: item); "
                              "set data: item_id to it")
        self.encoder = encoder
        self.per_positive = config.training.negatives.per_positive
        self.catalog: Catalog = load_catalog(catalog_path(config), config.features, item_id)
        self.item_names = encoder.side_names(query_side=False)
        index = self.catalog.index_of(train.features[item_id])
        positive = (train.labels > 0.5) & (index >= 0)
        missing = int(((train.labels > 0.5) & (index < 0)).sum())
        if missing:
            log(f"warning: {missing:,} positive training rows name items that are not in the "
                f"catalog {self.catalog.path}; they cannot be recalled or excluded")
        counts = np.bincount(index[positive], minlength=len(self.catalog)).astype(np.float64)
        self.sampling_logits = (np.log(counts + 1.0) if config.training.negatives.sampler
                                == "popularity" else np.zeros(len(self.catalog))).astype(np.float32)
        self.key_names = encoder.query_key_names()
        self.train_keys = query_keys([train], self.key_names)[0]
        n = len(self.catalog)
        self.positive_pairs = np.unique(self.train_keys[positive] * n + index[positive])
        self.item_index = index

    @functools.cached_property
    def catalog_slots(self) -> tuple[np.ndarray, np.ndarray]:
        """The catalog's items encoded once: item-side ids int32 [items, item slots] and
        values float32 (the ids a drawn negative trains, with its query side)."""
        return self.encoder.encode_numpy(self.catalog.columns, names=self.item_names)

    def epoch_labels(self, labels: np.ndarray, weights: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
        """The labels and weights of one epoch of `dataset`: the log's rows plus N label-0
        rows of weight 1 per positive (for the base-rate loss of early stopping's warmup; a
        draw that hits one of the user's positives gets weight 0 in training, which this
        ignores: few in a catalog of any size).

        Args:
            labels, weights: float [rows] of the training log.

        Returns:
            float64 arrays [rows + N * positives].
        """
        extra = self.per_positive * int(np.sum(labels > 0.5))
        return (np.concatenate([labels, np.zeros(extra)]),
                np.concatenate([weights, np.ones(extra)]))

    def dataset(self, ids: np.ndarray, values: np.ndarray, labels: np.ndarray,
                weights: np.ndarray, batch_size: int, seed: int):
        """The training batches of `batched_dataset` (rows of the training split, encoded)
        with N sampled negatives per positive appended to each batch."""
        cat_ids, cat_values = (tf.constant(a) for a in self.catalog_slots)
        query_slot = tf.constant(self.encoder.slot_query_side)
        order = side_slot_order(self.encoder.slot_query_side)
        pairs = tf.constant(self.positive_pairs, tf.int64)
        logits = tf.constant(self.sampling_logits)[None, :]
        n, per = len(self.catalog), self.per_positive

        def add_negatives(batch, seed):
            features, y, w = batch
            positive = y > 0.5
            q_ids = tf.boolean_mask(tf.boolean_mask(features["ids"], positive), query_slot, axis=1)
            q_values = tf.boolean_mask(tf.boolean_mask(features["values"], positive), query_slot,
                                       axis=1)
            keys = tf.repeat(tf.boolean_mask(features["user_key"], positive), per)
            items = tf.random.stateless_categorical(logits, tf.size(keys), seed,
                                                    dtype=tf.int32)[0]
            pair = keys * n + tf.cast(items, tf.int64)
            at = tf.minimum(tf.searchsorted(pairs, pair), tf.maximum(tf.size(pairs) - 1, 0))
            seen = tf.equal(tf.gather(pairs, at), pair) if self.positive_pairs.size else \
                tf.zeros_like(pair, tf.bool)
            neg_ids = tf.gather(tf.concat([tf.repeat(q_ids, per, 0), tf.gather(cat_ids, items)],
                                          1), order, axis=1)
            neg_values = tf.gather(tf.concat([tf.repeat(q_values, per, 0),
                                              tf.gather(cat_values, items)], 1), order, axis=1)
            return ({"ids": tf.concat([features["ids"], neg_ids], 0),
                     "values": tf.concat([features["values"], neg_values], 0)},
                    tf.concat([y, tf.zeros_like(keys, y.dtype)], 0),
                    tf.concat([w, 1.0 - tf.cast(seen, w.dtype)], 0))

        ds = batched_dataset(ids, values, labels, weights, batch_size, shuffle_seed=seed,
                             extra={"user_key": self.train_keys})
        # Per-batch seeds drawn anew every epoch: fresh negatives, reproducible from `seed`.
        return tf.data.Dataset.zip((ds, epoch_seeds(seed + 1))).map(
            add_negatives, num_parallel_calls=tf.data.AUTOTUNE)

    def with_negatives(self, split: Split, seed: int) -> Split:
        """`split` plus N sampled label-0 rows per positive, drawn once (validation rows).

        A draw that is a positive of that user in this split is dropped.
        """
        rng = np.random.default_rng(seed)
        n = len(self.catalog)
        index = self.catalog.index_of(split.features[self.config.data.item_id])
        keys = query_keys([split], self.key_names)[0]
        positive = np.flatnonzero(split.labels > 0.5)
        rows = np.repeat(positive, self.per_positive)
        p = np.exp(self.sampling_logits.astype(np.float64))
        items = rng.choice(n, size=len(rows), p=p / p.sum())
        own = np.unique(keys[positive] * n + index[positive])
        keep = ~np.isin(keys[rows] * n + items, own)
        rows, items = rows[keep], items[keep]
        columns = {}
        for name, column in split.features.items():
            added = (self.catalog.columns[name][items] if name in self.catalog.columns
                     else column[rows])
            columns[name] = np.concatenate([column, added.astype(column.dtype)])
        labels = np.concatenate([split.labels, np.zeros(len(rows), split.labels.dtype)])
        return Split(columns, labels, split.rows_read, dict(split.dropped), list(split.files))

    def description(self, seed: int, added: int) -> dict:
        """How `with_negatives` drew a split's negatives, for the run's metrics.

        Args:
            seed: the seed given to `with_negatives`.
            added: the label-0 rows it added.

        Returns:
            ``{"per_positive", "sampler", "seed", "catalog", "rows"}``: the draw's settings,
            the catalog file it drew from and the rows it added.
        """
        negatives = self.config.training.negatives
        return {"per_positive": negatives.per_positive, "sampler": negatives.sampler,
                "seed": seed, "catalog": self.catalog.path, "rows": int(added)}
