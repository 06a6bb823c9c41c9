"""Training runs: data -> fitted features -> encoded once -> fit with early stopping -> run dir.

A run directory holds::

    experiment.json   the resolved experiment config
    features.json     fitted vocabularies and statistics (the encoder is rebuilt from it)
    checkpoints/      last and best epoch (model + optimizer), for --resume
    state.json        epoch, best validation metric, patience counter, history
    model/            the final (best) FM weights, written atomically
    shards/           out of core only: the encoded training rows (`fm_keras.out_of_core`)
    run.json          written last: status "complete", metrics, rows, calibration, versions

A directory without a complete run.json is not a finished run: `load_run` refuses it, and
`train(..., resume=True)` continues it from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np

from fm_keras import __version__, fsutil, out_of_core
from fm_keras._tf import keras, tf
from fm_keras.calibration import Calibration, fit_calibration
from fm_keras.checkpoints import (LARGE_CHECKPOINT_SECONDS, BestWeights, CheckpointWriter,
                                  checkpoint_due, is_large, parameters_finite)
from fm_keras.config import ExperimentConfig, TrainingConfig, experiment_from_dict
from fm_keras.convergence import EarlyStopping, base_loss, cap_warning
from fm_keras.data import (Split, downsample_negatives, load_data_split, require_both_classes,
                           sample_weights, single_class)
from fm_keras.errors import ConfigError, RunError, TrainingDivergedError
from fm_keras.evaluation import early_stopping_monitor, metrics_for
from fm_keras.features import FittedFeature, fit_features
from fm_keras.model import FMModel, build_model, make_optimizer
from fm_keras.prior import EmpiricalBayesPrior, curvature
from fm_keras.progress import log


@dataclass
class Run:
    """A loaded, finished training run."""

    path: str
    config: ExperimentConfig
    features: tuple[FittedFeature, ...]
    model: FMModel
    info: dict


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
    """
    if config.training.distribute.cluster:
        from fm_keras.distributed import train_distributed

        if warm_start:
            raise ConfigError(f"{config.source}: training: distribute: a warm start from "
                              f"{warm_start} runs on one machine only; set strategy: none for "
                              "it, or train the cluster run from scratch")

        return train_distributed(config, run_dir, resume=resume, verbose=verbose)
    if config.model.task == "retrieval":
        from fm_keras.retrieval import train_retrieval

        if warm_start:
            raise ConfigError(f"{config.source}: model: task: retrieval runs cannot warm-start "
                              "yet; train from scratch")
        return train_retrieval(config, run_dir, resume=resume, verbose=verbose)
    started = time.time()
    check_run_dir(run_dir, resume)
    task = config.model.task
    ooc, why = out_of_core.choose(config)
    log(f"{'out-of-core' if ooc else 'in-memory'} training: {why}")
    if resume and os.path.exists(os.path.join(run_dir, "features.json")):
        given = tuple(FittedFeature.from_dict(d)
                      for d in fsutil.read_json(os.path.join(run_dir, "features.json")))
    else:
        given = _warm_start_features(warm_start, config) if warm_start else None
    label_counts = None  # out of core, the labels are a histogram: distinct values, rows
    if ooc:
        valid_split = load_data_split(config.data, "valid", config.features, task)
        fit = out_of_core.fit_pass(config, given)
        features, rows = fit.features, {"train_read": fit.rows_read, "dropped": fit.dropped}
        log(f"train: {fit.rows:,} rows from {len(fit.files)} file(s)" + _dropped_text(fit))
        if task == "binary":
            require_both_classes(Split({}, fit.labels, fit.rows, files=fit.files),
                                 config.data.label)
    else:
        train_split, valid_split, features = _in_memory_splits(config, given)
        rows = {"train_read": train_split.rows_read, "dropped": train_split.dropped}

    keras.utils.set_random_seed(config.training.seed)
    model = build_model(features, config.model, config.training)
    if warm_start and not resume:
        tf.train.Checkpoint(fm=model.fm).read(
            os.path.join(warm_start, "model", "weights")).expect_partial()
        log(f"warm start from {warm_start}")
    t0 = time.time()
    prior = []  # the empirical Bayes prior's callback, if any
    if ooc:
        shards = out_of_core.write_shards(config, model.encoder,
                                          out_of_core.shard_directory(config, run_dir, fit), fit)
        labels, label_counts = shards.labels, shards.label_counts
        _attach_prior(model, config, shards.counts, shards.sample_ids, shards.sample_values,
                      labels, label_counts, prior)
        train_ds = out_of_core.shard_dataset(shards, config.training, config.training.seed)
        rows["train"] = shards.rows
    elif config.training.negatives.per_positive:
        from fm_keras.negatives import SampledNegatives

        negatives = SampledNegatives(config, model.encoder, train_split)
        valid_split = negatives.with_negatives(valid_split, config.training.seed)
        train_ds = _dataset(model, train_split, config, training=True, negatives=negatives,
                            callbacks=prior)
    else:
        train_ds = _dataset(model, train_split, config, training=True, callbacks=prior)
    if not ooc:
        labels, rows["train"] = train_split.labels, len(train_split)
    valid_ds = _dataset(model, valid_split, config, training=False)
    log(f"encoded {rows['train']:,} + {len(valid_split):,} rows into "
        f"{model.encoder.num_slots} slots over {model.encoder.num_ids:,} ids "
        f"in {time.time() - t0:.1f}s")

    os.makedirs(run_dir, exist_ok=True)
    fsutil.write_json(os.path.join(run_dir, "experiment.json"), config.to_dict())
    fsutil.write_json(os.path.join(run_dir, "features.json"), [f.to_dict() for f in features])

    # Validation rows are unweighted; weighted_metrics=[] says so (and silences Keras).
    model.compile(optimizer=make_optimizer(config.training), weighted_metrics=[],
                  steps_per_execution=config.training.steps_per_execution)
    weights = sample_weights(labels, config.training)
    if config.training.negatives.per_positive:  # what an epoch trains on: sampled rows too
        labels, weights = negatives.epoch_labels(labels, weights)
    state = TrainingState(run_dir, model, config, resume=resume,
                          base_loss=base_loss(task, labels, weights, label_counts))
    t0 = time.time()
    if state.initial_epoch < config.training.epochs and not state.finished:
        with contextlib.redirect_stdout(sys.stderr):  # Keras prints progress to stdout
            model.fit(train_ds, validation_data=valid_ds, epochs=config.training.epochs,
                      initial_epoch=state.initial_epoch,
                      callbacks=[*prior, *watch_defined_metric(state, valid_split), state,
                                 *(callbacks or [])],
                      verbose=(1 if sys.stderr.isatty() else 2) if verbose is None else verbose)
    convergence = state.finish()
    train_seconds = time.time() - t0
    calibrate(model, valid_split, config.training)

    metrics = {"valid": metrics_for(task, valid_split.labels, predict_split(model, valid_split))}
    if config.data.test:
        test_split = load_data_split(config.data, "test", config.features, task)
        metrics["test"] = metrics_for(task, test_split.labels, predict_split(model, test_split))
        metrics["test"]["dropped"] = test_split.dropped
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


def calibrate(model: FMModel, valid_split: Split, training: TrainingConfig) -> None:
    """Fits ``model.calibration`` on the validation rows (binary task; after the best weights
    are restored): the configured ``training.calibration`` on the corrected logit."""
    if model.task_name != "binary":
        return
    model.calibration = fit_calibration(
        predict_split(model, valid_split)["logit"], valid_split.labels, training.calibration,
        model.logit_correction, training.seed)
    log(f"calibration: {model.calibration.method} (fitted on {len(valid_split):,} "
        "validation rows)")


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


def load_run(run_dir: str) -> Run:
    """Loads a finished run: config, fitted features and best weights."""
    run_json = os.path.join(run_dir, "run.json")
    if not os.path.isdir(run_dir):
        raise RunError(f"{run_dir}: no such run directory")
    if not os.path.exists(run_json):
        hint = (" (it has checkpoints: continue it with 'fm-keras train --resume')"
                if os.path.isdir(os.path.join(run_dir, "checkpoints")) else "")
        raise RunError(f"{run_dir}: not a finished fm_keras run, run.json is missing{hint}")
    info = fsutil.read_json(run_json)
    if info.get("status") != "complete":
        raise RunError(f"{run_dir}: run status is {info.get('status')!r}, not 'complete'")
    config = experiment_from_dict(fsutil.read_json(os.path.join(run_dir, "experiment.json")),
                                  source=os.path.join(run_dir, "experiment.json"))
    features = tuple(FittedFeature.from_dict(d)
                     for d in fsutil.read_json(os.path.join(run_dir, "features.json")))
    calibration = (Calibration.from_dict(info["calibration"]) if "calibration" in info
                   else None)
    model = build_model(features, config.model, config.training, calibration)
    tf.train.Checkpoint(fm=model.fm).read(
        os.path.join(run_dir, "model", "weights")).assert_existing_objects_matched()
    return Run(run_dir, config, features, model, info)


def predict_split(model: FMModel, split: Split, batch_size: int = 65_536) -> dict[str, np.ndarray]:
    """Model outputs for every row of an in-memory split."""
    ids, values = model.encoder.encode_numpy(split.features, batch_size)
    logits = np.concatenate([
        _logits(model, ids[i:i + batch_size], values[i:i + batch_size]).numpy()
        for i in range(0, len(ids), batch_size)])
    return {k: np.asarray(v) for k, v in model.outputs_from_logit(tf.constant(logits)).items()}


@tf.function(reduce_retracing=True)
def _logits(model, ids, values):
    return model.logits(ids, values)


class TrainingState(keras.callbacks.Callback):
    """Early stopping with best-weights restore, checkpoints, resume, divergence.

    One callback owns all of it so that a resumed run continues with the same best metric and
    patience counter it stopped with. The stopping rule itself (min_delta, no counting before
    learning started) is `fm_keras.convergence.EarlyStopping`; epochs are 1-based throughout.

    The best epoch's weights are an in-memory copy (`fm_keras.checkpoints.BestWeights`). The
    run's checkpoint (weights, optimizer, best copy, run state) is written every epoch for
    small tables; with large tables every `checkpoint_seconds` of training and at the last
    epoch, in the background, and the epoch-end finite check is sampled
    (`fm_keras.checkpoints`). ``state.json`` is written every epoch and says which epoch the
    checkpoint holds (``checkpoint_epoch``); `--resume` continues after that epoch, with the
    early-stopping state and history saved with it: the epochs trained after the checkpoint
    are trained again.

    Args:
        base_loss: the training loss of a model that has learned only the base rate
            (`fm_keras.convergence.base_loss`); None skips the warmup check.
    """

    async_checkpoints = True  # large tables are checkpointed in the background
    best_in_memory = True  # the best weights as an in-memory copy, else a checkpoint per best
    checkpoint_seconds = LARGE_CHECKPOINT_SECONDS  # large tables: at most this often

    def __init__(self, run_dir: str, model: FMModel, config: ExperimentConfig, resume: bool,
                 base_loss: float | None = None):
        super().__init__()
        self.config = config
        self.monitor = {"binary": "val_auc", "regression": "val_rmse",
                        "retrieval": "val_recall_at_k"}[config.model.task]
        self.sign = -1.0 if config.model.task == "regression" else 1.0
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.run_state = tf.Variable("", dtype=tf.string, trainable=False)
        ckpt_dir = os.path.join(run_dir, "checkpoints")
        self.large = is_large(model.fm.trainable_weights)
        background = self.large and self.async_checkpoints
        self.best_weights, self.best, tracked = None, None, {}
        if self.best_in_memory:
            # The trainable weights: the l2_prior penalties shape the loss, not the outputs.
            self.best_weights = BestWeights(model.fm.trainable_weights)
            tracked["best"] = self.best_weights.trackable
        else:
            self.best = CheckpointWriter(tf.train.Checkpoint(fm=model.fm),
                                         os.path.join(ckpt_dir, "best"), background)
        self.checkpoint = tf.train.Checkpoint(fm=model.fm, optimizer=model.optimizer,
                                              epoch=self.epoch, run_state=self.run_state,
                                              **tracked)
        self.last = CheckpointWriter(self.checkpoint, os.path.join(ckpt_dir, "last"), background)
        self.state_path = os.path.join(run_dir, "state.json")
        t = config.training
        self.stopper = EarlyStopping(t.early_stopping_patience, t.early_stopping_min_delta,
                                     base_loss)
        self.history: list[dict] = []
        self.checkpoint_epoch = 0
        self._checkpointed_at = time.monotonic()
        if resume and self.last.latest_checkpoint:
            self.checkpoint.restore(self.last.latest_checkpoint)
            saved = self.run_state.numpy().decode()
            state = json.loads(saved) if saved else fsutil.read_json(self.state_path)
            self.stopper = EarlyStopping.from_dict(state["early_stopping"])
            self.history = state["history"]
            self.checkpoint_epoch = int(self.epoch.numpy())
            log(f"resuming after epoch {self.checkpoint_epoch}, the checkpoint's (best "
                f"{self.monitor} {self.sign * self.stopper.best_value:.5f} at epoch "
                f"{self.stopper.best_epoch})")

    @property
    def initial_epoch(self) -> int:
        return int(self.epoch.numpy())

    @property
    def best_epoch(self) -> int:
        """1-based epoch whose weights `restore_best` restores (0 before the first epoch)."""
        return self.stopper.best_epoch

    @property
    def finished(self) -> bool:
        return self.stopper.stopped

    def on_train_begin(self, logs=None):
        self._checkpointed_at = time.monotonic()  # the interval counts training time only

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self._diverged(f"loss is {float(loss)} at step {batch}")

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        fm = self.model.fm
        if not parameters_finite(fm.trainable_weights, seed=epoch):
            self._diverged("parameters are not finite")
        value = self.sign * float(logs.get(self.monitor, math.nan))
        if not math.isfinite(value):
            self._diverged(f"{self.monitor} is {value}")
        self.history.append({k: float(v) for k, v in logs.items()})
        self.epoch.assign(epoch + 1)
        if self.stopper.update(epoch + 1, value, logs.get("loss")):
            if self.best_weights is not None:
                self.best_weights.save()
            else:
                self.best.save()
        if self.stopper.stopped:
            self.model.stop_training = True
            log(f"early stopping after epoch {epoch + 1}: {self.monitor} has not improved by "
                f"more than {self.stopper.min_delta} for {self.stopper.wait} epochs; "
                f"best was epoch {self.best_epoch}")
        last_epoch = self.stopper.stopped or epoch + 1 >= self.config.training.epochs
        if checkpoint_due(self.large, last_epoch, time.monotonic() - self._checkpointed_at,
                          self.checkpoint_seconds):
            self.run_state.assign(json.dumps(self.state_dict()))
            self.last.save()
            self.checkpoint_epoch = epoch + 1
            self._checkpointed_at = time.monotonic()
        fsutil.write_json(self.state_path,
                          {**self.state_dict(), "checkpoint_epoch": self.checkpoint_epoch})

    def state_dict(self) -> dict:
        """The run state a checkpoint holds: epoch, best epoch, history, early stopping."""
        return {"epoch": int(self.epoch.numpy()), "best_epoch": self.best_epoch,
                "history": self.history, "finished": self.finished, "monitor": self.monitor,
                "early_stopping": self.stopper.to_dict()}

    def convergence_warning(self) -> str | None:
        """`cap_warning` for this run (None if it stopped early or its last epoch was no gain)."""
        return cap_warning(self.stopper, len(self.history), self.config.training.epochs)

    def finish(self) -> dict:
        """Ends the fit: restores the best weights, logs the epoch-cap warning if the run was
        still improving, and returns run.json's ``{"converged", "warnings"}``."""
        self.restore_best()
        warning = self.convergence_warning()
        if warning:
            log(f"warning: {warning}")
        return {"converged": warning is None, "warnings": [warning] if warning else []}

    def restore_best(self) -> None:
        """Puts the best epoch's weights back (if an epoch ran) after the checkpoint writes
        finished; with large tables checks every element of them."""
        self.last.sync()
        if self.best_weights is not None:
            if self.best_epoch:
                self.best_weights.restore()
        else:
            self.best.sync()
            if self.best.latest_checkpoint:
                tf.train.Checkpoint(fm=self.model.fm).read(
                    self.best.latest_checkpoint).expect_partial()
        if self.large and not parameters_finite(self.model.fm.trainable_weights, sampled=False):
            self._diverged("parameters are not finite")

    def _diverged(self, what: str):
        t = self.config.training
        raise TrainingDivergedError(
            f"training diverged: {what}. Decrease training.learning_rate (now {t.learning_rate}), "
            f"increase model.l2_embeddings (now {self.config.model.l2_embeddings}), or check "
            "numeric features for extreme values")


def watch_defined_metric(state: TrainingState, valid: Split) -> list[keras.callbacks.Callback]:
    """Points `state` at validation logloss when the validation labels have one class.

    AUC is undefined on one class; Keras' AUC metric would report 0.0 every epoch and early
    stopping would keep the worst epoch. Logs a warning and returns a callback (to run before
    `state`) that drops the meaningless ``val_auc`` from the epoch logs; else returns [].
    """
    monitor, sign = early_stopping_monitor(state.config.model.task, valid.labels)
    if monitor == state.monitor:
        return []
    log(f"warning: {valid.files[0] if valid.files else 'validation rows'}: label column "
        f"{state.config.data.label!r}: every validation row has label "
        f"{single_class(valid.labels):g}, so AUC is undefined; early stopping watches "
        f"{monitor} instead")
    state.monitor, state.sign = monitor, sign
    return [keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: (logs or {}).pop("val_auc", None))]


def _dataset(model: FMModel, split: Split, config: ExperimentConfig, training: bool,
             negatives=None, callbacks: list | None = None):
    """Encodes a split once and serves it as batches of ``(slots, labels, weights)``.

    Training batches come from a fresh full permutation every epoch, gathered in-graph from
    the encoded arrays: an exact shuffle that costs one gather per batch, where a per-row
    shuffle buffer would cost far more than the FM step itself. With `negatives`
    (`fm_keras.negatives.SampledNegatives`) each batch gets its sampled negatives. With
    `model.l2_prior` (binary and regression), the training split's id counts set the prior and
    its `EmpiricalBayesPrior` joins `callbacks`.
    """
    ids, values = model.encoder.encode_numpy(split.features)
    if training:
        sample = np.random.default_rng(config.training.seed).permutation(len(ids))[:4096]
        _attach_prior(model, config, np.bincount(ids[values != 0], minlength=model.fm.num_ids),
                      ids[sample], values[sample], split.labels, None, callbacks)
    weights = (sample_weights(split.labels, config.training) if training
               else np.ones(len(split), np.float32))
    if negatives is not None:
        return negatives.dataset(ids, values, split.labels, weights, config.training.batch_size,
                                 config.training.seed)
    return batched_dataset(ids, values, split.labels, weights,
                           config.training.batch_size if training else 8192,
                           shuffle_seed=config.training.seed if training else None)


def _attach_prior(model: FMModel, config: ExperimentConfig, counts: np.ndarray,
                  sample_ids: np.ndarray, sample_values: np.ndarray, labels: np.ndarray,
                  label_counts: np.ndarray | None, callbacks: list | None) -> None:
    """Sets `model.l2_prior`'s id counts [num_ids] and, if adaptive, adds the
    `EmpiricalBayesPrior` (fed a sample of encoded rows) to `callbacks`. `labels` are the
    training labels, or with `label_counts` their histogram (distinct values, rows)."""
    if not model.fm.l2_prior or config.model.task == "retrieval":
        return
    model.fm.set_prior(counts)
    if config.model.l2_prior_adaptive and callbacks is not None:
        weights = sample_weights(labels, config.training)
        callbacks.append(EmpiricalBayesPrior(
            model, counts, sample_ids, sample_values,
            curvature(config.model.task, labels, weights, label_counts)))


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
            .apply(tf.data.experimental.assert_cardinality(num_batches)))


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


def check_run_dir(run_dir: str, resume: bool) -> None:
    """Raises `RunError` unless `run_dir` may receive a new run (or, with `resume`, continue
    an unfinished one)."""
    if os.path.exists(os.path.join(run_dir, "run.json")):
        raise RunError(f"{run_dir}: holds a finished run; choose another --out or delete it")
    if resume:
        return
    if os.path.isdir(run_dir) and os.listdir(run_dir):
        if not os.path.exists(os.path.join(run_dir, "experiment.json")):
            raise RunError(f"{run_dir}: is not empty and holds no fm-keras run; choose a new "
                           "or empty --out")
        raise RunError(f"{run_dir}: holds an unfinished run; pass --resume to continue it, "
                       "or delete the directory")


def _dropped_text(split: Split) -> str:
    if not split.dropped:
        return ""
    return " (filtered out: " + ", ".join(f"{k} {v:,}" for k, v in split.dropped.items()) + ")"


def library_versions() -> dict:
    """Versions of fm_keras and the libraries a run depends on, for run.json."""
    import tensorflow_recommenders as tfrs

    return {"fm_keras": __version__, "tensorflow": tf.__version__,
            "tf_keras": keras.__version__, "tensorflow_recommenders": tfrs.__version__,
            "python": platform.python_version()}
