"""Metrics against direct NumPy computations."""

import numpy as np
import pytest

from fm_keras.evaluation import binary_metrics, expected_calibration_error, metrics_for, regression_metrics


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
