"""When training has converged: early stopping that waits for learning to start, and the
epoch-cap check.

Early stopping counts an epoch as an improvement only when the validation metric beats the best
so far by more than ``min_delta``, and stops after ``patience`` epochs without one. Two things
keep it from ending a run too soon or too late without a word:

- Warmup: while the training loss is still at the base-rate entropy (the loss of predicting the
  positive rate for every row, which a fresh model starts from), the model has not started
  learning; such epochs are not counted against the patience.
- Epoch cap: a run that reaches ``training.epochs`` while its last epoch was still its best is
  not converged; `cap_warning` says so, and the run records it.

Pure Python, no TensorFlow: the Keras callback in `fm_keras.runs` feeds it numbers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

# The training loss must fall below the base-rate entropy by this share of it before early
# stopping may count epochs: a model whose loss is within 1% of predicting the base rate has
# learned next to nothing yet.
STARTED_SHARE = 0.01


def base_loss(task: str, labels: np.ndarray, weights: np.ndarray | None = None,
              counts: np.ndarray | None = None) -> float:
    """The training loss of a model that has learned nothing but the base rate (or mean).

    Args:
        task: ``binary`` (logistic loss) or ``regression`` (squared loss).
        labels: array [rows]; {0, 1} for binary.
        weights: per-row training weights [rows] (e.g. pos_weight); default all 1.
        counts: rows per entry of `labels` [rows] (a label histogram, as out-of-core training
            keeps); default all 1.

    Returns:
        mean_i(w_i * loss(y_i, c)) for the best constant c, as Keras reports the training loss
        (the per-row weighted loss over the row count). For binary that is mean(w) times the
        base-rate entropy -(p log p + (1 - p) log(1 - p)) of the weighted positive rate p,
        in nats; for regression mean(w) times the weighted variance.
    """
    labels = np.asarray(labels, dtype=np.float64)
    weights = np.ones_like(labels) if weights is None else np.asarray(weights, np.float64)
    if counts is not None:  # a histogram: each entry stands for counts[i] rows
        weights = weights * np.asarray(counts, np.float64)
    rows = float(len(labels) if counts is None else np.sum(counts))
    p = float(np.sum(weights * labels) / np.sum(weights))
    if task == "regression":
        return float(np.sum(weights * (labels - p) ** 2)) / rows
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return float(np.sum(weights)) / rows * -(p * math.log(p) + (1 - p) * math.log(1 - p))


@dataclass
class EarlyStopping:
    """Patience on a validation metric (higher is better), with min_delta and warmup.

    Args:
        patience: epochs without an improvement (after learning started) before stopping.
        min_delta: an epoch improves only if it beats the best value by more than this.
        base_loss: the training loss of a model that has not learned (the base-rate entropy
            for logistic loss, scaled to the loss's weighting); None to skip the warmup check.

    Attributes:
        best_value: best metric so far (-inf before the first epoch).
        best_epoch: 1-based epoch of `best_value` (0 before the first epoch).
        wait: epochs counted against the patience since the last improvement.
        started: whether the training loss has left the base-rate entropy.
        stopped: whether `update` has asked to stop.
        train_loss: the last epoch's mean training loss, if given (None before).
    """

    patience: int
    min_delta: float = 0.0
    base_loss: float | None = None
    best_value: float = -math.inf
    best_epoch: int = 0
    wait: int = 0
    started: bool = False
    stopped: bool = False
    train_loss: float | None = None

    def __post_init__(self):
        if not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"patience must be an int >= 1, got {self.patience!r}")
        if not self.min_delta >= 0:
            raise ValueError(f"min_delta must be >= 0, got {self.min_delta!r}")

    def update(self, epoch: int, value: float, train_loss: float | None = None) -> bool:
        """Records one epoch; returns True when it is the new best (checkpoint it).

        Args:
            epoch: 1-based epoch number.
            value: the validation metric, higher is better (negate RMSE or logloss).
            train_loss: the epoch's mean training loss, for the warmup check.
        """
        self.train_loss = None if train_loss is None else float(train_loss)
        if not self.started:
            self.started = (self.base_loss is None or train_loss is None
                            or train_loss < self.base_loss * (1 - STARTED_SHARE))
        improved = value > self.best_value + self.min_delta or self.best_epoch == 0
        if improved:
            self.best_value, self.best_epoch, self.wait = value, epoch, 0
        elif value > self.best_value:  # better, but not by min_delta: keep it, keep counting
            self.best_value, self.best_epoch = value, epoch
            self.wait += 1 if self.started else 0
        elif self.started:
            self.wait += 1
        self.stopped = self.wait >= self.patience
        return self.best_epoch == epoch

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EarlyStopping:
        return cls(**d)


def cap_warning(stopper: EarlyStopping, epochs_run: int, epochs: int) -> str | None:
    """The warning for a run that hit its epoch cap while still improving, or before its
    training loss left the base rate's (it had not started to learn), else None.

    Args:
        stopper: the run's early stopping state.
        epochs_run: epochs trained so far (1-based count).
        epochs: the configured cap, ``training.epochs``.
    """
    if stopper.stopped or epochs_run < epochs:
        return None
    if not stopper.started:
        # Within the share above the base rate's loss, or worse than it: say which it was.
        loss = "" if stopper.train_loss is None or stopper.base_loss is None else \
            f", {stopper.train_loss:.4g} against {stopper.base_loss:.4g},"
        return (f"the epoch cap ended the run before early stopping could judge it: the mean "
                f"training loss of its last epoch ({epochs_run}){loss} is not yet "
                f"{STARTED_SHARE:.0%} below the base rate's (the positive rate predicted for "
                f"every row); raise training.epochs (now {epochs}) or the learning rate")
    if stopper.wait > 0:
        return None
    return (f"still improving at the last epoch ({epochs_run}); raise training.epochs "
            f"(now {epochs}) or the learning rate")


# Per task: the validation metric a run is judged on (its best epoch, early stopping, tune's
# objective) and its sign (+1: higher is better).
_TASK_MONITORS = {"binary": ("val_auc", 1.0), "regression": ("val_rmse", -1.0),
                  "retrieval": ("val_recall_at_k", 1.0)}


def task_monitor(task: str) -> tuple[str, float]:
    """The validation metric runs of `task` are judged on and its sign (+1: higher is better):
    ``val_auc`` (binary), ``val_rmse`` (regression), ``val_recall_at_k`` (retrieval).

    Raises:
        KeyError: not one of those tasks (the config validates `model.task` before).
    """
    return _TASK_MONITORS[task]


def early_stopping_monitor(task: str, valid_labels: np.ndarray) -> tuple[str, float]:
    """The validation metric early stopping watches and its sign (+1: higher is better).

    CTR watches ``val_auc``, except when the validation labels have one class: AUC is then
    undefined (never 0), and ``val_logloss`` is watched instead. Regression watches
    ``val_rmse``.
    """
    if task == "regression":
        return "val_rmse", -1.0
    labels = np.asarray(valid_labels)
    if len(labels) and np.all(labels == labels[0]):
        return "val_logloss", -1.0
    return "val_auc", 1.0
