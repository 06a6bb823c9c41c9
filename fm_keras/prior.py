"""Empirical Bayes for `model.l2_prior`: each feature's prior precision, re-estimated each epoch.

`FactorizationMachine(l2_prior=tau)` puts a Gaussian prior N(0, 1/tau) on every id's linear
weight and factors. One tau cannot suit every data set: id effects on a synthetic set may be a
tenth of those of users on MovieLens, so a tau that holds the first back crushes the second.
Bayesian FMs (Freudenthaler, Schmidt-Thieme and Rendle, "Bayesian Factorization Machines",
NIPS workshop 2011; libFM's MCMC, Rendle, ACM TIST 2012) give each feature f its own precision
lambda_f with a Gamma(alpha0, beta0) hyperprior and infer it from the parameters. This module
does a point-estimate version between epochs (`precision`, an EM step): for the D_f numbers
of feature f, tau_f = (alpha0 + D_f/2) / (beta0 + 1/2 sum_j (theta_j^2 + var_j)) with var_j =
dims / (n_j h + tau_f) the posterior variance of id j (n_j rows, loss curvature h per row).
Training starts from a strong prior (`model.l2_prior`) and each feature's precision falls to
what its ids' effects support: far for MovieLens users, little for weak synthetic ids. The
linear weights and the factors get separate precisions; the factor curvature is scaled by the
mean squared factor sum of the other slots of a row, which is what a factor multiplies.

EM alone barely moves when each id carries little information (its posterior is mostly
prior): with validation rows (`model.l2_prior_validation`) each EM step is followed by a line
search of every precision on the validation loss (`fm_keras.prior_search`).
"""

from __future__ import annotations

import numpy as np

from fm_keras._tf import keras, tf
from fm_keras.config import ExperimentConfig
from fm_keras.data import sample_weights
from fm_keras.prior_search import Slots, search

ALPHA0 = BETA0 = 1.0  # libFM's Gamma hyperprior on each precision
_FIXED_POINT_STEPS = 20
TAU_RANGE = (1e-3, 1e6)
MAX_VALIDATION_ROWS = 200_000  # the line search's cost per epoch is linear in them


def precision(theta_sq: np.ndarray, counts: np.ndarray, curvature: float, dims: int,
              tau: float) -> float:
    """One EM update of a feature's prior precision, iterated with the fit held fixed.

    ``tau = (alpha0 + D/2) / (beta0 + 1/2 sum_j (theta_j^2 + dims / (n_j h + tau)))``: the
    fitted parameters plus each id's posterior variance (large for ids with few rows, so
    they pull the estimate towards the prior instead of towards 0).

    Args:
        theta_sq: sum of squares of each id's fitted parameters [ids] (w_j^2 or ||v_j||^2).
        counts: training rows of each id [ids]; ids with 0 rows are left out.
        curvature: loss curvature per row and parameter (h above).
        dims: numbers per id (1 for the linear weight, k for the factors).
        tau: the current precision (the starting point).

    Returns:
        The new precision within `TAU_RANGE`.
    """
    seen = counts > 0
    theta_sq, info = theta_sq[seen], counts[seen].astype(np.float64) * curvature
    if not len(info):
        return tau
    for _ in range(_FIXED_POINT_STEPS):
        expected = float(np.sum(theta_sq + dims / (info + tau)))
        tau = (ALPHA0 + dims * len(info) / 2) / (BETA0 + 0.5 * expected)
        tau = float(np.clip(tau, *TAU_RANGE))
    return tau


def curvature(task: str, labels: np.ndarray, weights: np.ndarray,
              counts: np.ndarray | None = None) -> float:
    """Mean per-row second derivative of the training loss at the base rate.

    Binary: mean(w) * p (1 - p) with p the weighted positive rate (logistic loss);
    regression: 2 (Keras's mean squared error). With `counts`, entry i of `labels` and
    `weights` stands for counts[i] rows (a label histogram).
    """
    if task == "regression":
        return 2.0
    weights = np.asarray(weights, np.float64)
    rows = float(len(weights) if counts is None else np.sum(counts))
    if counts is not None:
        weights = weights * np.asarray(counts, np.float64)
    p = float(np.sum(weights * labels) / np.sum(weights))
    return float(np.sum(weights)) / rows * max(p * (1 - p), 1e-6)


class EmpiricalBayesPrior(keras.callbacks.Callback):
    """Re-estimates each feature's `l2_prior` precisions between epochs (see module doc).

    Args:
        model: the `FMModel` (its ``fm`` layer must have ``l2_prior > 0``).
        counts: training rows per id [num_ids].
        ids, values: a sample of encoded training rows [rows, slots] (a few thousand suffice),
            for the factor curvature.
        curvature_per_row: `curvature` of the training labels and weights.
        task: ``binary`` or ``regression`` (the validation loss of the line search).

    The update runs at the start of every epoch after the first, from the fit so far, rather
    than at the end of one: the line search (`fm_keras.prior_search.search`, once `search_on`
    has given it the validation rows) rescales the weights, and an epoch's validation metrics
    and its checkpoint must describe the same weights.

    Attributes:
        precisions: feature name -> ``{"linear": tau_w, "embeddings": tau_v}``, the last
            estimate (what run.json records).
    """

    def __init__(self, model, counts: np.ndarray, ids: np.ndarray, values: np.ndarray,
                 curvature_per_row: float, task: str = "binary"):
        super().__init__()
        self.task = task
        self.validation: Slots | None = None
        self.fm_model = model
        self.counts = np.asarray(counts, np.float64)
        self.sample = (np.asarray(ids), np.asarray(values, np.float64))
        self.h = float(curvature_per_row)
        encoder = model.encoder
        self.groups = [(f.config.name, o, f.size) for f, o in zip(encoder.features, encoder.offsets)]
        tau = model.fm.l2_prior
        self.precisions = {name: {"linear": tau, "embeddings": tau} for name, _, _ in self.groups}
        model.fm.set_prior(self.counts)

    def search_on(self, validation: Slots, seed: int = 0) -> None:
        """Follows every EM step with a line search of the precisions on `validation` (a
        sample of `MAX_VALIDATION_ROWS` rows of it when larger, drawn with `seed`)."""
        if len(validation.labels) > MAX_VALIDATION_ROWS:
            keep = np.sort(np.random.default_rng(seed).permutation(
                len(validation.labels))[:MAX_VALIDATION_ROWS])
            validation = Slots(validation.ids[keep], validation.values[keep],
                               validation.labels[keep], validation.offset)
        self.validation = validation

    def on_epoch_begin(self, epoch, logs=None):
        if epoch > 0:
            self.update()

    def adopt_restored(self) -> None:
        """Takes the precisions the layer's per-id L2 holds (tau = 2 n L2 of any seen id) where
        they differ from `precisions`: after ``--resume`` the checkpoint restored the last
        run's L2, and the re-estimation (and run.json) goes on from it instead of from
        `l2_prior`. Left as they are otherwise (float32 rounding of the same values)."""
        prior = np.asarray(tf.convert_to_tensor(self.fm_model.fm.prior), np.float64)
        for name, start, size in self.groups:
            part = slice(start, start + size)
            seen = self.counts[part] > 0
            if not seen.any():
                continue
            held = np.median(2.0 * self.counts[part][seen, None] * prior[part][seen], axis=0)
            for key, tau in zip(("linear", "embeddings"), held):
                if not np.isclose(tau, self.precisions[name][key], rtol=1e-4):
                    self.precisions[name][key] = float(tau)

    def update(self) -> None:
        """EM step of every feature's precisions, then the validation line search (if on);
        sets the layer's per-id L2 from them."""
        self.adopt_restored()  # after `--resume`: the checkpoint's, not `l2_prior`
        fm = self.fm_model.fm
        w = fm.linear.numpy().astype(np.float64)
        v = fm.embeddings.numpy().astype(np.float64)
        k = v.shape[1]
        ids, values = self.sample
        vx = v[ids] * values[..., None]                                      # [r, s, k]
        others = vx.sum(1, keepdims=True) - vx
        factor_h = self.h * float(np.mean(np.sum(others ** 2, -1)[values != 0])) / k
        factor_h = max(factor_h, 1e-12)
        for name, start, size in self.groups:
            part = slice(start, start + size)
            tau = self.precisions[name]
            tau["linear"] = precision(w[part] ** 2, self.counts[part], self.h, 1, tau["linear"])
            tau["embeddings"] = precision(np.sum(v[part] ** 2, 1), self.counts[part],
                                          factor_h, k, tau["embeddings"])
        if self.validation is not None:
            groups = [(name, slice(start, start + size)) for name, start, size in self.groups]
            info = {"linear": self.counts * self.h, "embeddings": self.counts * factor_h}
            w, v, self.precisions = search(self.task, float(fm.bias.numpy()), w, v,
                                           self.validation, groups, info, self.precisions,
                                           TAU_RANGE)
            fm.assign_parameters(linear=w, embeddings=v)
        tau_w, tau_v = np.empty_like(self.counts), np.empty_like(self.counts)
        for name, start, size in self.groups:
            part = slice(start, start + size)
            tau_w[part] = self.precisions[name]["linear"]
            tau_v[part] = self.precisions[name]["embeddings"]
        fm.set_prior(self.counts, tau_embeddings=tau_v, tau_linear=tau_w)


def attach_prior(model, config: ExperimentConfig, counts: np.ndarray, sample_ids: np.ndarray,
                 sample_values: np.ndarray, labels: np.ndarray,
                 label_counts: np.ndarray | None = None) -> EmpiricalBayesPrior | None:
    """Sets `model.l2_prior`'s per-id penalty from the training counts and returns the
    between-epoch re-estimation (`EmpiricalBayesPrior`) to pass to `fit`, if
    ``model.l2_prior_adaptive``; one machine and a cluster alike.

    Args:
        model: the built `fm_keras.model.FMModel`.
        config: the experiment (``model.l2_prior``, ``model.l2_prior_adaptive``, the task and
            the class weights of ``training``).
        counts: training rows per id, int [num_ids].
        sample_ids, sample_values: a sample of encoded training rows [rows, slots] (a few
            thousand), for the factor curvature.
        labels: the training labels, or with `label_counts` their distinct values.
        label_counts: rows per distinct label (a label histogram), or None.

    Returns:
        The callback, or None: no prior (``l2_prior: 0``, or ``task: retrieval``, which has
        none) or a fixed one.
    """
    if not model.fm.l2_prior or config.model.task == "retrieval":
        return None
    model.fm.set_prior(counts)
    if not config.model.l2_prior_adaptive:
        return None
    weights = sample_weights(labels, config.training)
    return EmpiricalBayesPrior(model, counts, sample_ids, sample_values,
                               curvature(config.model.task, labels, weights, label_counts),
                               config.model.task)
