"""Calibrated probabilities: the logit correction, then Platt scaling or isotonic regression.

    probability = calibrator(z),   z = logit + logit_correction

`logit_correction` (= -log(pos_weight) + log(neg_sample_rate)) exactly undoes positive
weighting and negative downsampling; the calibrator, fitted on the validation split at the
end of training, fixes what is left (an FM trained to a loss minimum on sparse ids is often
over- or under-confident on new data). Methods:

- ``none``: sigmoid(z).
- ``platt``: sigmoid(a * z + b), a > 0 (Platt, "Probabilistic outputs for support vector
  machines", 1999; fitted by unregularized logistic regression on z, without Platt's
  target smoothing: validation sets here have thousands of rows).
- ``isotonic``: isotonic regression of the labels on z (Zadrozny & Elkan, KDD 2002), in
  its centered form (Oron & Flournoy, "Centered Isotonic Regression", Statistics in
  Biopharmaceutical Research 2017): one knot per pooled block, at the block's mean z with
  the block's positive rate, interpolated linearly between knots and constant beyond them.
  Plain isotonic regression is a staircase: flat plateaus (which would tie distinct logits)
  joined by near-vertical steps (where a float-noise change of the logit, ~1e-7 between the
  graph and NumPy, would move the probability by 1e-5). Knots at block centres are strictly
  increasing and spread each step over the blocks; knots closer than ``MIN_KNOT_GAP``
  (logit), and blocks of under 1% of the rows (at least 20: the extreme blocks of a few rows
  are all-negative or all-positive and would predict 0 or 1), are merged, weighted by rows.
  Computed in float64 in-graph, returned as float32. Beyond the outer knots the interpolation is flat, so
  ``TIE_SLOPE * (z - c)`` (c the middle of the knots) is added to its logit:
  p = sigmoid(logit(interp(z)) + TIE_SLOPE * (z - c)), strictly increasing everywhere and in
  (0, 1) at any base rate. It changes the odds by less than 0.5% within 5 logits of c, and
  keeps float32 probabilities distinct for logits more than ~1e-4 apart (an additive 1e-5
  term in probability space tied logits 4e-3 apart, which cost a weak model's test AUC 0.02
  on 2k rows). The order of items is given by ``logit`` / ``scores``, which calibration
  never touches.

``auto`` chooses among none, platt and isotonic by validation logloss with 2-fold
cross-fitting: each candidate is fitted on one half of the validation rows and scored on the
other, and the other way round; the winner is then refitted on all of them. Scoring a
calibrator on the rows it was fitted on would always favour isotonic regression, the most
flexible one. Every method is monotone non-decreasing in z, so no order (ranking or recall)
changes; the map is applied in-graph with stock TensorFlow ops (`Calibration.probability`)
in the model, the ranking export's ``probability`` and the recall export's
``probabilities``, and in NumPy (`Calibration.probability_numpy`) as the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

METHODS = ("none", "platt", "isotonic")
CHOICES = ("auto", *METHODS)
TIE_SLOPE = 1e-3
Y_EPS = 1e-6
MIN_KNOT_GAP = 0.05
MIN_BLOCK_SHARE = 0.01
MIN_BLOCK_ROWS = 20
_LOGLOSS_EPS = 1e-7


@dataclass(frozen=True)
class Calibration:
    """How a logit becomes a probability: ``calibrator(logit + logit_correction)``.

    Attributes:
        logit_correction: the exact undo of positive weighting and negative downsampling.
        method: ``none``, ``platt`` or ``isotonic``.
        parameters: ``{}`` for none; ``{"a", "b"}`` for platt; ``{"x", "y"}`` for isotonic:
            knots, x strictly increasing corrected logits and y non-decreasing probabilities
            in [Y_EPS, 1 - Y_EPS], both float32-exact.
        fit: how it was chosen (rows, cross-fitted logloss per candidate); informative only.
    """

    logit_correction: float = 0.0
    method: str = "none"
    parameters: dict = field(default_factory=dict)
    fit: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"calibration method must be one of {METHODS}, got {self.method!r}")
        if self.method == "platt" and not self.parameters.get("a", 0) > 0:
            raise ValueError(f"Platt scaling needs a > 0 to keep the order, got {self.parameters}")
        if self.method == "isotonic":
            x, y = (np.asarray(self.parameters.get(k, ()), np.float64) for k in ("x", "y"))
            if len(x) < 2 or len(x) != len(y) or np.any(np.diff(x) <= 0) or np.any(np.diff(y) < 0):
                raise ValueError("isotonic calibration needs >= 2 knots with x strictly "
                                 "increasing and y non-decreasing")

    def to_dict(self) -> dict:
        """JSON-ready: ``{"logit_correction", "method", "parameters", "fit"}``."""
        return {"logit_correction": self.logit_correction, "method": self.method,
                "parameters": self.parameters, "fit": self.fit,
                "probability": _FORMULAS[self.method]}

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        """Reads `to_dict` output (or a block that predates calibrators: method none)."""
        return cls(logit_correction=float(d.get("logit_correction", 0.0)),
                   method=d.get("method", "none"), parameters=dict(d.get("parameters") or {}),
                   fit=dict(d.get("fit") or {}))

    def probability(self, logit):
        """In-graph (stock TF ops): logit, float32 tensor of any shape -> same shape in (0, 1)."""
        from fm_keras._tf import tf

        z = logit + tf.cast(self.logit_correction, logit.dtype)
        if self.method == "none":
            return tf.sigmoid(z)
        if self.method == "platt":
            a, b = (tf.cast(self.parameters[k], z.dtype) for k in ("a", "b"))
            return tf.sigmoid(a * z + b)
        dtype, z = z.dtype, tf.cast(z, tf.float64)  # float64 inside: float32 out within 1 ulp
        x = tf.constant(self.parameters["x"], tf.float64)
        y = tf.constant(self.parameters["y"], tf.float64)
        flat = tf.clip_by_value(tf.reshape(z, [-1]), x[0], x[-1])
        last = len(self.parameters["x"]) - 2
        i = tf.clip_by_value(tf.searchsorted(x, flat, side="right") - 1, 0, last)
        x0, x1, y0, y1 = tf.gather(x, i), tf.gather(x, i + 1), tf.gather(y, i), tf.gather(y, i + 1)
        p = tf.reshape(y0 + (flat - x0) / (x1 - x0) * (y1 - y0), tf.shape(z))
        centre = (self.parameters["x"][0] + self.parameters["x"][-1]) / 2
        logit = tf.math.log(p) - tf.math.log1p(-p) + TIE_SLOPE * (z - centre)
        return tf.cast(tf.sigmoid(logit), dtype)

    def probability_numpy(self, logit: np.ndarray) -> np.ndarray:
        """The NumPy reference of `probability` (float64)."""
        z = np.asarray(logit, np.float64) + self.logit_correction
        if self.method == "none":
            return _sigmoid(z)
        if self.method == "platt":
            return _sigmoid(self.parameters["a"] * z + self.parameters["b"])
        x, y = self.parameters["x"], self.parameters["y"]
        p = np.interp(z, x, y)
        return _sigmoid(np.log(p) - np.log1p(-p) + TIE_SLOPE * (z - (x[0] + x[-1]) / 2))


_FORMULAS = {
    "none": "sigmoid(logit + logit_correction)",
    "platt": "sigmoid(a * (logit + logit_correction) + b)",
    "isotonic": "sigmoid(logit(interp(z; x, y)) + " f"{TIE_SLOPE} * (z - (x[0] + x[-1]) / 2)), "
                "z = logit + logit_correction",
}


def fit_calibration(logits: np.ndarray, labels: np.ndarray, method: str = "auto",
                    logit_correction: float = 0.0, seed: int = 0) -> Calibration:
    """Fits the calibrator of the corrected logits on labeled (validation) rows.

    Args:
        logits: model logits, [rows] (before the correction).
        labels: 0/1, [rows].
        method: ``auto`` (the lowest 2-fold cross-fitted logloss among none, platt and
            isotonic), ``platt``, ``isotonic`` or ``none``.
        logit_correction: added to the logits first.
        seed: the fold assignment of ``auto``.

    Returns:
        The fitted `Calibration`. Method none when the rows hold a single class (nothing to
        fit) or when Platt's slope is not positive (a model worse than chance: a calibrator
        must not reverse the order).

    Raises:
        ValueError: an unknown method or mismatched shapes.
    """
    if method not in CHOICES:
        raise ValueError(f"calibration must be one of {CHOICES}, got {method!r}")
    z = np.asarray(logits, np.float64).ravel() + logit_correction
    y = np.asarray(labels, np.float64).ravel()
    if z.shape != y.shape:
        raise ValueError(f"logits {z.shape} and labels {y.shape} differ in length")
    base = Calibration(logit_correction=float(logit_correction))
    fit = {"rows": int(len(y)), "requested": method}
    if method == "none" or len(y) < 4 or y.min() == y.max():
        return replace(base, fit={**fit, "reason": "requested" if method == "none"
                                  else "validation rows hold one class"})
    if method == "auto":
        scores = _cross_fitted_logloss(z, y, seed)
        method = min(scores, key=scores.get)  # dict order: simplest first on a tie
        fit["cross_fitted_logloss"] = {k: v if math.isfinite(v) else None
                                       for k, v in scores.items()}
    parameters = _FITTERS[method](z, y)
    if parameters is None:
        return replace(base, fit={**fit, "reason": f"{method}: slope not positive"})
    return replace(base, method=method, parameters=parameters, fit=fit)


def _fit_platt(z: np.ndarray, y: np.ndarray) -> dict | None:
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=np.inf, solver="lbfgs", max_iter=1000)  # unregularized
    lr.fit(z[:, None], y)
    a, b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
    return {"a": a, "b": b} if a > 0 else None


def _fit_isotonic(z: np.ndarray, y: np.ndarray) -> dict:
    """Centered isotonic regression: the pool-adjacent-violators fit (scikit-learn), one knot
    per block at its rows' mean z with the block's level; a knot closer than MIN_KNOT_GAP to
    the previous one, or a block of fewer than MIN_BLOCK_SHARE of the rows (the extreme
    blocks of a few rows are all-negative or all-positive), is merged into its neighbour
    (row-weighted: the merged level lies between the two, so levels stay increasing)."""
    from sklearn.isotonic import IsotonicRegression

    order = np.argsort(z, kind="stable")
    zs = z[order]
    level = IsotonicRegression(y_min=Y_EPS, y_max=1 - Y_EPS).fit_transform(zs, y[order])
    starts = np.flatnonzero(np.concatenate([[True], np.diff(level) > 0]))
    counts = np.diff(np.append(starts, len(zs))).astype(np.float64)
    blocks = [[c, v, n] for c, v, n in zip(np.add.reduceat(zs, starts) / counts,
                                           level[starts], counts)]
    min_rows = max(MIN_BLOCK_ROWS, MIN_BLOCK_SHARE * len(zs))
    knots = []
    for block in blocks + [None]:  # None: the end, where a small last block is merged
        if block is not None:
            knots.append(block)
        while len(knots) > 1 and (knots[-1][0] - knots[-2][0] < MIN_KNOT_GAP
                                  or knots[-2][2] < min_rows
                                  or (block is None and knots[-1][2] < min_rows)):
            (c1, v1, n1), (c2, v2, n2) = knots.pop(-2), knots.pop()
            knots.append([(c1 * n1 + c2 * n2) / (n1 + n2), (v1 * n1 + v2 * n2) / (n1 + n2),
                          n1 + n2])
    x = np.array([k[0] for k in knots], np.float32)
    v = np.array([k[1] for k in knots], np.float32)
    if len(x) == 1:
        x, v = np.array([x[0] - 1, x[0] + 1], np.float32), np.repeat(v, 2)
    return {"x": [float(t) for t in x], "y": [float(t) for t in np.maximum.accumulate(v)]}


def _fit_none(z: np.ndarray, y: np.ndarray) -> dict:
    return {}


_FITTERS = {"none": _fit_none, "platt": _fit_platt, "isotonic": _fit_isotonic}


def _cross_fitted_logloss(z: np.ndarray, y: np.ndarray, seed: int) -> dict[str, float]:
    """Logloss of each method on rows it was not fitted on (2 folds, both directions)."""
    fold = np.random.default_rng(seed).permutation(len(y)) % 2 == 0
    scores = {}
    for method, fitter in _FITTERS.items():
        total = 0.0
        for train in (fold, ~fold):
            if y[train].min() == y[train].max():
                total = math.inf
                break
            parameters = fitter(z[train], y[train])
            if parameters is None:
                total = math.inf
                break
            p = Calibration(method=method, parameters=parameters).probability_numpy(z[~train])
            total += _logloss_sum(y[~train], p)
        scores[method] = total / len(y)
    return scores


def _logloss_sum(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, _LOGLOSS_EPS, 1 - _LOGLOSS_EPS)
    return float(-np.sum(y * np.log(p) + (1 - y) * np.log1p(-p)))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * z))

