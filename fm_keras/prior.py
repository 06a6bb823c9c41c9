"""Empirical Bayes for `model.l2_prior`: each feature's prior precision, re-estimated each epoch.

`FactorizationMachine(l2_prior=tau)` puts a Gaussian prior N(0, 1/tau) on every id's linear
weight and factors. One tau cannot suit every data set: id effects on a synthetic set may be a
tenth of those of users on MovieLens, so a tau that holds the first back crushes the second.
Bayesian FMs (Freudenthaler, Schmidt-Thieme and Rendle, "Bayesian Factorization Machines",
NIPS workshop 2011; libFM's MCMC, Rendle, ACM TIST 2012) give each feature f its own precision
lambda_f and infer it from the parameters. This module does a point-estimate version after
every epoch (`precision`): the prior variance of feature f is what the spread of its
well-measured ids' effects says it is, once the noise of their rows is subtracted. A feature
whose frequent ids agree on small effects gets a large precision (strong shrinkage of all its
ids, rare ones most), one with large effects a small one. The linear weights and the factors
get separate precisions; the factor curvature is scaled by the mean squared factor sum of the
other slots of a row, which is what a factor multiplies.
"""

from __future__ import annotations

import numpy as np

from fm_keras._tf import keras

MIN_IDS = 20  # well-measured ids needed before a feature's precision moves
TAU_RANGE = (1e-3, 1e6)


def precision(theta_sq: np.ndarray, counts: np.ndarray, curvature: float, dims: int,
              tau: float) -> float:
    """One feature's prior precision, estimated from its well-measured ids.

    An id whose data outweighs the prior (``n_j h >= tau``) has a fit close to its
    unregularized estimate ``m_j = fit_j * (n_j h + tau) / (n_j h)``, whose expected square is
    ``dims * (sigma^2 + 1/(n_j h))`` (the true effect plus the noise of n_j rows). So
    ``sigma^2 = mean_j(m_j^2 / dims - 1/(n_j h))`` over those ids (a method-of-moments
    estimate of the prior variance; rare ids, mostly prior, say little about it), and the new
    precision is the geometric mean of the old one and 1 / sigma^2 (damped: fits lag the
    prior by an epoch).

    Args:
        theta_sq: sum of squares of each id's fitted parameters [ids] (w_j^2 or ||v_j||^2).
        counts: training rows of each id [ids].
        curvature: loss curvature per row and parameter (h above).
        dims: numbers per id (1 for the linear weight, k for the factors).
        tau: the precision the parameters were fitted with.

    Returns:
        The new precision within `TAU_RANGE`; `tau` itself when fewer than `MIN_IDS` ids are
        well measured.
    """
    info = np.asarray(counts, np.float64) * curvature
    measured = info >= tau
    if int(np.sum(measured)) < MIN_IDS:
        return tau
    info = info[measured]
    ml_sq = theta_sq[measured] * ((info + tau) / info) ** 2
    variance = float(np.mean(ml_sq / dims - 1.0 / info))
    target = 1.0 / max(variance, 1.0 / TAU_RANGE[1])
    return float(np.clip(np.sqrt(tau * target), *TAU_RANGE))


def curvature(task: str, labels: np.ndarray, weights: np.ndarray) -> float:
    """Mean per-row second derivative of the training loss at the base rate.

    Binary: mean(w) * p (1 - p) with p the weighted positive rate (logistic loss);
    regression: 2 (Keras's mean squared error).
    """
    if task == "regression":
        return 2.0
    weights = np.asarray(weights, np.float64)
    p = float(np.sum(weights * labels) / np.sum(weights))
    return float(np.mean(weights)) * max(p * (1 - p), 1e-6)


class EmpiricalBayesPrior(keras.callbacks.Callback):
    """Re-estimates each feature's `l2_prior` precisions after every epoch (see module doc).

    Args:
        model: the `FMModel` (its ``fm`` layer must have ``l2_prior > 0``).
        counts: training rows per id [num_ids].
        ids, values: a sample of encoded training rows [rows, slots] (a few thousand suffice),
            for the factor curvature.
        curvature_per_row: `curvature` of the training labels and weights.

    Attributes:
        precisions: feature name -> ``{"linear": tau_w, "embeddings": tau_v}``, the last
            estimate (what run.json records).
    """

    def __init__(self, model, counts: np.ndarray, ids: np.ndarray, values: np.ndarray,
                 curvature_per_row: float):
        super().__init__()
        self.fm_model = model
        self.counts = np.asarray(counts, np.float64)
        self.sample = (np.asarray(ids), np.asarray(values, np.float64))
        self.h = float(curvature_per_row)
        encoder = model.encoder
        self.groups = [(f.config.name, o, f.size) for f, o in zip(encoder.features, encoder.offsets)]
        tau = model.fm.l2_prior
        self.precisions = {name: {"linear": tau, "embeddings": tau} for name, _, _ in self.groups}
        model.fm.set_prior(self.counts)

    def on_epoch_end(self, epoch, logs=None):
        fm = self.fm_model.fm
        w = fm.linear.numpy().astype(np.float64)
        v = fm.embeddings.numpy().astype(np.float64)
        k = v.shape[1]
        ids, values = self.sample
        vx = v[ids] * values[..., None]                                      # [r, s, k]
        others = vx.sum(1, keepdims=True) - vx
        factor_h = self.h * float(np.mean(np.sum(others ** 2, -1)[values != 0])) / k
        tau_w, tau_v = np.empty_like(self.counts), np.empty_like(self.counts)
        for name, start, size in self.groups:
            part = slice(start, start + size)
            tau = self.precisions[name]
            tau["linear"] = precision(w[part] ** 2, self.counts[part], self.h, 1, tau["linear"])
            tau["embeddings"] = precision(np.sum(v[part] ** 2, 1), self.counts[part],
                                          max(factor_h, 1e-12), k, tau["embeddings"])
            tau_w[part], tau_v[part] = tau["linear"], tau["embeddings"]
        fm.set_prior(self.counts, tau_embeddings=tau_v, tau_linear=tau_w)
