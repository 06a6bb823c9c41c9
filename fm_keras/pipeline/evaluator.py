"""Evaluator: metrics of the candidate on the eval split, and the blessing.

Metrics: AUC, logloss, calibration (mean predicted / observed rate), ECE, a calibration curve,
and recall@K of the approximate index (ScaNN or partitioned: the backend and settings
IndexBuilder will use; brute force is exact) against exact search over the item catalog. The
candidate is blessed when every configured value threshold holds and, if there is a last
blessed model, it does not regress beyond the tolerances when both are scored on the same
eval rows. Not blessed is an outcome with its reasons, not an error.
"""

from __future__ import annotations

import os
from dataclasses import asdict

import numpy as np

from fm_keras.evaluation import binary_metrics, calibration_curve
from fm_keras.pipeline.config import EvaluatorConfig, IndexConfig, PipelineConfig


def score_run(run_dir: str, config: PipelineConfig, examples_dir: str) -> dict:
    """Metrics and calibration curve of a finished run on the eval split."""
    from fm_keras.data import load_split
    from fm_keras.training import load_run, predict_split

    run = load_run(run_dir)
    split = load_split([os.path.join(examples_dir, "eval.parquet")], config.features,
                       config.data.label, (), task=config.model.task)
    probs = predict_split(run.model, split)["probability"]
    metrics = binary_metrics(split.labels, probs)
    metrics["calibration_curve"] = calibration_curve(split.labels, probs)
    return metrics


def recall_at_k(export_dir: str, config: PipelineConfig, examples_dir: str) -> dict:
    """recall@K of the index IndexBuilder would build, against exact search, on eval users."""
    import pandas as pd

    from fm_keras.recall import item_vectors, make_index, read_catalog
    from fm_keras.servables import load_export
    from fm_keras._tf import tf

    _, ranking, meta = load_export(export_dir)
    _, columns = read_catalog(config.data.items, meta, "item_id")
    vectors = item_vectors(ranking, columns)
    k = min(config.index.k, len(vectors))
    frame = pd.read_parquet(os.path.join(examples_dir, "eval.parquet"))
    frame = frame.drop_duplicates(subset=meta["query_features"]).head(config.evaluator.recall_queries)
    fn = ranking.signatures["user_tower"]
    inputs = {name: tf.constant(_column(frame[name], spec.dtype))
              for name, spec in fn.structured_input_signature[1].items()}
    users = fn(**inputs)["user_vector"].numpy()
    params = index_params(config.index, len(vectors), k)
    scores, _ = make_index(config.index.backend, vectors, k, params).search(
        tf.constant(users), k)
    exact = np.sort(users @ vectors.T, axis=1)[:, ::-1][:, :k]
    # Compared by score (ties between items make ids ambiguous): a retrieved item counts when
    # its score reaches the exact k-th best score.
    found = np.sum(scores.numpy() >= exact[:, -1:] - 1e-5, axis=1)
    return {"recall_at_k": float(np.mean(np.minimum(found, k) / k)), "k": k,
            "queries": int(len(users)), "items": int(len(vectors)),
            "backend": config.index.backend,
            "index": "exact" if params is None else asdict(params)}


def index_params(index: IndexConfig, items: int, k: int):
    """The settings IndexBuilder builds with: sized by catalog unless the config sets them."""
    from fm_keras.recall import index_settings

    if index.backend == "brute_force":
        return None
    return index_settings(index.backend, items, k, partitions=index.num_leaves,
                          partitions_to_search=index.leaves_to_search, rescore=index.reorder)


def _column(series, dtype):
    import pandas as pd

    if dtype.name == "string":
        return series.astype(str).to_numpy(dtype=object)
    return pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float32)


def blessing(candidate: dict, baseline: dict | None, config: EvaluatorConfig) -> dict:
    """{"blessed": bool, "checks": [...], "reasons": [failed checks in words]}."""
    checks = []

    def check(name, value, threshold, passed):
        checks.append({"check": name, "value": value, "threshold": threshold,
                       "passed": bool(passed)})

    calibration_error = (abs(candidate["calibration_ratio"] - 1)
                         if candidate.get("calibration_ratio") is not None else None)
    for name, value, threshold, ok in [
            ("min_auc", candidate.get("auc"), config.min_auc, lambda v, t: v >= t),
            ("max_logloss", candidate["logloss"], config.max_logloss, lambda v, t: v <= t),
            ("max_calibration_error", calibration_error, config.max_calibration_error,
             lambda v, t: v <= t),
            ("max_ece", candidate["ece"], config.max_ece, lambda v, t: v <= t),
            ("min_recall_at_k", candidate.get("recall_at_k"), config.min_recall_at_k,
             lambda v, t: v >= t)]:
        if threshold is not None:
            check(name, value, threshold, value is not None and ok(value, threshold))
    if baseline is not None:
        check("max_auc_regression", baseline["auc"] - candidate["auc"], config.max_auc_regression,
              candidate["auc"] >= baseline["auc"] - config.max_auc_regression)
        check("max_logloss_regression", candidate["logloss"] - baseline["logloss"],
              config.max_logloss_regression,
              candidate["logloss"] <= baseline["logloss"] + config.max_logloss_regression)
    reasons = [_reason(c) for c in checks if not c["passed"]]
    return {"blessed": not reasons, "checks": checks, "reasons": reasons,
            "baseline": baseline is not None}


def _reason(c: dict) -> str:
    value = "n/a" if c["value"] is None else f"{c['value']:.4f}"
    return f"{c['check']}: {value} vs threshold {c['threshold']}"
