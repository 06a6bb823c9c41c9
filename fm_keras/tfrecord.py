"""TFRecord shards of ``tf.train.Example`` for training on a cluster: ``fm-keras convert``.

A converted directory holds::

    part-00000-of-00004.tfrecord ...   one Example per row: the features typed from the spec
                                       (categorical and multi-hot -> bytes, numeric -> float,
                                       a missing number stays NaN) and the label (float)
    features.json                      features fitted on the converted rows (vocabularies,
                                       statistics), so that every worker encodes alike
    tfrecord.json                      manifest: rows per shard, label, filters applied, source

Rows are filtered exactly as `load_split` filters them, at conversion time; shards hold
contiguous, nearly equal blocks of rows. Training reads a worker's share of the shards
(`training_dataset`), evaluation and export read them back into a `Split` (`read_split`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import numpy as np

from fm_keras import fsutil
from fm_keras.config import ExperimentConfig, FeatureConfig, TrainingConfig
from fm_keras.data import Split, load_split
from fm_keras.errors import DataError

EXTENSIONS = (".tfrecord", ".tfrecords")
MANIFEST = "tfrecord.json"
FEATURES = "features.json"


def is_tfrecord(path: str) -> bool:
    return path.endswith(EXTENSIONS)


def shard_name(index: int, count: int) -> str:
    return f"part-{index:05d}-of-{count:05d}.tfrecord"


def convert(config: ExperimentConfig, inputs: Sequence[str], out: str, shards: int) -> dict:
    """Writes the rows of `inputs` (CSV/Parquet globs) as `shards` TFRecord files in `out`.

    Args:
        config: the experiment: its feature spec, label, filters and task.
        inputs: the files to convert (e.g. the training logs).
        out: a new or empty directory.
        shards: number of files; give at least as many as the workers that will read them.

    Returns:
        The manifest (also written to ``out/tfrecord.json``).
    """
    from fm_keras.features import fit_features

    if not isinstance(shards, int) or shards < 1:
        raise DataError(f"--shards must be a positive number of files, got {shards!r}")
    if os.path.isdir(out) and os.listdir(out):
        raise DataError(f"{out}: not empty; converting writes a new directory, choose another "
                        "--out or delete it")
    started = time.time()
    split = load_split(inputs, config.features, config.data.label, config.data.filters,
                       task=config.model.task)
    if len(split) < shards:
        raise DataError(f"--shards {shards} is more than the {len(split)} rows to convert")
    os.makedirs(out, exist_ok=True)
    written = []
    for index, rows in enumerate(np.array_split(np.arange(len(split)), shards)):
        name = shard_name(index, shards)
        _write_shard(os.path.join(out, name), split.take(rows), config.features,
                     config.data.label)
        written.append({"file": name, "rows": int(len(rows))})
    fitted = fit_features(config.features, split)
    fsutil.write_json(os.path.join(out, FEATURES), [f.to_dict() for f in fitted])
    manifest = {"rows": len(split), "rows_read": split.rows_read, "dropped": split.dropped,
                "shards": written, "label": config.data.label,
                "features": {f.name: f.kind for f in config.features},
                "source": split.files, "seconds": round(time.time() - started, 2)}
    fsutil.write_json(os.path.join(out, MANIFEST), manifest)
    return manifest


def _write_shard(path: str, split: Split, features: Sequence[FeatureConfig], label: str) -> None:
    from fm_keras._tf import tf

    tmp = path + ".tmp"
    with tf.io.TFRecordWriter(tmp) as writer:
        columns = [(f.name, f.kind == "numeric", split.features[f.name]) for f in features]
        for i in range(len(split)):
            feature = {}
            for name, numeric, column in columns:
                if numeric:
                    feature[name] = tf.train.Feature(
                        float_list=tf.train.FloatList(value=[column[i]]))
                else:
                    feature[name] = tf.train.Feature(
                        bytes_list=tf.train.BytesList(value=[str(column[i]).encode()]))
            feature[label] = tf.train.Feature(
                float_list=tf.train.FloatList(value=[split.labels[i]]))
            writer.write(tf.train.Example(
                features=tf.train.Features(feature=feature)).SerializeToString())
    os.replace(tmp, path)


def example_spec(features: Sequence[FeatureConfig], label: str | None) -> dict:
    """The `tf.io.parse_example` spec: strings for categorical/multi-hot, float32 numbers."""
    from fm_keras._tf import tf

    spec = {f.name: tf.io.FixedLenFeature([], tf.float32, default_value=np.nan)
            if f.kind == "numeric" else tf.io.FixedLenFeature([], tf.string, default_value="")
            for f in features}
    if label:
        spec[label] = tf.io.FixedLenFeature([], tf.float32)
    return spec


def read_manifest(files: Sequence[str]) -> dict:
    """The manifest of the directory holding `files` (they must come from one conversion)."""
    directories = sorted({os.path.dirname(os.path.abspath(f)) for f in files})
    if len(directories) != 1:
        raise DataError(f"TFRecord files from several directories {directories}: train from "
                        "one 'fm-keras convert' output at a time")
    path = os.path.join(directories[0], MANIFEST)
    if not os.path.exists(path):
        raise DataError(f"{directories[0]}: no {MANIFEST}; write TFRecord shards with "
                        "'fm-keras convert'")
    return fsutil.read_json(path)


def fitted_features_path(files: Sequence[str]) -> str:
    read_manifest(files)
    return os.path.join(os.path.dirname(os.path.abspath(files[0])), FEATURES)


def read_split(files: Sequence[str], features: Sequence[FeatureConfig], label: str | None,
               task: str = "binary", batch_size: int = 65_536) -> Split:
    """Reads TFRecord shards into an in-memory `Split` (filters were applied at conversion)."""
    from fm_keras._tf import tf

    spec = example_spec(features, label)
    dataset = tf.data.TFRecordDataset(list(files)).batch(batch_size).map(
        lambda records: tf.io.parse_example(records, spec))
    parts = {name: [] for name in spec}
    try:
        for batch in dataset:
            for name, value in batch.items():
                parts[name].append(value.numpy())
    except tf.errors.OpError as err:
        raise DataError(f"{', '.join(files)}: cannot read as TFRecord Examples of this feature "
                        f"spec: {' '.join(err.message.split())[:200]}") from None
    if not parts[next(iter(spec))]:
        raise DataError(f"{', '.join(files)}: no rows")
    columns = {name: np.concatenate(chunks) for name, chunks in parts.items()}
    for f in features:
        if f.kind != "numeric":
            columns[f.name] = np.char.decode(columns[f.name].astype(bytes), "utf-8").astype(object)
    labels = columns.pop(label) if label else None
    if labels is not None and task == "binary" and not np.isin(labels, (0.0, 1.0)).all():
        raise DataError(f"{files[0]}: label {label!r}: task 'binary' needs labels in {{0, 1}}")
    return Split(columns, labels, len(next(iter(columns.values()))), {}, list(files))


def training_dataset(files: Sequence[str], encoder, label: str, training: TrainingConfig,
                     batch_size: int, *, shard_index: int = 0, num_shards: int = 1,
                     seed: int | None = None):
    """An endless, shuffled tf.data pipeline of ``({"ids", "values"}, labels, weights)``.

    Args:
        files: all TFRecord shards; this reader takes ``files[shard_index::num_shards]``.
        encoder: the model's `FeatureEncoder` (raw values -> slots, in the input pipeline).
        label: the label feature name.
        training: for the sample weights (pos_weight / class_weight) and negative sampling.
        batch_size: rows per batch of this reader.
        seed: shuffle seed; None draws a new order every run.
    """
    from fm_keras._tf import tf

    mine = list(files)[shard_index::num_shards]
    if not mine:
        raise DataError(f"{len(files)} TFRecord shard(s) for {num_shards} workers: worker "
                        f"{shard_index} has none; convert with --shards >= {num_shards}")
    spec = example_spec(encoder_configs(encoder), label)
    if training.class_weight is not None:
        w0, w1 = training.class_weight[0], training.class_weight[1]
    else:
        w0, w1 = 1.0, training.positive_weight_ratio
    rate = training.neg_sample_rate

    def encode(records):
        parsed = tf.io.parse_example(records, spec)
        labels = parsed.pop(label)
        ids, values = encoder(parsed)
        weights = tf.where(labels > 0.5, w1, w0)
        if rate < 1.0:  # keep positives, and each negative with probability `rate`
            keep = (labels > 0.5) | (tf.random.uniform(tf.shape(labels)) < rate)
            ids, values = tf.boolean_mask(ids, keep), tf.boolean_mask(values, keep)
            labels, weights = tf.boolean_mask(labels, keep), tf.boolean_mask(weights, keep)
        return {"ids": ids, "values": values}, labels, weights

    dataset = tf.data.Dataset.from_tensor_slices(mine).shuffle(len(mine), seed=seed)
    dataset = dataset.interleave(tf.data.TFRecordDataset, cycle_length=min(4, len(mine)),
                                 num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return (dataset.shuffle(max(8 * batch_size, 10_000), seed=seed).repeat()
            .batch(batch_size, drop_remainder=True)
            .map(encode, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE))


def encoder_configs(encoder) -> list[FeatureConfig]:
    return [f.config for f in encoder.features]
