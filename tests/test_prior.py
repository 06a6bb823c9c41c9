"""Empirical Bayes prior precisions: the EM fixed point against known variances, and the
callback that sets the FM layer's per-id L2 from them."""

import numpy as np
import pytest

from fm_keras.prior import TAU_RANGE, curvature, precision


@pytest.mark.parametrize("sigma", [0.05, 0.3, 1.0])
def test_fixed_point_recovers_the_prior_variance(sigma):
    """NumPy reference: Gaussian effects seen through n*h information, fitted as MAP at the
    current tau and re-estimated, settle on the true precision 1 / sigma^2."""
    rng = np.random.default_rng(0)
    counts = rng.integers(20, 2000, 20_000).astype(float)
    h, tau = 0.25, 10.0
    noise = rng.normal(size=len(counts))
    theta = rng.normal(0, sigma, len(counts))
    ml = theta + noise / np.sqrt(counts * h)
    for _ in range(30):   # damped: one call moves halfway (in log) towards the estimate
        fit = ml * counts * h / (counts * h + tau)
        tau = precision(fit ** 2, counts, h, 1, tau)
    assert tau == pytest.approx(1 / sigma ** 2, rel=0.1)


def test_ids_without_rows_are_left_out_and_result_is_clipped():
    counts = np.full(100, 3.0)                                         # rows << prior
    assert precision(np.ones(100), counts, 0.25, 1, 7.0) == 7.0       # too few measured ids
    tau = 1.0
    for _ in range(60):                                                # no signal at all
        tau = precision(np.zeros(10_000), np.full(10_000, 1e6), 1.0, 1, tau)
    assert TAU_RANGE[0] <= tau <= TAU_RANGE[1] and tau > 1e5


def test_curvature_is_the_weighted_bernoulli_variance():
    labels = np.array([1, 0, 0, 0], np.float32)
    assert curvature("binary", labels, np.ones(4)) == pytest.approx(0.25 * 0.75)
    weights = np.array([3.0, 1, 1, 1])                                 # pos_weight 3: p = 1/2
    assert curvature("binary", labels, weights) == pytest.approx(1.5 * 0.25)
    assert curvature("regression", labels, np.ones(4)) == 2.0
