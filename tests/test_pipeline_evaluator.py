"""Evaluator: thresholds, regression against the last blessed model, calibration, recall@K."""

import dataclasses

import numpy as np
import pytest

from fm_keras.pipeline.config import EvaluatorConfig, IndexConfig, load_pipeline
from fm_keras.evaluation import calibration_curve
from fm_keras.pipeline.evaluator import ann_recall_at_k, blessing

GOOD = {"auc": 0.75, "logloss": 0.20, "calibration_ratio": 1.05, "ece": 0.01, "ann_recall_at_k": 0.97}


def test_blessed_when_thresholds_hold_first_run_without_baseline():
    verdict = blessing(GOOD, None, EvaluatorConfig(min_auc=0.7, max_ece=0.02, min_ann_recall_at_k=0.9))
    assert verdict["blessed"] and verdict["reasons"] == [] and not verdict["baseline"]
    assert [c["check"] for c in verdict["checks"]] == ["min_auc", "max_calibration_error",
                                                        "max_ece", "min_ann_recall_at_k"]


@pytest.mark.parametrize("candidate,baseline,reason", [
    ({**GOOD, "auc": 0.52}, None, "min_auc: 0.5200 vs threshold 0.7"),
    ({**GOOD, "calibration_ratio": 1.6}, GOOD, "max_calibration_error: 0.6000 vs threshold 0.25"),
    ({**GOOD, "ann_recall_at_k": 0.5}, GOOD, "min_ann_recall_at_k: 0.5000 vs threshold 0.9"),
    ({**GOOD, "auc": 0.735}, GOOD, "max_auc_regression: 0.0150 vs threshold 0.01"),
    ({**GOOD, "logloss": 0.215}, GOOD, "max_logloss_regression: 0.0150 vs threshold 0.01"),
])
def test_not_blessed_says_which_check_failed(candidate, baseline, reason):
    verdict = blessing(candidate, baseline, EvaluatorConfig(min_auc=0.7, min_ann_recall_at_k=0.9))
    assert not verdict["blessed"]
    assert verdict["reasons"] == [reason]


def test_small_regression_within_tolerance_is_blessed():
    verdict = blessing({**GOOD, "auc": 0.745}, GOOD, EvaluatorConfig(min_auc=0.7))
    assert verdict["blessed"] and verdict["baseline"]


RETRIEVAL = {"recall": 0.30, "ndcg@50": 0.2, "popularity": {"recall@50": 0.2}}


def test_retrieval_run_blessed_on_recall_not_auc():
    config = EvaluatorConfig(min_auc=0.7, min_recall=0.25)
    verdict = blessing(RETRIEVAL, None, config)
    assert verdict["blessed"] and [c["check"] for c in verdict["checks"]] == ["min_recall"]
    low = blessing({**RETRIEVAL, "recall": 0.2}, None, config)
    assert low["reasons"] == ["min_recall: 0.2000 vs threshold 0.25"]


def test_retrieval_recall_regression_against_last_blessed():
    config = EvaluatorConfig(min_recall=None, max_recall_regression=0.01)
    assert blessing({**RETRIEVAL, "recall": 0.295}, RETRIEVAL, config)["blessed"]
    verdict = blessing({**RETRIEVAL, "recall": 0.28}, RETRIEVAL, config)
    assert verdict["reasons"] == ["max_recall_regression: 0.0200 vs threshold 0.01"]


@pytest.mark.parametrize("old,new", [("min_recall_at_k", "min_ann_recall_at_k"),
                                     ("recall_queries", "ann_recall_queries")])
def test_renamed_ann_keys_say_the_new_name(tmp_path, old, new):
    from pipeline_testlib import write_pipeline_yaml

    from fm_keras.errors import ConfigError

    path = write_pipeline_yaml(
        tmp_path / "p.yaml", tmp_path, tmp_path / "root", tmp_path, evaluator={old: 0.9},
        features=[{"name": "user_id", "kind": "categorical", "tower": "user"}])
    with pytest.raises(ConfigError, match=f"evaluator: {old} is now {new} .*ANN fidelity"):
        load_pipeline(path)


def test_calibration_curve_bins():
    rng = np.random.default_rng(0)
    probs = rng.random(10_000) * 0.2
    labels = (rng.random(10_000) < probs).astype(float)
    curve = calibration_curve(labels, probs, bins=5)
    assert [b["rows"] for b in curve] == [2000] * 5
    for b in curve:  # well calibrated by construction
        assert b["observed"] == pytest.approx(b["predicted"], abs=0.02)


def test_ann_recall_at_k_exact_and_approximate(pipeline_first_run):
    path, summary = pipeline_first_run
    config = load_pipeline(path)
    from fm_keras.pipeline.metadata import MetadataStore

    store = MetadataStore(f"{config.root}/metadata.sqlite")
    model = store.artifacts("Model")[-1]
    examples = store.artifacts("Examples")[-1]
    store.close()
    exact = dataclasses.replace(config, index=IndexConfig(k=20))  # 5,000 items: exact search
    result = ann_recall_at_k(model.properties["export_dir"], exact, examples.uri)
    assert result["ann_recall_at_k"] == 1.0 and result["index"] == "exact"
    coarse = dataclasses.replace(config, index=IndexConfig(k=20, num_leaves=50,
                                                           leaves_to_search=1, reorder=20))
    approximate = ann_recall_at_k(model.properties["export_dir"], coarse, examples.uri)
    assert approximate["ann_recall_at_k"] < 0.9
    assert approximate["queries"] == config.evaluator.ann_recall_queries
    # The partitioned backend: exact when every block is searched (the default below 20k
    # items); with one of 500 partitions searched, its ANN fidelity with those settings.
    ivf = dataclasses.replace(config, index=IndexConfig(k=20, backend="partitioned"))
    result = ann_recall_at_k(model.properties["export_dir"], ivf, examples.uri)
    assert result["backend"] == "partitioned" and result["ann_recall_at_k"] == 1.0, result
    ivf = dataclasses.replace(config, index=IndexConfig(
        k=20, backend="partitioned", num_leaves=500, leaves_to_search=1, reorder=20))
    result = ann_recall_at_k(model.properties["export_dir"], ivf, examples.uri)
    assert (result["index"]["num_partitions"], result["index"]["partitions_to_search"]) == \
        (500, 1)
    assert 0 < result["ann_recall_at_k"] < 1.0, result
