"""A training run's directory: the checks before a run, the callback that checkpoints it, and
loading a finished one. Every trainer (`fm_keras.training` on one machine, `fm_keras.retrieval`,
`fm_keras.distributed` on a cluster) writes runs through these, and every reader
(`fm_keras.evaluation`, `fm_keras.export`) loads them with `load_run`.

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

import json
import math
import os
import platform
import time
from dataclasses import dataclass

import numpy as np

from fm_keras import __version__, fsutil, hugepages
from fm_keras._tf import keras, tf
from fm_keras.calibration import Calibration, fit_calibration
from fm_keras.checkpoints import (LARGE_CHECKPOINT_SECONDS, BestWeights, CheckpointWriter,
                                  checkpoint_due, is_large, parameters_finite,
                                  saved_trained_rows)
from fm_keras.config import ExperimentConfig, TrainingConfig, experiment_from_dict
from fm_keras.convergence import (EarlyStopping, cap_warning, early_stopping_monitor,
                                  task_monitor)
from fm_keras.data import Split, single_class
from fm_keras.errors import RunError, TrainingDivergedError
from fm_keras.features import FittedFeature
from fm_keras.weights import read_weights
from fm_keras.model import FMModel, build_model
from fm_keras.progress import log


@dataclass
class Run:
    """A loaded, finished training run."""

    path: str
    config: ExperimentConfig
    features: tuple[FittedFeature, ...]
    model: FMModel
    info: dict


# What a resumed run may change: a run stopped by its epoch cap continues with a higher one;
# how its steps are run (`fm_keras.compiled_steps`, steps per graph call) changes no update.
RESUMABLE_CHANGES = frozenset({("training", "epochs"), ("training", "compiled_steps"),
                               ("training", "steps_per_execution")})


def check_run_dir(run_dir: str, resume: bool, config: ExperimentConfig | None = None) -> None:
    """Raises `RunError` unless `run_dir` may receive a new run (or, with `resume`, continue
    an unfinished one with the same experiment).

    Args:
        run_dir: the run directory (``--out``).
        resume: continue the unfinished run there.
        config: the experiment to run. With `resume`, it must equal the run's
            ``experiment.json`` except for `RESUMABLE_CHANGES` (its checkpoints were written
            for that model and data); without `config` that is not checked.

    Raises:
        RunError: `run_dir` is a file; holds a finished run; is not empty and holds no run or
            an unfinished one (without `resume`); or, with `resume`, holds a run of another
            experiment (the message names the first differing key).
    """
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise RunError(f"{run_dir}: is a file, not a run directory; choose another --out")
    if os.path.exists(os.path.join(run_dir, "run.json")):
        raise RunError(f"{run_dir}: holds a finished run; choose another --out or delete it")
    if resume:
        stored = os.path.join(run_dir, "experiment.json")
        if config is not None and os.path.exists(stored):
            difference = _first_difference(fsutil.read_json(stored),
                                           json.loads(json.dumps(config.to_dict())), ())
            if difference:
                key, was, now = difference
                raise RunError(f"{stored}: {key}: the run was started with {_short(was)}, "
                               f"this experiment has {_short(now)}; resume with the run's "
                               "experiment or train into a new --out")
        return
    if os.path.isdir(run_dir) and os.listdir(run_dir):
        if not os.path.exists(os.path.join(run_dir, "experiment.json")):
            raise RunError(f"{run_dir}: is not empty and holds no fm-keras run; choose a new "
                           "or empty --out")
        raise RunError(f"{run_dir}: holds an unfinished run; pass --resume to continue it, "
                       "or delete the directory")


def _first_difference(was, now, path: tuple) -> tuple[str, object, object] | None:
    """The first key path (dotted, list items by index) where two JSON documents differ, with
    both values; None if they are equal outside `RESUMABLE_CHANGES`."""
    if path in RESUMABLE_CHANGES:
        return None
    if isinstance(was, dict) and isinstance(now, dict):
        for key in sorted(set(was) | set(now)):
            found = _first_difference(was.get(key), now.get(key), (*path, key))
            if found:
                return found
        return None
    if isinstance(was, list) and isinstance(now, list) and len(was) == len(now):
        for i, (a, b) in enumerate(zip(was, now)):
            found = _first_difference(a, b, (*path, str(i)))
            if found:
                return found
        return None
    return None if was == now else (".".join(path) or "experiment", was, now)


def _short(value) -> str:
    """A value for a one-line message: scalars as written, lists and mappings by size."""
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return f"a mapping of {len(value)} keys"
    return repr(value)


def library_versions() -> dict:
    """Versions of fm_keras and the libraries a run depends on, and the memory pages its
    tables got (`fm_keras.hugepages.state`: it changes the speed of a step, not its result),
    for run.json."""
    import tensorflow_recommenders as tfrs

    return {"fm_keras": __version__, "tensorflow": tf.__version__,
            "tf_keras": keras.__version__, "tensorflow_recommenders": tfrs.__version__,
            "python": platform.python_version(),
            "transparent_huge_pages": hugepages.state()}


def load_run(run_dir: str) -> Run:
    """Loads a finished run: config, fitted features and best weights.

    Raises:
        RunError: no such directory, no run.json (unfinished: resume it), or a run whose
            status is not complete.
    """
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
    read_weights(model.fm, os.path.join(run_dir, "model", "weights"))
    return Run(run_dir, config, features, model, info)


def predict_split(model: FMModel, split: Split, batch_size: int = 65_536,
                  slots: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Model outputs for every row of an in-memory split.

    Args:
        slots: the split's rows already encoded (`FeatureEncoder.encode_numpy`: ids int32 and
            values float32 [rows, slots]); default: encoded here.

    Returns:
        output name -> float32 [rows] (``logit``, ``probability``, ``raw_probability`` for
        a binary model; ``prediction`` for regression), computed `batch_size` rows at a time.
    """
    ids, values = slots if slots is not None else model.encoder.encode_numpy(split.features,
                                                                             batch_size)
    logits = np.concatenate([
        _logits(model, ids[i:i + batch_size], values[i:i + batch_size]).numpy()
        for i in range(0, len(ids), batch_size)])
    return {k: np.asarray(v) for k, v in model.outputs_from_logit(tf.constant(logits)).items()}


@tf.function(reduce_retracing=True)
def _logits(model, ids, values):
    return model.logits(ids, values)


def calibrate(model: FMModel, valid_split: Split, training: TrainingConfig,
              slots: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """Fits ``model.calibration`` on the validation rows (binary task; after the best weights
    are restored): the configured ``training.calibration`` on the corrected logit. `slots`:
    the rows already encoded, as `predict_split` takes them."""
    if model.task_name != "binary":
        return
    model.calibration = fit_calibration(
        predict_split(model, valid_split, slots=slots)["logit"], valid_split.labels,
        training.calibration, model.logit_correction, training.seed)
    reason = (model.calibration.fit or {}).get("reason")  # why none was fitted, if not
    log(f"calibration: {model.calibration.method} (" + (
        reason if model.calibration.method == "none" and reason
        else f"fitted on {len(valid_split):,} validation rows") + ")")


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
        trained_rows: bool [num_ids], the rows of the id tables an epoch can change
            (`fm_keras.checkpoints.trained_rows`): the best-weights copy of a large table
            holds only those. None (unknown) copies whole tables; so does plain SGD with
            weight decay, which tf_keras applies to every row.
    """

    async_checkpoints = True  # large tables are checkpointed in the background
    best_in_memory = True  # the best weights as an in-memory copy, else a checkpoint per best
    checkpoint_seconds = LARGE_CHECKPOINT_SECONDS  # large tables: at most this often

    def __init__(self, run_dir: str, model: FMModel, config: ExperimentConfig, resume: bool,
                 base_loss: float | None = None, trained_rows: np.ndarray | None = None):
        super().__init__()
        self.config = config
        self.monitor, self.sign = task_monitor(config.model.task)
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.run_state = tf.Variable("", dtype=tf.string, trainable=False)
        ckpt_dir = os.path.join(run_dir, "checkpoints")
        self.large = is_large(model.fm.trainable_weights)
        background = self.large and self.async_checkpoints
        self.best_weights, self.best, tracked = None, None, {}
        if self.best_in_memory:
            # The trainable weights: the l2_prior penalties shape the loss, not the outputs.
            t = config.training
            if t.optimizer == "sgd" and t.weight_decay:  # tf_keras decays every row
                trained_rows = None
            latest = resume and tf.train.latest_checkpoint(os.path.join(ckpt_dir, "last"))
            if latest:  # the saved copy's rows, whatever the data holds now
                trained_rows = saved_trained_rows(latest, model.fm.num_ids)
            self.best_weights = BestWeights(model.fm.trainable_weights, trained_rows)
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
        self.warnings: list[str] = []  # run.json's, beside the epoch-cap one (`finish`)
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
    def early_stopped(self) -> bool:
        """True once early stopping has ended the run (not: the epoch cap was reached)."""
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
            # A gain under min_delta still moves the best epoch: say so when it is this one.
            last = (f", the last, ahead by less than {self.stopper.min_delta}"
                    if self.best_epoch == epoch + 1 else "")
            log(f"early stopping after epoch {epoch + 1}: {self.monitor} has not improved by "
                f"more than {self.stopper.min_delta} for {self.stopper.wait} epochs; "
                f"best was epoch {self.best_epoch}{last}")
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
                "history": self.history, "early_stopped": self.early_stopped, "monitor": self.monitor,
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
        return {"converged": warning is None,
                "warnings": [*self.warnings, *([warning] if warning else [])]}

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
    `state`) that drops the meaningless ``val_auc`` from the epoch logs (the warning also goes
    to run.json's ``warnings``); else returns [].
    """
    monitor, sign = early_stopping_monitor(state.config.model.task, valid.labels)
    if monitor == state.monitor:
        return []
    warning = (f"{valid.files[0] if valid.files else 'validation rows'}: label column "
               f"{state.config.data.label!r}: every validation row has label "
               f"{single_class(valid.labels):g}, so AUC is undefined; early stopping watches "
               f"{monitor} instead")
    log(f"warning: {warning}")
    state.warnings.append(warning)
    state.monitor, state.sign = monitor, sign
    return [keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: (logs or {}).pop("val_auc", None))]

