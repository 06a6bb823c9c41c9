"""Evaluator: thresholds, regression against the last blessed model, calibration, recall@K."""

import dataclasses

import numpy as np
import pytest

from fm_keras.pipeline.config import EvaluatorConfig, IndexConfig, load_pipeline
from fm_keras.evaluation import calibration_curve
from fm_keras.pipeline.evaluator import blessing, recall_at_k

GOOD = {"auc": 0.75, "logloss": 0.20, "calibration_ratio": 1.05, "ece": 0.01, "recall_at_k": 0.97}


def test_blessed_when_thresholds_hold_first_run_without_baseline():
    verdict = blessing(GOOD, None, EvaluatorConfig(min_auc=0.7, max_ece=0.02, min_recall_at_k=0.9))
    assert verdict["blessed"] and verdict["reasons"] == [] and not verdict["baseline"]
    assert [c["check"] for c in verdict["checks"]] == ["min_auc", "max_calibration_error",
                                                        "max_ece", "min_recall_at_k"]


@pytest.mark.parametrize("candidate,baseline,reason", [
    ({**GOOD, "auc": 0.52}, None, "min_auc: 0.5200 vs threshold 0.7"),
    ({**GOOD, "calibration_ratio": 1.6}, GOOD, "max_calibration_error: 0.6000 vs threshold 0.25"),
    ({**GOOD, "recall_at_k": 0.5}, GOOD, "min_recall_at_k: 0.5000 vs threshold 0.9"),
    ({**GOOD, "auc": 0.735}, GOOD, "max_auc_regression: 0.0150 vs threshold 0.01"),
    ({**GOOD, "logloss": 0.215}, GOOD, "max_logloss_regression: 0.0150 vs threshold 0.01"),
])
def test_not_blessed_says_which_check_failed(candidate, baseline, reason):
    verdict = blessing(candidate, baseline, EvaluatorConfig(min_auc=0.7, min_recall_at_k=0.9))
    assert not verdict["blessed"]
    assert verdict["reasons"] == [reason]


def test_small_regression_within_tolerance_is_blessed():
    verdict = blessing({**GOOD, "auc": 0.745}, GOOD, EvaluatorConfig(min_auc=0.7))
    assert verdict["blessed"] and verdict["baseline"]


def test_calibration_curve_bins():
    rng = np.random.default_rng(0)
    probs = rng.random(10_000) * 0.2
    labels = (rng.random(10_000) < probs).astype(float)
    curve = calibration_curve(labels, probs, bins=5)
    assert [b["rows"] for b in curve] == [2000] * 5
    for b in curve:  # well calibrated by construction
        assert b["observed"] == pytest.approx(b["predicted"], abs=0.02)


def test_recall_at_k_exact_and_approximate(pipeline_first_run):
    path, summary = pipeline_first_run
    config = load_pipeline(path)
    from fm_keras.pipeline.metadata import MetadataStore

    store = MetadataStore(f"{config.root}/metadata.sqlite")
    model = store.artifacts("Model")[-1]
    examples = store.artifacts("Examples")[-1]
    store.close()
    exact = dataclasses.replace(config, index=IndexConfig(k=20))  # 5,000 items: exact search
    result = recall_at_k(model.properties["export_dir"], exact, examples.uri)
    assert result["recall_at_k"] == 1.0 and result["index"] == "exact"
    coarse = dataclasses.replace(config, index=IndexConfig(k=20, num_leaves=50,
                                                           leaves_to_search=1, reorder=20))
    approximate = recall_at_k(model.properties["export_dir"], coarse, examples.uri)
    assert approximate["recall_at_k"] < 0.9
    assert approximate["queries"] == config.evaluator.recall_queries
    # The partitioned backend: exact when every block is searched (the default below 20k
    # items); with one of 500 partitions searched, its ANN fidelity with those settings.
    ivf = dataclasses.replace(config, index=IndexConfig(k=20, backend="partitioned"))
    result = recall_at_k(model.properties["export_dir"], ivf, examples.uri)
    assert result["backend"] == "partitioned" and result["recall_at_k"] == 1.0, result
    ivf = dataclasses.replace(config, index=IndexConfig(
        k=20, backend="partitioned", num_leaves=500, leaves_to_search=1, reorder=20))
    result = recall_at_k(model.properties["export_dir"], ivf, examples.uri)
    assert (result["index"]["num_partitions"], result["index"]["partitions_to_search"]) == \
        (500, 1)
    assert 0 < result["recall_at_k"] < 1.0, result
