"""``fm-keras convert``: one encoded shard directory that one machine and a cluster train from.

Convert streams the logs twice in blocks, as out-of-core training does (`fm_keras.out_of_core`:
pass 1 fits the features, pass 2 encodes every row once), and writes the same shard directory:
fixed-length records of encoded rows, ``features.json`` and the ``shards.json`` manifest.
Memory is bounded by a block of rows and the vocabularies, not by the rows converted.

An experiment trains from it by naming its manifest::

    data:
      train: /shared/ctr/shards/shards.json

On one machine (`fm_keras.training`) the shards are read as out of core; on a cluster
(`fm_keras.distributed`) each synchronous worker reads its own files. The features are the
converted ones (every task encodes alike), and what the encoding depended on must match the
experiment: feature spec, label, task and ``training.neg_sample_rate`` (negatives are dropped
once, while converting). TFRecord Examples from an older ``convert`` are not training data any
more: convert the logs again.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from fm_keras.config import ExperimentConfig
from fm_keras.errors import ConfigError, DataError
from fm_keras.features import FeatureEncoder, FittedFeature
from fm_keras.out_of_core import MANIFEST, Shards, fit_pass, write_shards

HINT = ("write them with 'fm-keras convert --config EXPERIMENT --out DIR --shards N' and set "
        f"data: train: DIR/{MANIFEST}")


def convert(config: ExperimentConfig, inputs: Sequence[str], out: str, shards: int) -> dict:
    """Encodes the rows of `inputs` into the shard directory `out`, in two streaming passes.

    Args:
        config: the experiment: feature spec, label, filters, task, and the training settings
            the encoding depends on (``batch_size`` sets the rows per record,
            ``neg_sample_rate`` drops negatives once, ``seed`` the row order).
        inputs: CSV/Parquet files or globs (e.g. the training logs).
        out: a new or empty directory; it appears only when complete.
        shards: number of files; at least the number of synchronous workers that will read
            them (each reads its own files), a few per worker balances better.

    Returns:
        The manifest (also ``out/shards.json``).

    Raises:
        DataError: a bad --shards, a used `out`, a bad file or value (file, column, row).
        ConfigError: a retrieval experiment or sampled negatives (they train in memory).
    """
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise DataError(f"--shards must be a positive number of files, got {shards!r}")
    if os.path.isdir(out) and os.listdir(out):
        raise DataError(f"{out}: not empty; converting writes a new directory, choose another "
                        "--out or delete it")
    if config.model.task == "retrieval" or config.training.negatives.per_positive:
        key = ("model: task: retrieval" if config.model.task == "retrieval"
               else "training: negatives")
        raise ConfigError(f"{config.source}: {key}: this experiment trains in memory from its "
                          "CSV/Parquet files; convert writes encoded rows for task binary or "
                          "regression without sampled negatives")
    config = dataclasses.replace(config, data=dataclasses.replace(config.data,
                                                                  train=tuple(inputs)))
    fit = fit_pass(config)
    if fit.rows < shards:
        raise DataError(f"--shards {shards} is more than the {fit.rows} rows to convert")
    written = write_shards(config, FeatureEncoder(fit.features), out, fit, num_files=shards)
    return written.manifest


def converted_shards(config: ExperimentConfig) -> Shards | None:
    """The shard directory `data.train` names (``DIR/shards.json``), checked against `config`;
    None when the training data are files to read.

    Raises:
        ConfigError: the shards were written for another feature spec, label, task or
            neg_sample_rate, or without ``data.valid`` configured (no holdout from shards).
        DataError: the manifest's directory is incomplete.
    """
    train = config.data.train
    if not (len(train) == 1 and os.path.basename(train[0]) == MANIFEST):
        if len(train) == 1 and os.path.isfile(os.path.join(train[0], MANIFEST)):
            raise ConfigError(f"{config.source}: data: train: {train[0]} is a shard directory; "
                              f"name its manifest: {os.path.join(train[0], MANIFEST)}")
        return None
    directory = os.path.dirname(os.path.abspath(train[0]))
    if not os.path.isfile(train[0]):
        raise DataError(f"{train[0]}: no such file; {HINT}")
    shards = Shards.open(directory)
    features, m = shards.features, shards.manifest
    where = f"{config.source}: "
    if tuple(f.config for f in features) != tuple(config.features):
        changed = [c.name for c, f in zip(config.features, features) if c != f.config] \
            or [c.name for c in config.features]
        raise ConfigError(f"{where}features: the feature spec differs from the one the shards "
                          f"in {directory} were converted with (first: {changed[0]!r}); convert "
                          "again with this experiment ('fm-keras convert')")
    wanted = {"label": config.data.label, "task": config.model.task,
              "neg_sample_rate": config.training.neg_sample_rate}
    for key, value in wanted.items():
        if m.get(key) != value:
            raise ConfigError(f"{where}{key}: {value!r}, but the shards in {directory} were "
                              f"converted with {m.get(key)!r}; convert again with this "
                              "experiment ('fm-keras convert')")
    if not config.data.valid:
        raise ConfigError(f"{where}data: valid: training from converted shards needs "
                          "validation files (no rows are held out of the shards)")
    return shards


def fitted_features(shards: Shards, given: tuple[FittedFeature, ...] | None,
                    what: str) -> tuple[FittedFeature, ...]:
    """The shards' features; `given` ones (a resumed or warm-started run's) must equal them."""
    features = shards.features
    if given is not None and tuple(given) != features:
        raise ConfigError(f"{what}: its fitted features differ from those the shards in "
                          f"{shards.directory} were encoded with; train from scratch, or convert "
                          "with its features")
    return features
