"""Empirical Bayes for `model.l2_prior`: each feature's prior precision, re-estimated each epoch.

`FactorizationMachine(l2_prior=tau)` puts a Gaussian prior N(0, 1/tau) on every id's linear
weight and factors. One tau cannot suit every data set: id effects on a synthetic set may be a
tenth of those of users on MovieLens, so a tau that holds the first back crushes the second.
Bayesian FMs (Freudenthaler, Schmidt-Thieme and Rendle, "Bayesian Factorization Machines",
NIPS workshop 2011; libFM's MCMC, Rendle, ACM TIST 2012) give each feature f its own precision
lambda_f and infer it from the parameters. This module does the point-estimate version, type-II
maximum likelihood (empirical Bayes) after every epoch: in a Gaussian approximation an id seen
in n_j rows, with loss curvature h per row, has an unregularized estimate m_j (its fit at the
current tau, un-shrunk by (n_j h + tau) / (n_j h)) distributed as N(0, 1/tau_f + 1/(n_j h)),
and tau_f maximizes that likelihood over the feature's ids. Ids with few rows carry little
information and barely move it; a feature whose frequent ids agree on small effects gets a
large tau_f (strong shrinkage), one with large effects a small one. The fixed point EM would
crawl towards is found directly.
The linear weights and the factors get separate precisions; the factor curvature is scaled by
the mean squared factor sum of the other slots of a row, which is what a factor multiplies.
"""

from __future__ import annotations

import numpy as np

from fm_keras._tf import keras

# Hyperprior Gamma(alpha0, beta0) on each precision: flat (alpha0 = 1, beta0 = 0), i.e. type-II
# maximum likelihood. libFM's MCMC uses Gamma(1, 1), whose mean of 1 pulls the precision of
# weak id effects (true tau in the hundreds) far down when the likelihood is flat.
ALPHA0, BETA0 = 1.0, 0.0
TAU_RANGE = (1e-3, 1e6)


def precision(theta_sq: np.ndarray, counts: np.ndarray, curvature: float, dims: int,
              tau: float) -> float:
    """The maximum a posteriori prior precision of one feature, from its fit at `tau`.

    Each id's fit is treated as a Gaussian posterior mean: the unregularized estimate
    ``m_j = fit_j * (n_j h + tau) / (n_j h)`` has variance ``1/tau + 1/(n_j h)`` around 0,
    so tau_f maximizes ``sum_j log N(m_j; 0, 1/tau + 1/(n_j h))`` plus the Gamma(alpha0,
    beta0) hyperprior on a log grid, then refined: the fixed point EM moves towards, found
    directly (EM itself crawls where most ids have few rows).

    Args:
        theta_sq: sum of squares of each id's fitted parameters [ids] (w_j^2 or ||v_j||^2).
        counts: training rows of each id [ids]; ids with 0 rows are left out.
        curvature: loss curvature per row and parameter (h above).
        dims: numbers per id (1 for the linear weight, k for the factors).
        tau: the precision the parameters were fitted with.

    Returns:
        tau_f within `TAU_RANGE`.
    """
    seen = counts > 0
    info = counts[seen].astype(np.float64) * curvature
    if not len(info):
        return tau
    ml_sq = theta_sq[seen] * ((info + tau) / info) ** 2

    def log_posterior(log_tau):
        t = np.exp(log_tau)[:, None]
        var = 1.0 / t + 1.0 / info[None, :]
        return (-0.5 * np.sum(dims * np.log(var) + ml_sq[None, :] / var, axis=1)
                + (ALPHA0 - 1) * log_tau - BETA0 * t[:, 0])

    lo, hi = np.log(TAU_RANGE[0]), np.log(TAU_RANGE[1])
    for _ in range(3):  # a coarse grid, then two finer ones around its best point
        grid = np.linspace(lo, hi, 41)
        best = int(np.argmax(log_posterior(grid)))
        lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    return float(np.exp((lo + hi) / 2))


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
