"""Evaluator: metrics of the candidate on the eval split, and the blessing.

Metrics: AUC, logloss, calibration (mean predicted / observed rate), ECE, a calibration curve,
and `ann_recall_at_k`: the ANN fidelity of the approximate index (ScaNN or partitioned: the
backend and settings IndexBuilder will use; brute force is exact), its top-K against exact
search over the item catalog. A ``task: retrieval`` model is measured and blessed on its own
Recall@K over the catalog instead (exact search; each user's train items excluded), beside the
popularity baseline. The candidate is blessed when every configured value threshold holds and,
if there is a last blessed model, it does not regress beyond the tolerances when both are
scored on the same eval rows. Not blessed is an outcome with its reasons, not an error.
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
    from fm_keras.runs import load_run, predict_split

    run = load_run(run_dir)
    if config.model.task == "retrieval":
        return retrieval_metrics(run_dir, config, examples_dir)
    split = load_split([os.path.join(examples_dir, "eval.parquet")], config.features,
                       config.data.label, (), task=config.model.task)
    probs = predict_split(run.model, split)["probability"]
    metrics = binary_metrics(split.labels, probs)
    metrics["calibration_curve"] = calibration_curve(split.labels, probs)
    return metrics


def retrieval_metrics(run_dir: str, config: PipelineConfig, examples_dir: str) -> dict:
    """Recall@K (K = ``evaluator.recall_at``), NDCG@K, HitRate@K and coverage of a retrieval
    run on the eval split over the catalog, the train split's items excluded per user, with
    the popularity baseline; ``recall`` is the Recall@K that blessing checks."""
    from fm_keras.retrieval import evaluate_recall

    k = config.evaluator.recall_at
    result = evaluate_recall(run_dir, [os.path.join(examples_dir, "eval.parquet")],
                             config.data.items, [k],
                             exclude=[os.path.join(examples_dir, "train.parquet")])
    k = min(k, result["catalog"]["items"])
    return {**result, "recall": result[f"recall@{k}"], "recall_at": k}


def ann_recall_at_k(export_dir: str, config: PipelineConfig, examples_dir: str) -> dict:
    """ANN fidelity: recall@K of the index IndexBuilder would build against exact search
    (how many of the exact top-K the index returns), on eval users. Not the model's recall."""
    import pandas as pd

    from fm_keras.interactions import read_catalog
    from fm_keras.recall import item_vectors, make_index
    from fm_keras.servables import load_export
    from fm_keras._tf import tf

    _, ranking, meta = load_export(export_dir)
    _, columns = read_catalog(config.data.items, meta, "item_id")
    vectors = item_vectors(ranking, columns)
    k = min(config.index.k, len(vectors))
    frame = pd.read_parquet(os.path.join(examples_dir, "eval.parquet"))
    frame = frame.drop_duplicates(subset=meta["query_features"]).head(config.evaluator.ann_recall_queries)
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
    return {"ann_recall_at_k": float(np.mean(np.minimum(found, k) / k)), "k": k,
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

    if "recall" in candidate:  # a retrieval model: its Recall@K, not click probabilities
        thresholds = [("min_recall", candidate["recall"], config.min_recall, lambda v, t: v >= t)]
        regressions = [("max_recall_regression", "recall", 1.0, config.max_recall_regression)]
    else:
        calibration_error = (abs(candidate["calibration_ratio"] - 1)
                             if candidate.get("calibration_ratio") is not None else None)
        thresholds = [
            ("min_auc", candidate.get("auc"), config.min_auc, lambda v, t: v >= t),
            ("max_logloss", candidate["logloss"], config.max_logloss, lambda v, t: v <= t),
            ("max_calibration_error", calibration_error, config.max_calibration_error,
             lambda v, t: v <= t),
            ("max_ece", candidate["ece"], config.max_ece, lambda v, t: v <= t)]
        regressions = [("max_auc_regression", "auc", 1.0, config.max_auc_regression),
                       ("max_logloss_regression", "logloss", -1.0, config.max_logloss_regression)]
    thresholds.append(("min_ann_recall_at_k", candidate.get("ann_recall_at_k"),
                       config.min_ann_recall_at_k, lambda v, t: v >= t))
    for name, value, threshold, ok in thresholds:
        if threshold is not None:
            check(name, value, threshold, value is not None and ok(value, threshold))
    if baseline is not None:
        # sign +1: higher is better (the drop is baseline - candidate); -1: lower is better.
        for name, key, sign, tolerance in regressions:
            drop = sign * (baseline[key] - candidate[key])
            check(name, drop, tolerance, drop <= tolerance)
    reasons = [_reason(c) for c in checks if not c["passed"]]
    return {"blessed": not reasons, "checks": checks, "reasons": reasons,
            "baseline": baseline is not None}


def _reason(c: dict) -> str:
    value = "n/a" if c["value"] is None else f"{c['value']:.4f}"
    return f"{c['check']}: {value} vs threshold {c['threshold']}"
