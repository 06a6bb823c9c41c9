"""Metrics against direct NumPy computations; evaluating a run; the reliability plot."""

import os

import numpy as np
import pytest

from fm_keras.evaluation import (binary_metrics, expected_calibration_error, metrics_for,
                                 regression_metrics, write_reliability_plot)


def test_binary_metrics_against_numpy():
    rng = np.random.default_rng(0)
    probs = rng.uniform(0.01, 0.5, 2000)
    labels = (rng.random(2000) < probs).astype(float)
    m = binary_metrics(labels, probs)
    pos, neg = probs[labels == 1], probs[labels == 0]
    auc = np.mean(pos[:, None] > neg[None, :])  # probabilities are continuous: no ties
    assert m["auc"] == pytest.approx(auc, abs=1e-9)
    logloss = -np.mean(labels * np.log(probs) + (1 - labels) * np.log(1 - probs))
    assert m["logloss"] == pytest.approx(logloss, rel=1e-9)
    assert m["mean_predicted"] == pytest.approx(probs.mean())
    assert m["observed_rate"] == pytest.approx(labels.mean())


def test_ece_equal_count_bins():
    probs = np.array([0.1, 0.1, 0.2, 0.2, 0.9, 0.9])
    labels = np.array([0, 0, 1, 0, 1, 1])
    # 3 bins of 2 rows: |0.1-0| , |0.2-0.5| , |0.9-1|
    assert expected_calibration_error(labels, probs, bins=3) == pytest.approx((0.1 + 0.3 + 0.1) / 3)


def test_one_class_has_no_auc():
    assert binary_metrics(np.zeros(10), np.full(10, 0.1))["auc"] is None


def test_raw_metrics_only_when_corrected():
    labels = np.array([0, 1, 0, 1])
    p = np.array([0.2, 0.7, 0.3, 0.6])
    assert "raw" not in metrics_for("binary", labels, {"probability": p, "raw_probability": p})
    assert "raw" in metrics_for("binary", labels, {"probability": p, "raw_probability": p / 2})


def test_regression_rmse():
    assert regression_metrics(np.array([1.0, 2.0]), np.array([2.0, 4.0]))["rmse"] == pytest.approx(np.sqrt(2.5))


def test_evaluate_run_with_other_filters(small_synth, tmp_path):
    """Several runs are compared on the same rows by passing the filters explicitly."""
    import dataclasses

    import pandas as pd

    from fm_keras.config import load_experiment
    from fm_keras.evaluation import evaluate_run
    from fm_keras.training import train

    synth_dir, _ = small_synth
    config = load_experiment(os.path.join(synth_dir, "experiment.yaml"))
    config = dataclasses.replace(config, training=dataclasses.replace(
        config.training, epochs=1, steps_per_execution=8, batch_size=1024))
    run_dir = str(tmp_path / "run")
    train(config, run_dir, verbose=0)
    test_csv = os.path.join(synth_dir, "test.csv")
    cached = int(pd.read_csv(test_csv).is_cached.sum())
    own = evaluate_run(run_dir, test_csv)                     # default: the run's own filters
    assert own["dropped"] == {"cached_exposures": cached}
    assert own["rows"] == own["rows_read"] - cached
    unfiltered = evaluate_run(run_dir, test_csv, filters=())
    assert unfiltered["dropped"] == {} and unfiltered["rows"] == own["rows_read"]
    same = evaluate_run(run_dir, test_csv, filters=config.data.filters)
    assert same["auc"] == pytest.approx(own["auc"], abs=1e-12)


def test_reliability_plot_is_a_png_written_atomically(tmp_path):
    rng = np.random.default_rng(9)
    z = rng.normal(-1.0, 2.0, 5000)
    y = (rng.random(5000) < 1 / (1 + np.exp(-z))).astype(np.float32)
    path = str(tmp_path / "reliability.png")
    write_reliability_plot(path, y, 1 / (1 + np.exp(-z)), 1 / (1 + np.exp(-2 * z)))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path) == ["reliability.png"]


def test_auc_of_one_class_is_undefined_never_zero():
    assert binary_metrics(np.zeros(4), np.full(4, 0.2))["auc"] is None
