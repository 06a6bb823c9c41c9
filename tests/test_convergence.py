"""Early stopping with min_delta and warmup, the epoch-cap warning, the base-rate loss."""

import numpy as np
import pytest

from fm_keras.config import TASKS
from fm_keras.convergence import (EarlyStopping, base_loss, cap_warning, early_stopping_monitor,
                                  task_monitor)


def test_base_loss_matches_numpy_reference():
    rng = np.random.default_rng(0)
    labels = (rng.random(1000) < 0.1).astype(np.float32)
    weights = np.where(labels > 0, 4.0, 1.0)
    # Reference: the weighted mean loss of the best constant probability, found by grid search.
    grid = np.linspace(0.001, 0.999, 9999)
    losses = [np.mean(weights * -(labels * np.log(p) + (1 - labels) * np.log(1 - p)))
              for p in grid]
    assert base_loss("binary", labels, weights) == pytest.approx(min(losses), rel=1e-5)
    y = rng.normal(3.0, 2.0, 500)
    assert base_loss("regression", y) == pytest.approx(np.var(y), rel=1e-9)
    assert base_loss("binary", np.zeros(10)) == 0.0


def test_patience_counts_only_gains_above_min_delta():
    stop = EarlyStopping(patience=2, min_delta=0.01)
    assert stop.update(1, 0.70)
    assert stop.update(2, 0.705)           # best (kept) but not by min_delta: counts
    assert stop.wait == 1 and not stop.stopped
    assert stop.update(3, 0.72) and stop.wait == 0
    assert not stop.update(4, 0.71)
    assert not stop.update(5, 0.715)
    assert stop.stopped and stop.best_epoch == 3 and stop.best_value == 0.72


def test_no_early_stop_before_learning_started():
    """Issue 11: a run whose training loss is still at the base-rate entropy must go on."""
    stop = EarlyStopping(patience=2, base_loss=0.20)
    for epoch in range(1, 6):                 # loss stuck at the base rate, AUC flat
        stop.update(epoch, 0.5, train_loss=0.1995)
    assert not stop.stopped and stop.wait == 0 and not stop.started
    stop.update(6, 0.6, train_loss=0.18)      # learning starts
    stop.update(7, 0.59, train_loss=0.17)
    stop.update(8, 0.58, train_loss=0.16)
    assert stop.started and stop.stopped and stop.best_epoch == 6


def test_round_trip_keeps_the_state():
    stop = EarlyStopping(patience=3, min_delta=1e-4, base_loss=0.3)
    stop.update(1, 0.6, 0.2)
    stop.update(2, 0.55, 0.19)
    again = EarlyStopping.from_dict(stop.to_dict())
    assert again == stop


def test_cap_warning_only_when_still_improving():
    improving = EarlyStopping(patience=2)
    for epoch, auc in enumerate([0.6, 0.7, 0.75], start=1):
        improving.update(epoch, auc)
    assert "raise training.epochs (now 3)" in cap_warning(improving, 3, 3)
    assert cap_warning(improving, 2, 3) is None          # not at the cap yet
    flat = EarlyStopping(patience=5)
    for epoch, auc in enumerate([0.6, 0.7, 0.69], start=1):
        flat.update(epoch, auc)
    assert cap_warning(flat, 3, 3) is None               # its last epoch was no gain
    stuck = EarlyStopping(patience=2, base_loss=0.20)
    for epoch, auc in enumerate([0.6, 0.55, 0.5], start=1):  # loss at the base rate
        stuck.update(epoch, auc, train_loss=0.1995)
    assert cap_warning(stuck, 3, 3) == (                  # not "still improving"
        "the epoch cap ended the run before early stopping could judge it: the mean training "
        "loss of its last epoch (3), 0.1995 against 0.2, is not yet 1% below the base rate's "
        "(the positive rate predicted for every row); raise training.epochs (now 3) or the "
        "learning rate")
    # A new user's trial: a loss 36% above the base rate's was called "still within 1%" of it.
    worse = EarlyStopping(patience=2, base_loss=0.569)
    for epoch, auc in enumerate([0.6, 0.55], start=1):
        worse.update(epoch, auc, train_loss=0.776)
    assert "last epoch (2), 0.776 against 0.569, is not yet 1% below" in cap_warning(worse, 2, 2)
    assert EarlyStopping.from_dict(worse.to_dict()) == worse  # the state file round-trips
    older = {k: v for k, v in worse.to_dict().items() if k != "train_loss"}
    assert "last epoch (2) is not yet 1% below" in cap_warning(EarlyStopping.from_dict(older), 2, 2)


@pytest.mark.parametrize("kwargs", [{"patience": 0}, {"patience": 2, "min_delta": -1.0},
                                    {"patience": 1.5}])
def test_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        EarlyStopping(**kwargs)



@pytest.mark.parametrize("task", ["binary", "regression"])
def test_base_loss_of_a_label_histogram_equals_the_expanded_labels(task):
    # Out-of-core training keeps the labels as a histogram (distinct value, rows).
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500).astype(float) if task == "binary" else \
        rng.integers(1, 6, 500).astype(float)
    weights = np.where(labels > 0.5, 3.0, 1.0) if task == "binary" else np.ones(500)
    values, counts = np.unique(labels, return_counts=True)
    value_weights = np.where(values > 0.5, 3.0, 1.0) if task == "binary" else np.ones(len(values))
    assert base_loss(task, values, value_weights, counts) == pytest.approx(
        base_loss(task, labels, weights), rel=1e-12)


def test_early_stopping_falls_back_to_logloss_when_auc_is_undefined():
    assert early_stopping_monitor("binary", np.array([0.0, 1.0, 0.0])) == ("val_auc", 1.0)
    assert early_stopping_monitor("binary", np.zeros(5)) == ("val_logloss", -1.0)
    assert early_stopping_monitor("binary", np.ones(5)) == ("val_logloss", -1.0)
    assert early_stopping_monitor("regression", np.ones(5)) == ("val_rmse", -1.0)


def test_every_task_has_one_monitor_with_its_direction():
    """Runs, early stopping and tune judge a task by one metric: AUC and Recall@K higher,
    RMSE lower; a task the config accepts always has one."""
    assert {task: task_monitor(task) for task in TASKS} == {
        "binary": ("val_auc", 1.0), "regression": ("val_rmse", -1.0),
        "retrieval": ("val_recall_at_k", 1.0)}
    with pytest.raises(KeyError):
        task_monitor("ranking")
