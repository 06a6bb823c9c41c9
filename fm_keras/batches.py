"""In-memory training data as tf.data: encoded arrays -> shuffled batches, and the holdout.

The in-memory trainers (`fm_keras.training`, `fm_keras.retrieval`, sampled negatives in
`fm_keras.negatives`) encode a split once and serve it from these; out of core, batches come
from the encoded shards on disk (`fm_keras.out_of_core.shard_dataset`).
"""

from __future__ import annotations

import numpy as np

from fm_keras._tf import tf
from fm_keras.data import Split
from fm_keras.progress import log


def batched_dataset(ids: np.ndarray, values: np.ndarray, labels: np.ndarray,
                    weights: np.ndarray, batch_size: int, shuffle_seed: int | None = None,
                    extra: dict[str, np.ndarray] | None = None):
    """A tf.data pipeline of ``({"ids", "values"}, labels, weights)`` batches.

    Args:
        ids, values: encoded slots, [rows, slots].
        labels, weights: [rows].
        batch_size: rows per batch (the last batch may be smaller).
        shuffle_seed: if set, every epoch visits the rows in a new random order.
        extra: more per-row arrays [rows, ...], batched into the features dict by name.
    """
    n = len(labels)
    extra = {k: tf.constant(v) for k, v in (extra or {}).items()}
    tensors = tuple(tf.constant(a) for a in (ids, values, labels, weights))
    num_batches = -(-n // batch_size)
    if shuffle_seed is None:
        order = tf.data.Dataset.from_tensors(tf.range(n))
    else:
        # A seed drawn anew each time the dataset is iterated (each epoch): a seeded
        # tf.random.shuffle inside map would repeat the same permutation every epoch.
        order = epoch_seeds(shuffle_seed).take(1).map(
            lambda s: tf.random.experimental.stateless_shuffle(tf.range(n), seed=s))
    batches = order.flat_map(lambda rows: tf.data.Dataset.range(num_batches).map(
        lambda b: rows[b * batch_size:(b + 1) * batch_size]))

    def gather(rows):
        i, v, y, w = (tf.gather(t, rows) for t in tensors)
        return {"ids": i, "values": v, **{k: tf.gather(t, rows) for k, t in extra.items()}}, y, w

    return (batches.map(gather, num_parallel_calls=tf.data.AUTOTUNE)
            .prefetch(tf.data.AUTOTUNE)
            .apply(tf.data.experimental.assert_cardinality(num_batches))
            .with_options(without_autotune()))


def without_autotune() -> tf.data.Options:
    """tf.data options with the autotuner off (AUTOTUNE parallelism and buffers then take
    tf.data's defaults: one call per core, a prefetch buffer sized by it).

    With it on, deleting the iterator at the end of `fit` sometimes waits for the autotuner's
    next optimization round (its period doubles from 10 ms): `fit` returned 0.3-0.6 s after its
    last epoch in 3 of 10 calls (500k rows, 0.65 s epochs; 1.3 and 2.6 s in all), and the
    epochs ran no faster with it (BENCHMARKS.md, "Many steps per XLA call").
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return options


def epoch_seeds(seed: int):
    """An endless dataset of stateless-RNG seeds (int64 [2]), different on every iteration of
    the dataset (every epoch) and reproducible from `seed`."""
    return tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)


def holdout_if_needed(train: Split, valid: Split | None, seed: int):
    if valid is not None:
        return train, valid
    log("no valid files configured: holding out 10% of the training rows for early stopping")
    is_valid = np.random.default_rng(seed).random(len(train)) < 0.1
    return train.take(~is_valid), train.take(is_valid)

