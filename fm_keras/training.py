"""Training on one machine: data -> fitted features -> encoded once -> fit with early stopping.

`train` is the one entry point: a cluster strategy goes to `fm_keras.distributed`, a retrieval
model to `fm_keras.retrieval`; a ranking model trains here, in memory or out of core
(`fm_keras.out_of_core`, chosen per run), from CSV/Parquet files or from the encoded shard
directory of ``fm-keras convert``. The run directory it writes, and loading it back, are
`fm_keras.runs`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

import numpy as np

from fm_keras import compiled_steps, fsutil, hugepages, out_of_core
from fm_keras._tf import keras, tf
from fm_keras.batches import batched_dataset, holdout_if_needed
from fm_keras.checkpoints import LARGE_VARIABLE_ELEMENTS, is_large, trained_rows
from fm_keras.config import ExperimentConfig
from fm_keras.convergence import base_loss
from fm_keras.convert import converted_shards, fitted_features
from fm_keras.data import (Split, check_disjoint_splits, downsample_negatives, load_data_split,
                           require_both_classes, sample_weights, skipped_empty_files)
from fm_keras.distributed import train_distributed
from fm_keras.errors import ConfigError, RunError
from fm_keras.evaluation import metrics_for
from fm_keras.features import FittedFeature, fit_features
from fm_keras.fit_progress import fit_progress, fit_verbosity
from fm_keras.weights import read_weights, require_table_layout
from fm_keras.model import FMModel, build_model, make_optimizer
from fm_keras.negatives import SampledNegatives
from fm_keras.prior import attach_prior
from fm_keras.prior_search import Slots
from fm_keras.progress import log
from fm_keras.retrieval import train_retrieval
from fm_keras.runs import (TrainingState, calibrate, check_run_dir, library_versions,
                           predict_split, watch_defined_metric)


def train(config: ExperimentConfig, run_dir: str, *, resume: bool = False,
          verbose: int | None = None, warm_start: str | None = None,
          callbacks: list | None = None) -> dict:
    """Trains an FM as configured and writes a complete run directory.

    Args:
        config: the validated experiment.
        run_dir: output directory; must not hold a finished run. With `resume`, an unfinished
            one continues from its last checkpoint.
        verbose: Keras progress (0 silent, 1 bar, 2 a line per epoch); default by tty.
        warm_start: a finished run with the same feature spec to start from: its fitted
            features (vocabularies, statistics) and weights are reused, so values it never
            saw go to the OOV buckets.
        callbacks: extra Keras callbacks, called after the run's own (early stopping,
            checkpoints) each epoch, e.g. `fm_keras.tune`'s pruning on the validation metric.

    Returns:
        The run record (also written to ``run.json``). With ``training.distribute`` set to a
        cluster strategy the run goes to `fm_keras.distributed.train_distributed`: there
        only the chief returns the record (other tasks return None).

    Raises:
        RunError: among others, `resume` of a checkpoint in the FM's layout before its
            per-id ``table`` (`fm_keras.weights.require_table_layout`; a `warm_start` from such
            a run reads its weights converted, `fm_keras.weights.read_weights`).

    A run that fails or is stopped (Ctrl-C, SIGTERM) before it wrote anything leaves no
    `run_dir` it created; one stopped later keeps its checkpoints, for ``--resume``.
    """
    existed = os.path.isdir(run_dir)
    try:
        return _train(config, run_dir, resume=resume, verbose=verbose, warm_start=warm_start,
                      callbacks=callbacks)
    except BaseException:
        if not existed:
            fsutil.remove_if_empty(run_dir)
        raise


def _train(config: ExperimentConfig, run_dir: str, *, resume: bool, verbose: int | None,
           warm_start: str | None, callbacks: list | None) -> dict:
    """`train`'s work."""
    check_disjoint_splits(config.data, config.source)
    if resume:
        last = tf.train.latest_checkpoint(os.path.join(run_dir, "checkpoints", "last"))
        if last:
            require_table_layout(last, "--resume")
    if config.training.distribute.cluster:
        if warm_start:
            raise ConfigError(f"{config.source}: training: distribute: a warm start from "
                              f"{warm_start} runs on one machine only; set strategy: none for "
                              "it, or train the cluster run from scratch")

        return train_distributed(config, run_dir, resume=resume, verbose=verbose)
    if config.model.task == "retrieval":
        if warm_start:
            raise ConfigError(f"{config.source}: model: task: retrieval runs cannot warm-start "
                              "yet; train from scratch")
        return train_retrieval(config, run_dir, resume=resume, verbose=verbose)
    started = time.time()
    check_run_dir(run_dir, resume, config)
    task = config.model.task
    converted = converted_shards(config)
    if converted:
        ooc, why = True, f"data.train is the shard directory of 'fm-keras convert' " \
                         f"{converted.directory}"
    else:
        ooc, why = out_of_core.choose(config)
    log(f"{'out-of-core' if ooc else 'in-memory'} training: {why}")
    if resume and os.path.exists(os.path.join(run_dir, "features.json")):
        given = tuple(FittedFeature.from_dict(d)
                      for d in fsutil.read_json(os.path.join(run_dir, "features.json")))
    else:
        given = _warm_start_features(warm_start, config) if warm_start else None
    label_counts = None  # out of core, the labels are a histogram: distinct values, rows
    if converted:
        valid_split = load_data_split(config.data, "valid", config.features, task)
        features = fitted_features(converted, given, warm_start or run_dir)
        m = converted.manifest
        rows = {"train_read": m["rows_read"], "dropped": m["dropped"]}
        log(f"train: {converted.rows:,} encoded rows in {converted.directory}")
        if task == "binary":
            require_both_classes(Split({}, converted.labels, converted.rows,
                                       files=[converted.directory]), config.data.label)
    elif ooc:
        valid_split = load_data_split(config.data, "valid", config.features, task)
        # A resumed run whose shards are complete and input unchanged skips pass 1.
        fit = out_of_core.resumed_fit(config, run_dir, given) if resume and given else None
        fit = fit or out_of_core.fit_pass(config, given)
        features, rows = fit.features, {"train_read": fit.rows_read, "dropped": fit.dropped}
        log(f"train: {fit.rows:,} rows from {len(fit.files)} file(s)" + _dropped_text(fit))
        if task == "binary":
            require_both_classes(Split({}, fit.labels, fit.rows, files=fit.files),
                                 config.data.label)
    else:
        train_split, valid_split, features = _in_memory_splits(config, given)
        rows = {"train_read": train_split.rows_read, "dropped": train_split.dropped}
    # Read now, not after training: a bad test file stops the run before anything is written.
    test_split = load_data_split(config.data, "test", config.features, task) \
        if config.data.test else None
    skipped = [] if converted else skipped_empty_files(config.data.train)
    if skipped:  # empty part files of a glob (`fm_keras.data.expand_paths` warned of them)
        rows["empty_files_skipped"] = len(skipped)

    keras.utils.set_random_seed(config.training.seed)
    model = build_model(features, config.model, config.training)
    if warm_start and not resume:
        read_weights(model.fm, os.path.join(warm_start, "model", "weights"), partial=True)
        log(f"warm start from {warm_start}")
    t0 = time.time()
    prior = []  # the empirical Bayes prior's callback, if any
    negatives = None  # training.negatives: the catalog sampler (in memory only)
    if ooc:
        shards = converted or out_of_core.write_shards(
            config, model.encoder, out_of_core.shard_directory(config, run_dir, fit), fit)
        labels, label_counts = shards.labels, shards.label_counts
        callback = attach_prior(model, config, shards.counts, shards.sample_ids,
                                shards.sample_values, labels, label_counts)
        prior = [callback] if callback else []
        trained = (None if shards.zero_value_ids is None else  # shards of an older version
                   trained_rows(model.fm.num_ids, shards.zero_value_ids, counts=shards.counts))
        train_ds = out_of_core.shard_dataset(shards, config.training, config.training.seed,
                                             source=config.source)
        rows["train"] = shards.rows
    elif config.training.negatives.per_positive:
        negatives = SampledNegatives(config, model.encoder, train_split)
        logged = len(valid_split)  # the validation log's rows, before the draw
        valid_split = negatives.with_negatives(valid_split, config.training.seed)
        train_ds, trained = _dataset(model, train_split, config, training=True,
                                     negatives=negatives, callbacks=prior)
    else:
        train_ds, trained = _dataset(model, train_split, config, training=True, callbacks=prior)
    if not ooc:
        labels, rows["train"] = train_split.labels, len(train_split)
    # The validation rows are encoded once: for the per-epoch metrics, the prior's line
    # search, the calibration and the final metrics.
    valid_slots = model.encoder.encode_numpy(valid_split.features)
    valid_ds, _ = _dataset(model, valid_split, config, training=False, slots=valid_slots)
    if prior and config.model.l2_prior_validation:
        prior[0].search_on(Slots(*valid_slots, valid_split.labels, model.logit_correction),
                           config.training.seed)
    log(f"encoded {rows['train']:,} + {len(valid_split):,} rows into "
        f"{model.encoder.num_slots} slots over {model.encoder.num_ids:,} ids "
        f"in {time.time() - t0:.1f}s")
    if is_large(model.trainable_variables) and hugepages.missing():
        log(f"tables over {LARGE_VARIABLE_ELEMENTS:,} values step faster on transparent huge "
            f"pages (BENCHMARKS.md, \"Session 14\"): start Python with "
            f"GLIBC_TUNABLES={hugepages.TUNABLE}, as the fm-keras program does")

    # Before the run directory is written: `compiled_steps: always` may refuse.
    # Validation rows are unweighted; weighted_metrics=[] says so (and silences Keras).
    model.compile(optimizer=make_optimizer(config.training), weighted_metrics=[],
                  steps_per_execution=compiled_steps.execution_steps(config.training,
                                                                     rows["train"]))
    steps_reason = compiled_steps.choose(model, config.training, rows["train"],
                                         fixed_batches=negatives is None)
    # Slots made now, not in the first step: a step that creates variables is traced twice
    # by `tf.function` (0.45 s more per run).
    model.optimizer.build(model.trainable_variables)
    log(f"{'compiled' if model.uses_compiled_steps else 'Keras'} training steps: "
        f"{steps_reason}")

    os.makedirs(run_dir, exist_ok=True)
    fsutil.write_json(os.path.join(run_dir, "experiment.json"), config.to_dict())
    fsutil.write_json(os.path.join(run_dir, "features.json"), [f.to_dict() for f in features])

    weights = sample_weights(labels, config.training)
    if config.training.negatives.per_positive:  # what an epoch trains on: sampled rows too
        labels, weights = negatives.epoch_labels(labels, weights)
    state = TrainingState(run_dir, model, config, resume=resume,
                          base_loss=base_loss(task, labels, weights, label_counts),
                          trained_rows=trained)
    t0 = time.time()
    if state.initial_epoch < config.training.epochs and not state.early_stopped:
        verbose = fit_verbosity(verbose)
        with contextlib.redirect_stdout(sys.stderr):  # Keras prints progress to stdout
            model.fit(train_ds, validation_data=valid_ds, epochs=config.training.epochs,
                      initial_epoch=state.initial_epoch,
                      callbacks=[*prior, *watch_defined_metric(state, valid_split), state,
                                 *fit_progress(verbose, config.training.batch_size),
                                 *(callbacks or [])],
                      verbose=verbose)
    convergence = state.finish()
    train_seconds = time.time() - t0
    calibrate(model, valid_split, config.training, valid_slots)

    metrics = {"valid": metrics_for(task, valid_split.labels,
                                    predict_split(model, valid_split, slots=valid_slots))}
    if negatives is not None:
        metrics["valid"]["negatives"] = negatives.description(
            config.training.seed, len(valid_split) - logged)
    if test_split is not None:
        test = _test_metrics(config, model, negatives, test_split)
        if test is not None:
            metrics["test"] = test
    with fsutil.atomic_dir(os.path.join(run_dir, "model")) as tmp:
        tf.train.Checkpoint(fm=model.fm).write(os.path.join(tmp, "weights"))
    record = {
        "status": "complete",
        "task": task,
        "logit_correction": model.logit_correction,
        "calibration": model.calibration.to_dict(),
        "epochs_run": len(state.history),
        "best_epoch": state.best_epoch,
        **convergence,
        "prior": prior[0].precisions if prior else None,
        "history": state.history,
        "metrics": metrics,
        "rows": {**rows, "valid": len(valid_split)},
        "compiled_steps": {"enabled": model.uses_compiled_steps, "reason": steps_reason},
        "out_of_core": {"enabled": ooc, "reason": why,
                        "shards": shards.directory if ooc else None},
        "seconds": {"total": round(time.time() - started, 2), "fit": round(train_seconds, 2)},
        "train_samples_per_second": round(
            rows["train"] * max(1, len(state.history)) / max(train_seconds, 1e-9)),
        "versions": library_versions(),
        "warm_start": os.path.abspath(warm_start) if warm_start else None,
    }
    fsutil.write_json(os.path.join(run_dir, "run.json"), record)
    log(f"run complete: {run_dir}")
    return record


def _test_metrics(config: ExperimentConfig, model: FMModel,
                  negatives: SampledNegatives | None, split: Split) -> dict | None:
    """The metrics of the trained `model` on `split`, the rows of ``data.test``.

    With sampled negatives (an implicit log: every row a positive) the test split gets its own
    fixed draw from the catalog, as validation does (seed ``training.seed + 1``), and its
    metrics say how it was drawn; with no positive row to draw for, there are no metrics
    (None, with a warning): Recall@K (``fm-keras evaluate --items``) evaluates such a log.
    """
    task = config.model.task
    drawn = None
    if negatives is not None:
        seed = config.training.seed + 1
        sampled = negatives.with_negatives(split, seed)
        drawn = negatives.description(seed, len(sampled) - len(split))
        if not drawn["rows"]:
            log(f"warning: no test metrics: no sampled negative could be drawn for the test "
                f"split ({int(np.sum(split.labels > 0.5)):,} positive rows); evaluate it with "
                "'fm-keras evaluate --items' (Recall@K)")
            return None
        split = sampled
    metrics = metrics_for(task, split.labels, predict_split(model, split))
    metrics["dropped"] = split.dropped
    if drawn is not None:
        metrics["negatives"] = drawn
    return metrics


def _in_memory_splits(config: ExperimentConfig, features: tuple[FittedFeature, ...] | None):
    """Reads train and valid into memory, checks the labels, holds out valid if none is
    configured, fits the features (unless given) and downsamples the negatives."""
    task = config.model.task
    train_split = load_data_split(config.data, "train", config.features, task)
    valid_split = (load_data_split(config.data, "valid", config.features, task)
                   if config.data.valid else None)
    log(f"train: {len(train_split):,} rows from {len(train_split.files)} file(s)"
        + _dropped_text(train_split))
    if task == "binary" and not config.training.negatives.per_positive:
        # With sampled negatives an all-positive interaction log is the expected input.
        require_both_classes(train_split, config.data.label)
    train_split, valid_split = holdout_if_needed(train_split, valid_split, config.training.seed)
    features = features or fit_features(config.features, train_split)
    keep = downsample_negatives(train_split.labels, config.training.neg_sample_rate,
                                config.training.seed) if task == "binary" else slice(None)
    if task == "binary" and config.training.neg_sample_rate < 1:
        log(f"negative downsampling at rate {config.training.neg_sample_rate}: "
            f"{int(np.sum(keep)):,} of {len(train_split):,} training rows kept")
    return train_split.take(keep), valid_split, features


def _warm_start_features(warm_start: str, config: ExperimentConfig):
    """The fitted features of the run to warm-start from; its spec must equal this one."""
    path = os.path.join(warm_start, "features.json")
    if not os.path.exists(os.path.join(warm_start, "run.json")):
        raise RunError(f"{warm_start}: cannot warm-start from it: not a finished run")
    features = tuple(FittedFeature.from_dict(d) for d in fsutil.read_json(path))
    if tuple(f.config for f in features) != tuple(config.features):
        raise RunError(f"{warm_start}: cannot warm-start from it: its feature spec differs "
                       "from this experiment's; train from scratch (no warm start)")
    if json.dumps(fsutil.read_json(os.path.join(warm_start, "experiment.json"))["model"],
                  sort_keys=True) != json.dumps(config.to_dict()["model"], sort_keys=True):
        raise RunError(f"{warm_start}: cannot warm-start from it: its model section differs")
    return features


def _dataset(model: FMModel, split: Split, config: ExperimentConfig, training: bool,
             negatives=None, callbacks: list | None = None,
             slots: tuple[np.ndarray, np.ndarray] | None = None):
    """Encodes a split once and serves it as batches of ``(slots, labels, weights)``;
    returns the dataset and, for training, the `trained_rows` mask of its rows (and of the
    catalog `negatives` draws from), else None.

    Training batches come from a fresh full permutation every epoch, gathered in-graph from
    the encoded arrays: an exact shuffle that costs one gather per batch, where a per-row
    shuffle buffer would cost far more than the FM step itself. With `negatives`
    (`fm_keras.negatives.SampledNegatives`) each batch gets its sampled negatives. With
    `model.l2_prior` (binary and regression), the training split's id counts set the prior and
    its `EmpiricalBayesPrior` joins `callbacks`. `slots`: the split already encoded.
    """
    ids, values = slots if slots is not None else model.encoder.encode_numpy(split.features)
    trained = None
    if training:
        sample = np.random.default_rng(config.training.seed).permutation(len(ids))[:4096]
        counts = np.bincount(ids[values != 0], minlength=model.fm.num_ids)
        callback = attach_prior(model, config, counts, ids[sample], values[sample], split.labels)
        if callbacks is not None and callback is not None:
            callbacks.append(callback)
        trained = trained_rows(model.fm.num_ids, ids[values == 0],
                               *([negatives.catalog_slots[0]] if negatives else []),
                               counts=counts)
    weights = (sample_weights(split.labels, config.training) if training
               else np.ones(len(split), np.float32))
    if negatives is not None:
        return negatives.dataset(ids, values, split.labels, weights, config.training.batch_size,
                                 config.training.seed), trained
    return batched_dataset(ids, values, split.labels, weights,
                           config.training.batch_size if training else 8192,
                           shuffle_seed=config.training.seed if training else None), trained


def _dropped_text(split: Split) -> str:
    if not split.dropped:
        return ""
    return " (filtered out: " + ", ".join(f"{k} {v:,}" for k, v in split.dropped.items()) + ")"
