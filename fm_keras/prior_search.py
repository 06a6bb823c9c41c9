"""Validation-driven prior precisions: each feature's `l2_prior` chosen on held-out rows.

The EM step of `fm_keras.prior` reads each feature's precision off the fitted parameters. When
the ids carry little information each (a few rows per user, effects of a few hundredths in
logit) every id's posterior is mostly prior, and EM barely moves from where it starts: on the
synthetic set it settles at tau ~20-30 for ids whose planted effects correspond to tau
~100-2500, so the ids keep fitting noise. libFM's adaptive regularization (SGDA; Rendle,
"Learning Recommender Systems with Adaptive Regularization", WSDM 2012) instead moves each
feature group's lambda by the gradient of the validation loss. This module does the same with a
line search per group: between epochs, for each feature and for its linear weights and its
factors in turn, it tries multiplying the precision tau by each of `MULTIPLIERS`, predicts the
fit under the new prior with the ridge (MAP) response of each id,

    theta_j(tau') = theta_j(tau) * (info_j + tau) / (info_j + tau'),   info_j = n_j * h,

scores the validation rows with it, and keeps the precision (and the rescaled parameters) with
the lowest validation logloss (mean squared error for regression). Groups are visited one at
a time, each given the others' choices (coordinate descent); a change must gain more than
`MIN_GAIN` (relative) so that noise on the validation rows does not move the prior. These are
the rows early stopping and the calibrator already use: 2 hyperparameters per feature, on a
coarse grid; the test split stays untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MULTIPLIERS = (1 / 16, 1 / 4, 1 / 2, 2.0, 4.0, 16.0)
MIN_GAIN = 1e-5  # relative validation-loss gain a change must beat


@dataclass
class Slots:
    """Encoded rows: ``ids`` int [rows, slots], ``values`` float [rows, slots], ``labels``
    [rows], and ``offset`` [] (the logit correction, or 0 for regression)."""

    ids: np.ndarray
    values: np.ndarray
    labels: np.ndarray
    offset: float = 0.0


def loss(task: str, logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean logloss (binary, from logits) or mean squared error (regression)."""
    if task == "regression":
        return float(np.mean((logits - labels) ** 2))
    return float(np.mean(np.logaddexp(0.0, logits) - labels * logits))


def search(task: str, bias: float, w: np.ndarray, v: np.ndarray, valid: Slots,
           groups: list[tuple[str, slice]], info: dict[str, np.ndarray],
           taus: dict[str, dict[str, float]],
           tau_range: tuple[float, float] = (0.0, np.inf)) -> tuple[np.ndarray, np.ndarray, dict]:
    """One pass of the line search over every feature's two precisions.

    Args:
        task: ``binary`` or ``regression``.
        bias, w, v: the fitted FM (w [num_ids], v [num_ids, k]); not modified.
        valid: the validation rows.
        groups: (feature name, its id range) for each feature.
        info: ``{"linear": [num_ids], "embeddings": [num_ids]}``: each id's training
            information n_j * h (0 for ids without training rows: they are left as they are).
        taus: feature name -> ``{"linear": tau_w, "embeddings": tau_v}``, the current
            precisions.
        tau_range: bounds of a precision; a multiplier that would leave them is clipped.

    Returns:
        ``(w, v, taus)``: the rescaled parameters and the chosen precisions (new objects).
    """
    w, v = w.astype(np.float64), v.astype(np.float64)
    taus = {name: dict(t) for name, t in taus.items()}
    ids, x = valid.ids, valid.values.astype(np.float64)
    lin = w[ids] * x                                                   # [r, s]
    vx = v[ids] * x[..., None]                                         # [r, s, k]
    # The logit's parts, updated as groups change: linear sum, factor sum, sum of squares.
    lin_sum, summed, squares = lin.sum(1), vx.sum(1), np.sum(vx ** 2, (1, 2))

    def score(lin_sum, summed, squares):
        logits = bias + valid.offset + lin_sum + 0.5 * (np.sum(summed ** 2, 1) - squares)
        return loss(task, logits, valid.labels)

    best = score(lin_sum, summed, squares)
    for name, part in groups:
        in_group = (ids >= part.start) & (ids < part.stop) & (x != 0)
        slots = np.flatnonzero(in_group.any(0))      # the slots this feature fills
        if not len(slots):
            continue
        g_ids, g_mask = ids[:, slots] - part.start, in_group[:, slots]   # [r, s_f]
        for kind in ("linear", "embeddings"):
            tau, n = taus[name][kind], info[kind][part]
            if not np.any(n > 0):
                continue
            choice = None
            for m in MULTIPLIERS:
                new_tau = float(np.clip(tau * m, *tau_range))
                if new_tau == tau:
                    continue
                scale = np.where(n > 0, (n + tau) / (n + new_tau), 1.0)    # [group ids]
                shrink = np.where(g_mask, scale[g_ids] - 1.0, 0.0)        # [r, s_f]
                if kind == "linear":
                    parts = (lin_sum + np.sum(lin[:, slots] * shrink, 1), summed, squares)
                else:
                    g_vx = vx[:, slots]
                    parts = (lin_sum, summed + np.sum(g_vx * shrink[..., None], 1),
                             squares + np.sum(np.sum(g_vx ** 2, 2) * ((shrink + 1) ** 2 - 1), 1))
                trial = score(*parts)
                if trial < best * (1 - MIN_GAIN) and (choice is None or trial < choice[0]):
                    choice = (trial, new_tau, scale, shrink, parts)
            if choice is None:
                continue
            best, taus[name][kind], scale, shrink, (lin_sum, summed, squares) = choice
            if kind == "linear":
                w[part] *= scale
                lin[:, slots] *= shrink + 1
            else:
                v[part] *= scale[:, None]
                vx[:, slots] *= (shrink + 1)[..., None]
    return w, v, taus
