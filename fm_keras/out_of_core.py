"""Encoded shards on disk: out-of-core training on one machine, and the data of a cluster.

Two streaming passes over the training files, then every epoch from disk::

    pass 1  data.iter_blocks -> fitting.FeatureFitter      vocabularies, statistics, labels
    pass 2  data.iter_blocks -> FeatureEncoder -> shards   rows encoded once
    epochs  shards -> interleave -> shuffle (chunks) -> batches of (ids, values), label, weight

Only blocks of rows, the vocabularies and a shuffle buffer are ever in memory; the in-memory
path (`fm_keras.training`) holds every row. ``data.out_of_core`` chooses: ``auto`` goes out of
core when the training files hold more than ``data.out_of_core_mb`` MiB (a Parquet file's
uncompressed size, `fm_keras.reading.bytes_in_memory`). ``fm-keras convert``
(`fm_keras.convert`) writes the same directory once for many runs, on one machine or a cluster
(`shard_dataset` gives each synchronous worker its own files).

A shard directory (``<run>/shards``, a cache under ``data.shard_dir``, or the output of
``convert``) is written under a temp name and renamed when complete::

    part-00000-of-00008.bin ...  fixed-length records of `chunk_rows` encoded rows; a row is
                                 int32 ids [slots], float32 values [slots], float32 label
                                 (a NaN label pads the last record of a file)
    counts.npy                   training rows per id (the l2_prior's counts)
    zero_value_ids.npy           the ids of slots with x = 0 (padding): with the counted ids,
                                 the table rows an epoch trains (`checkpoints.trained_rows`)
    sample.npz                   a uniform sample of encoded rows (the empirical Bayes prior)
    features.json                the fitted features the rows were encoded with
    shards.json                  manifest: rows (read, dropped per filter, written), slots,
                                 chunk_rows, files, label histogram, what the encoding
                                 depends on (label, task, neg_sample_rate, batch_size), the
                                 training files' fingerprint (``input``: path, size, mtime;
                                 `input_key`) and pass 1's row and label counts (``fit``)

``train --resume`` of an out-of-core run whose shards are complete and whose training files
(and label, filters, task, negative rate, seed, record size) are unchanged takes pass 1's
result from the manifest (`resumed_fit`): the files are not read again.

Rows are shuffled within each block before they are spread over the files, and the reader
shuffles chunks of `chunk_rows` rows through a buffer: an approximate shuffle (the in-memory
path's is exact) at the cost of one decode per batch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from fm_keras import fsutil
from fm_keras.config import ExperimentConfig, TrainingConfig
from fm_keras.data import downsample_negatives, expand_paths, iter_blocks
from fm_keras.errors import ConfigError, DataError
from fm_keras.features import FittedFeature, fit_features
from fm_keras.progress import RowProgress, log
from fm_keras.reading import bytes_in_memory, is_parquet
from fm_keras.tfrecord import is_tfrecord

MANIFEST = "shards.json"
FEATURES = "features.json"
ZERO_VALUE_IDS = "zero_value_ids.npy"
NUM_FILES = 8
SAMPLE_ROWS = 4096
SHUFFLE_ROWS = 262_144  # rows the reader's chunk shuffle buffer holds


def choose(config: ExperimentConfig) -> tuple[bool, str]:
    """Whether this experiment trains out of core, and why (for the log and run.json).

    Raises:
        ConfigError: ``out_of_core: true`` with a combination it does not support.
    """
    data = config.data
    files = expand_paths(data.train)
    unsupported = _unsupported(config, files)
    if data.out_of_core == "false":
        return False, "data.out_of_core is false"
    if data.out_of_core == "true":
        if unsupported:
            raise ConfigError(f"{config.source}: data: out_of_core: {unsupported}; set "
                              "out_of_core: false (or auto) for this experiment")
        return True, "data.out_of_core is true"
    size = sum(bytes_in_memory(f) for f in files)
    over = size > data.out_of_core_mb * 2**20
    on_disk = sum(os.path.getsize(f) for f in files if is_parquet(f))
    which = (f" (Parquet: uncompressed size from the file metadata; {on_disk / 2**20:,.1f} "
             "MiB on disk)" if on_disk else "")
    text = f"training files {size / 2**20:,.1f} MiB{which} {'>' if over else '<='} " \
           f"data.out_of_core_mb {data.out_of_core_mb:g}"
    if over and unsupported:
        return False, f"{text}, but {unsupported}"
    return over, text


def _unsupported(config: ExperimentConfig, files: list[str]) -> str | None:
    if config.model.task == "retrieval":
        return "task retrieval trains in memory only"
    if config.training.negatives.per_positive:
        return "sampled negatives (training.negatives) need the rows in memory"
    if any(is_tfrecord(f) for f in files):
        return "TFRecord Example training files train in memory"
    if not config.data.valid:
        return ("it needs data.valid files (the 10% holdout of the training rows is in-memory "
                "only)")
    return None


@dataclass(frozen=True)
class StreamFit:
    """What the first pass learned: fitted features and the training rows' labels.

    Attributes:
        features: fitted features.
        rows, rows_read: rows after and before the filters.
        dropped: filter name -> rows it dropped.
        labels, label_counts: the label histogram (distinct labels, rows per label).
        files: training files read.
    """

    features: tuple[FittedFeature, ...]
    rows: int
    rows_read: int
    dropped: dict
    labels: np.ndarray
    label_counts: np.ndarray
    files: list[str]


def fit_pass(config: ExperimentConfig, features: tuple[FittedFeature, ...] | None = None,
             block_rows: int = 262_144) -> StreamFit:
    """Pass 1: reads the training files in blocks, fits the features (unless `features` is
    given: a resumed or warm-started run) and counts the labels. Nothing is written.

    Raises:
        DataError: a bad file or value (file, column, row), or no rows after the filters.
    """
    data, started = config.data, time.time()
    files = expand_paths(data.train)
    labels: Counter = Counter()
    last = None

    def blocks():
        nonlocal last
        progress = RowProgress("fit pass")
        for block in iter_blocks(files, config.features, data.label, data.filters,
                                 task=config.model.task, block_rows=block_rows):
            progress.update(len(block.labels))
            values, counts = np.unique(block.labels, return_counts=True)
            labels.update(dict(zip(values.tolist(), counts.tolist())))
            last = block
            yield block

    given = features is not None
    if not given:
        features = fit_features(config.features, blocks())
    else:
        for _ in blocks():
            pass
    rows = sum(labels.values())
    if rows == 0:
        raise DataError(f"{', '.join(files)}: no rows left after filters {last.dropped}")
    distinct = np.array(sorted(labels), dtype=np.float64)
    log(f"streamed {rows:,} training rows from {len(files)} file(s) in blocks of "
        f"{block_rows:,} in {time.time() - started:.1f}s"
        + ("" if given else ", features fitted"))
    return StreamFit(tuple(features), rows, last.rows_read, last.dropped, distinct,
                     np.array([labels[v] for v in distinct], dtype=np.int64), files)


@dataclass(frozen=True)
class Shards:
    """An encoded shard directory (see the module doc) and what training needs from it."""

    directory: str
    manifest: dict
    counts: np.ndarray
    sample_ids: np.ndarray
    sample_values: np.ndarray
    zero_value_ids: np.ndarray | None = None  # None: shards written before they were kept

    @property
    def rows(self) -> int:
        return int(self.manifest["rows"])

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.manifest["labels"], dtype=np.float64)

    @property
    def label_counts(self) -> np.ndarray:
        return np.asarray(self.manifest["label_counts"], dtype=np.int64)

    @functools.cached_property
    def features(self) -> tuple[FittedFeature, ...]:
        """The fitted features the rows were encoded with (features.json, read once: its
        vocabularies can be large)."""
        return tuple(FittedFeature.from_dict(d) for d in
                     fsutil.read_json(os.path.join(self.directory, FEATURES)))

    @classmethod
    def open(cls, directory: str) -> Shards:
        manifest = fsutil.read_json(os.path.join(directory, MANIFEST))
        sample = np.load(os.path.join(directory, "sample.npz"))
        zero = os.path.join(directory, ZERO_VALUE_IDS)
        return cls(directory, manifest, np.load(os.path.join(directory, "counts.npy")),
                   sample["ids"], sample["values"],
                   np.load(zero) if os.path.exists(zero) else None)


def chunk_rows(batch_size: int) -> int:
    """Rows per shard record: the largest divisor of `batch_size` up to 256, so a batch is a
    whole number of records."""
    return max(d for d in range(1, min(256, batch_size) + 1) if batch_size % d == 0)


def input_key(config: ExperimentConfig, files: list[str]) -> dict:
    """What encoded shards depend on besides the fitted features, as JSON values: the
    training files (path, size in bytes, mtime in ns), label, filters, task, negative rate,
    seed and record size."""
    t = config.training
    return {"files": [[f, os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files],
            "label": config.data.label, "filters": [str(f) for f in config.data.filters],
            "task": config.model.task, "neg_sample_rate": t.neg_sample_rate, "seed": t.seed,
            "chunk_rows": chunk_rows(t.batch_size)}


def shard_directory(config: ExperimentConfig, run_dir: str, fit: StreamFit) -> str:
    """``<run>/shards``, or with ``data.shard_dir`` a cache entry named by a fingerprint of the
    training files (path, size, mtime), the fitted features, label, filters, task, negative
    rate, seed and record size (`input_key`): a later run of the same data and spec reuses
    it."""
    return _shard_directory(config, run_dir, fit.files, fit.features)


def _shard_directory(config: ExperimentConfig, run_dir: str, files: list[str],
                     features: tuple[FittedFeature, ...]) -> str:
    if config.data.shard_dir is None:
        return os.path.join(run_dir, "shards")
    key = {**input_key(config, files), "features": [f.to_dict() for f in features]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(config.data.shard_dir, f"shards-{digest}")


def resumed_fit(config: ExperimentConfig, run_dir: str,
                features: tuple[FittedFeature, ...]) -> StreamFit | None:
    """Pass 1's result for ``train --resume``, from the manifest of the run's complete shards
    (`shard_directory`) instead of a pass over the training files, or None when pass 1 must
    run: no complete shards, shards written before they recorded their input, or a
    difference (a training file's size or mtime, the label, filters, task, negative rate,
    seed, record size, or the fitted features). Either way the log says which.

    Args:
        config: the experiment being resumed.
        run_dir: its run directory.
        features: the run's fitted features (its ``features.json``).

    Raises:
        DataError: a training file pattern matches nothing (`fm_keras.data.expand_paths`).
    """
    files = expand_paths(config.data.train)
    directory = _shard_directory(config, run_dir, files, features)
    if not os.path.exists(os.path.join(directory, MANIFEST)):
        return None
    manifest = fsutil.read_json(os.path.join(directory, MANIFEST))
    recorded, now = manifest.get("input"), json.loads(json.dumps(input_key(config, files)))
    why = None
    if recorded is None or "fit" not in manifest:
        why = "they record no fingerprint of their input (written by an older version)"
    elif recorded != now:
        why = _input_difference(recorded, now)
    elif fsutil.read_json(os.path.join(directory, FEATURES)) != \
            json.loads(json.dumps([f.to_dict() for f in features])):
        why = "they were encoded with other fitted features than the run's"
    if why:
        log(f"encoded shards {directory}: {why}; reading the training files again")
        return None
    fit = manifest["fit"]
    log(f"reusing encoded shards {directory}: the training files are unchanged (size, mtime): "
        f"pass 1 over {len(files)} file(s) skipped")
    return StreamFit(tuple(features), int(fit["rows"]), int(manifest["rows_read"]),
                     dict(manifest["dropped"]), np.array(fit["labels"], dtype=np.float64),
                     np.array(fit["label_counts"], dtype=np.int64), files)


def _input_difference(recorded: dict, now: dict) -> str:
    """What differs between two `input_key`s, for the log."""
    if recorded["files"] != now["files"]:
        was = {f[0]: f[1:] for f in recorded["files"]}
        changed = [f[0] for f in now["files"] if was.get(f[0]) != f[1:]]
        if changed:
            return f"{changed[0]} changed since they were written (size or mtime)"
        return "the training files are not the ones they were written from"
    key = next((k for k in sorted(now) if recorded.get(k) != now[k]), None)
    if key is None:
        return "their input is recorded differently (another version)"
    return f"{key} was {recorded.get(key)!r} when they were written, now {now[key]!r}"


def write_shards(config: ExperimentConfig, encoder, directory: str, fit: StreamFit,
                 block_rows: int = 262_144, num_files: int | None = None) -> Shards:
    """Pass 2: encodes the training rows once into `directory` (reused if complete).

    Negative downsampling (``training.neg_sample_rate``) drops rows here, once, as the
    in-memory path does. The directory appears only when complete: a failed pass leaves
    nothing behind. Memory: one block of `block_rows` rows, the id counts and the sample.

    Args:
        config: the experiment (label, filters, task, training.batch_size / neg_sample_rate
            / seed).
        encoder: a `FeatureEncoder` of ``fit.features``.
        directory: the shard directory to write.
        fit: pass 1's result (the files and fitted features).
        num_files: shard files (default `NUM_FILES`); each block's rows are spread over all.
    """
    if os.path.exists(os.path.join(directory, MANIFEST)):
        log(f"reusing encoded shards {directory}")
        return Shards.open(directory)
    started, t = time.time(), config.training
    source = input_key(config, fit.files)  # before the files are read: a later change shows
    chunk, slots = chunk_rows(t.batch_size), encoder.num_slots
    rng = np.random.default_rng(t.seed)
    counts = np.zeros(encoder.num_ids, dtype=np.int64)
    zero_value = np.zeros(encoder.num_ids, dtype=bool)
    labels: Counter = Counter()
    sample = _BottomK(SAMPLE_ROWS, rng)
    rows = 0
    num_files = num_files or NUM_FILES
    names = [f"part-{i:05d}-of-{num_files:05d}.bin" for i in range(num_files)]
    with fsutil.atomic_dir(directory) as tmp:
        outs = [open(os.path.join(tmp, n), "wb") for n in names]
        try:
            progress = RowProgress("shard pass")
            for block in iter_blocks(fit.files, config.features, config.data.label,
                                     config.data.filters, task=config.model.task,
                                     block_rows=block_rows):
                progress.update(len(block.labels))
                if not len(block.labels):
                    continue
                y = block.labels
                if config.model.task == "binary" and t.neg_sample_rate < 1.0:
                    block = block.take(downsample_negatives(y, t.neg_sample_rate,
                                                            int(rng.integers(2**31))))
                    y = block.labels
                ids, values = encoder.encode_numpy(block.features)
                order = rng.permutation(len(y))  # mix the block before spreading it
                ids, values, y = ids[order], values[order], y[order]
                counts += np.bincount(ids[values != 0], minlength=encoder.num_ids)
                zero_value[ids[values == 0]] = True
                distinct, n = np.unique(y, return_counts=True)
                labels.update(dict(zip(distinct.tolist(), n.tolist())))
                sample.add(ids, values)
                records = _records(ids, values, y)
                for out, part in zip(outs, np.array_split(records, num_files)):
                    out.write(part.tobytes())
                rows += len(y)
            rows_per_file = [out.tell() // (4 * (2 * slots + 1)) for out in outs]
            for out, n in zip(outs, rows_per_file):  # pad to whole records: NaN labels
                pad = -n % chunk
                out.write(_records(np.zeros((pad, slots), np.int32),
                                   np.zeros((pad, slots), np.float32),
                                   np.full(pad, np.nan, np.float32)).tobytes())
        finally:
            for out in outs:
                out.close()
        if rows == 0:
            raise DataError(f"{', '.join(fit.files)}: no training rows left after negative "
                            f"downsampling at rate {t.neg_sample_rate}")
        distinct = sorted(labels)
        manifest = {"rows": rows, "rows_read": fit.rows_read, "dropped": fit.dropped,
                    "slots": slots, "chunk_rows": chunk,
                    "files": [{"file": n, "rows": r} for n, r in zip(names, rows_per_file)],
                    "labels": distinct, "label_counts": [labels[v] for v in distinct],
                    "num_ids": encoder.num_ids, "label": config.data.label,
                    "task": config.model.task, "neg_sample_rate": t.neg_sample_rate,
                    "batch_size": t.batch_size, "source": fit.files,
                    "input": source,
                    "fit": {"rows": fit.rows, "labels": fit.labels.tolist(),
                            "label_counts": fit.label_counts.tolist()},
                    "seconds": round(time.time() - started, 2)}
        np.save(os.path.join(tmp, "counts.npy"), counts)
        np.save(os.path.join(tmp, ZERO_VALUE_IDS), np.flatnonzero(zero_value))
        np.savez(os.path.join(tmp, "sample.npz"), ids=sample.ids, values=sample.values)
        fsutil.write_json(os.path.join(tmp, FEATURES), [f.to_dict() for f in fit.features])
        fsutil.write_json(os.path.join(tmp, MANIFEST), manifest)
    size = sum(os.path.getsize(os.path.join(directory, n)) for n in names)
    log(f"encoded {rows:,} rows into {num_files} shards of {slots} slots ({size / 2**20:,.0f} "
        f"MiB) in {time.time() - started:.1f}s: {directory}")
    return Shards.open(directory)


def _records(ids: np.ndarray, values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Rows as int32 [rows, 2 * slots + 1]: ids, then the bits of values and label."""
    out = np.empty((len(labels), 2 * ids.shape[1] + 1), dtype=np.int32)
    slots = ids.shape[1]
    out[:, :slots] = ids
    out[:, slots:2 * slots] = np.ascontiguousarray(values, np.float32).view(np.int32)
    out[:, -1] = np.ascontiguousarray(labels, np.float32).view(np.int32)
    return out


class _BottomK:
    """A uniform sample of k rows without replacement: the rows with the k smallest random
    keys seen so far (bottom-k sampling)."""

    def __init__(self, k: int, rng: np.random.Generator):
        self.k, self.rng = k, rng
        self.keys = np.empty(0)
        self.ids = self.values = None

    def add(self, ids: np.ndarray, values: np.ndarray) -> None:
        keys = self.rng.random(len(ids))
        if self.ids is not None:
            keys = np.concatenate([self.keys, keys])
            ids, values = np.concatenate([self.ids, ids]), np.concatenate([self.values, values])
        keep = np.argsort(keys, kind="stable")[:self.k]
        self.keys, self.ids, self.values = keys[keep], ids[keep], values[keep]


def shard_dataset(shards: Shards, training: TrainingConfig, seed: int | None = None, *,
                  batch_size: int | None = None, shard_index: int = 0, num_shards: int = 1,
                  repeat: bool = False, source: str | None = None):
    """The shards as a tf.data pipeline of ``({"ids", "values"}, labels, weights)`` batches:
    ids int32 [rows, slots], values float32 [rows, slots], labels and weights float32 [rows].

    Args:
        shards: the encoded shards.
        training: batch size and the sample weights (pos_weight / class_weight).
        seed: shuffle seed: every epoch visits the files and chunks in a new order,
            reproducible from it; None draws a new order every run.
        batch_size: rows per batch (default ``training.batch_size``; a synchronous worker
            takes its share of the global batch); a multiple of the shards' ``chunk_rows``.
            A batch holds fewer rows where a record has padding.
        shard_index, num_shards: this reader takes files ``[shard_index::num_shards]`` (one
            synchronous worker of ``num_shards``).
        repeat: endless batches of exactly `batch_size` rows, of static shape (a cluster's
            ``steps_per_epoch`` sets the epoch; synchronous workers must all-gather sparse
            gradients of equal shapes), else one epoch of known cardinality.

    Raises:
        ConfigError: `batch_size` is not a multiple of the shards' rows per record.
        DataError: this reader's files hold no rows (fewer files than readers).
    """
    from fm_keras._tf import tf

    m = shards.manifest
    slots, chunk = m["slots"], m["chunk_rows"]
    batch_size = batch_size or training.batch_size
    if batch_size % chunk:
        raise ConfigError(f"{source + ': ' if source else ''}training: batch_size: "
                          f"{batch_size} rows per batch"
                          f"{' per worker' if num_shards > 1 else ''} is not a multiple of the "
                          f"{chunk} rows per record of the shards in {shards.directory} (written "
                          f"for batch_size {m.get('batch_size', '?')}); choose a batch size whose "
                          "share is a multiple of it, or write the shards again")
    width = 2 * slots + 1
    mine = m["files"][shard_index::num_shards]
    if not sum(f["rows"] for f in mine):
        raise DataError(f"{shards.directory}: {len(m['files'])} shard file(s) for {num_shards} "
                        f"readers: reader {shard_index} has no rows; write the shards with "
                        f"at least as many files ('fm-keras convert --shards {num_shards}' or more)")
    files = [os.path.join(shards.directory, f["file"]) for f in mine]
    records = sum(math.ceil(f["rows"] / chunk) for f in mine)
    per_batch = batch_size // chunk
    if training.class_weight is not None:
        w0, w1 = training.class_weight[0], training.class_weight[1]
    else:
        w0, w1 = 1.0, training.positive_weight_ratio

    def decode(raw):
        rows = tf.reshape(tf.io.decode_raw(raw, tf.int32), [-1, width])
        labels = tf.bitcast(rows[:, -1], tf.float32)
        keep = tf.math.logical_not(tf.math.is_nan(labels))  # padding rows have NaN labels
        rows, labels = tf.boolean_mask(rows, keep), tf.boolean_mask(labels, keep)
        features = {"ids": rows[:, :slots],
                    "values": tf.bitcast(rows[:, slots:2 * slots], tf.float32)}
        return features, labels, tf.where(labels > 0.5, w1, w0)

    dataset = tf.data.Dataset.from_tensor_slices(files).shuffle(len(files), seed=seed)
    if repeat:
        dataset = dataset.repeat()
    dataset = dataset.interleave(
        lambda f: tf.data.FixedLengthRecordDataset(f, 4 * width * chunk,
                                                   buffer_size=1 << 20),
        cycle_length=min(4, len(files)), num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True)
    dataset = (dataset.shuffle(max(1, SHUFFLE_ROWS // chunk), seed=seed)
               .batch(per_batch).map(decode, num_parallel_calls=tf.data.AUTOTUNE))
    if repeat:  # the padding made some batches short: slice whole ones, one copy
        return dataset.rebatch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return (dataset.prefetch(tf.data.AUTOTUNE)
            .apply(tf.data.experimental.assert_cardinality(math.ceil(records / per_batch))))
