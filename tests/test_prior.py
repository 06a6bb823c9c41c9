"""Empirical Bayes prior precisions: the EM fixed point against known variances, and the
callback that sets the FM layer's per-id L2 from them."""

import numpy as np
import pytest

from fm_keras.prior import TAU_RANGE, curvature, precision


@pytest.mark.parametrize("sigma,low", [(0.05, 0.75), (0.3, 0.9), (1.0, 0.9)])
def test_em_settles_near_the_prior_variance(sigma, low):
    """NumPy reference: Gaussian effects seen through n*h information, fitted as MAP at the
    current tau, with an EM update per fit, settle near the true precision 1 / sigma^2 (a bit
    below it for weak effects: the Gamma(1, 1) hyperprior pulls towards small precisions)."""
    rng = np.random.default_rng(0)
    counts = rng.integers(20, 2000, 20_000).astype(float)
    h, tau = 0.25, 10.0
    ml = rng.normal(0, sigma, len(counts)) + rng.normal(size=len(counts)) / np.sqrt(counts * h)
    for _ in range(100):
        tau = precision((ml * counts * h / (counts * h + tau)) ** 2, counts, h, 1, tau)
    assert low / sigma ** 2 <= tau <= 1.02 / sigma ** 2


def test_ids_without_rows_are_left_out_and_no_signal_means_strong_prior():
    assert precision(np.ones(2), np.zeros(2), 0.25, 1, 7.0) == 7.0     # nothing seen: unchanged
    tau = precision(np.zeros(10_000), np.full(10_000, 1e6), 1.0, 1, 1.0)  # no signal at all
    assert TAU_RANGE[0] <= tau <= TAU_RANGE[1] and tau > 1e3


def test_curvature_is_the_weighted_bernoulli_variance():
    labels = np.array([1, 0, 0, 0], np.float32)
    assert curvature("binary", labels, np.ones(4)) == pytest.approx(0.25 * 0.75)
    weights = np.array([3.0, 1, 1, 1])                                 # pos_weight 3: p = 1/2
    assert curvature("binary", labels, weights) == pytest.approx(1.5 * 0.25)
    assert curvature("regression", labels, np.ones(4)) == 2.0


def test_curvature_of_a_label_histogram_equals_the_expanded_labels():
    labels = np.array([0.0] * 70 + [1.0] * 30)
    weights = np.where(labels > 0.5, 4.0, 1.0)
    assert curvature("binary", np.array([0.0, 1.0]), np.array([1.0, 4.0]),
                     np.array([70, 30])) == pytest.approx(curvature("binary", labels, weights),
                                                          rel=1e-12)
