"""Offline metrics: AUC, logloss, RMSE, calibration (mean predicted vs observed, ECE)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score

from fm_keras import fsutil
from fm_keras.data import load_split, single_class
from fm_keras.errors import ConfigError
from fm_keras.progress import log

if TYPE_CHECKING:
    from fm_keras.config import FilterConfig

_EPS = 1e-7


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 20) -> float:
    """ECE over equal-count bins of the predicted probability.

    Equal-width bins put nearly every row of a 5% CTR into the first bin; equal-count bins
    keep the measure informative: sum_b (n_b / n) * |mean(p_b) - mean(y_b)|.
    """
    total = 0.0
    for b in calibration_curve(labels, probs, bins):
        total += b["rows"] * abs(b["predicted"] - b["observed"])
    return total / len(probs)


def calibration_curve(labels: np.ndarray, probs: np.ndarray, bins: int = 10) -> list[dict]:
    """Equal-count bins of the predicted probability: mean predicted vs observed rate."""
    order = np.argsort(probs, kind="stable")
    return [{"predicted": float(probs[c].mean()), "observed": float(labels[c].mean()),
             "rows": int(len(c))} for c in np.array_split(order, min(bins, len(order)))]


def binary_metrics(labels: np.ndarray, probs: np.ndarray) -> dict:
    """AUC, logloss, mean predicted vs observed rate and ECE of probabilities [rows]."""
    labels = np.asarray(labels, dtype=np.float64)
    probs = np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1 - _EPS)
    both = 0 < labels.sum() < len(labels)
    observed = float(labels.mean())
    mean_pred = float(probs.mean())
    return {
        "auc": float(roc_auc_score(labels, probs)) if both else None,
        "logloss": float(log_loss(labels, probs, labels=[0, 1])),
        "mean_predicted": mean_pred,
        "observed_rate": observed,
        "calibration_ratio": mean_pred / observed if observed > 0 else None,
        "ece": expected_calibration_error(labels, probs),
        "rows": int(len(labels)),
    }


def regression_metrics(labels: np.ndarray, predictions: np.ndarray) -> dict:
    labels = np.asarray(labels, dtype=np.float64)
    predictions = np.asarray(predictions, dtype=np.float64)
    return {
        "rmse": float(np.sqrt(np.mean((labels - predictions) ** 2))),
        "mean_predicted": float(predictions.mean()),
        "observed_mean": float(labels.mean()),
        "rows": int(len(labels)),
    }


def metrics_for(task: str, labels: np.ndarray, outputs: dict[str, np.ndarray]) -> dict:
    """Metrics of model outputs; for CTR also the raw (uncorrected) probability's metrics."""
    if task == "regression":
        return regression_metrics(labels, outputs["prediction"])
    result = binary_metrics(labels, outputs["probability"])
    if not np.allclose(outputs["probability"], outputs["raw_probability"]):
        result["raw"] = binary_metrics(labels, outputs["raw_probability"])
    return result


def evaluate_run(run_dir: str, data: list[str] | str, batch_size: int = 65_536,
                 filters: Sequence[FilterConfig] | None = None,
                 reliability_plot: str | None = None) -> dict:
    """Loads a finished run and evaluates it on labeled files.

    Args:
        run_dir: a finished run directory.
        data: labeled CSV/Parquet files or globs.
        batch_size: rows per prediction batch.
        filters: row filters to apply; default (None) the run's own ``data.filters``. Pass
            another run's filters to score several runs on the same rows, or ``()`` for none.
        reliability_plot: if set, a PNG path for the reliability diagram of the calibrated
            (and the raw) probability (`write_reliability_plot`).

    A binary run evaluated on rows of one class (e.g. the implicit log of a run trained with
    ``training.negatives``) gets a warning: AUC is then undefined (null).

    Raises:
        ConfigError: the plot's directory does not exist, or the run is not a binary model.
    """
    from fm_keras.runs import load_run, predict_split  # TensorFlow: the metrics do without

    if reliability_plot and not os.path.isdir(os.path.dirname(os.path.abspath(reliability_plot))):
        raise ConfigError(f"{reliability_plot}: --reliability_plot: its directory does not exist")
    if reliability_plot and not reliability_plot.lower().endswith(".png"):
        raise ConfigError(f"{reliability_plot}: --reliability_plot: the diagram is a PNG; "
                          "name the file *.png")
    run = load_run(run_dir)
    if reliability_plot and run.config.model.task != "binary":
        raise ConfigError(f"{run_dir}: --reliability_plot: the run is a "
                          f"{run.config.model.task} model; a reliability diagram needs "
                          "probabilities (task binary)")
    filters = run.config.data.filters if filters is None else tuple(filters)
    split = load_split([data] if isinstance(data, str) else data, run.config.features,
                       run.config.data.label, filters, task=run.config.model.task)
    one = single_class(split.labels) if run.config.model.task == "binary" else None
    if one is not None:
        implicit = run.config.training.negatives.per_positive
        log(f"warning: {', '.join(split.files)}: every row has label {one:g}, so AUC is undefined "
            "(null) and logloss and ECE measure one class"
            + ("; the run was trained with training.negatives (an implicit log): evaluate it "
               "with 'fm-keras evaluate --items' (Recall@K)" if implicit else ""))
    outputs = predict_split(run.model, split, batch_size)
    result = metrics_for(run.config.model.task, split.labels, outputs)
    result["rows_read"] = split.rows_read
    result["dropped"] = split.dropped
    if reliability_plot:
        write_reliability_plot(reliability_plot, split.labels, outputs["probability"],
                               outputs["raw_probability"],
                               title=f"{os.path.basename(os.path.normpath(run_dir))}: "
                                     f"calibration {run.model.calibration.method}")
        result["reliability_plot"] = reliability_plot
    return result


def write_reliability_plot(path: str, labels: np.ndarray, probs: np.ndarray,
                           raw_probs: np.ndarray | None = None, bins: int = 20,
                           title: str = "") -> None:
    """A reliability diagram (PNG): observed rate against mean predicted probability.

    Uses the equal-count bins of `calibration_curve` (the ones ECE is
    computed from), the diagonal of perfect calibration, and below it the histogram of the
    predictions. Written atomically.

    Args:
        path: output PNG path; its directory must exist.
        labels, probs: 0/1 labels and calibrated probabilities, [rows].
        raw_probs: optionally the uncalibrated probabilities, drawn for comparison.
        bins: number of equal-count bins.
        title: plot title (ECE is appended).
    """
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5, 6.5), height_ratios=[3, 1], sharex=True)
    top = 0.0
    for name, p in (("probability", probs), ("raw_probability", raw_probs)):
        if p is None:
            continue
        curve = calibration_curve(labels, p, bins)
        xs, ys = [b["predicted"] for b in curve], [b["observed"] for b in curve]
        ece = expected_calibration_error(labels, p, bins)
        ax.plot(xs, ys, "o-" if name == "probability" else "s--", ms=4,
                label=f"{name} (ECE {ece:.4f})")
        hist.hist(p, bins=50, histtype="step", label=name)
        top = max(top, max(xs), max(ys))
    ax.plot([0, top * 1.05], [0, top * 1.05], "k:", label="perfectly calibrated")
    ax.set_ylabel("observed positive rate")
    ax.set_title(title or f"Reliability diagram ({bins} equal-count bins)")
    ax.legend(loc="upper left")
    hist.set_xlabel("predicted probability")
    hist.set_ylabel("rows")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    fsutil.write_bytes(path, buffer.getvalue())
