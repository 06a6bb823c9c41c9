"""Empirical Bayes prior precisions: the EM fixed point against known variances, and the
callback that sets the FM layer's per-id L2 from them."""

import numpy as np
import pytest

from fm_keras.prior import TAU_RANGE, curvature, precision


@pytest.mark.parametrize("sigma", [0.05, 0.3, 1.0])
def test_fixed_point_recovers_the_prior_variance(sigma):
    """From one fit at a wrong tau, precision() (EM with the fit rescaled) finds 1 / sigma^2."""
    rng = np.random.default_rng(0)
    counts = rng.integers(20, 2000, 20_000).astype(float)
    h, tau = 0.25, 10.0
    noise = rng.normal(size=len(counts))
    theta = rng.normal(0, sigma, len(counts))
    ml = theta + noise / np.sqrt(counts * h)
    tau = precision((ml * counts * h / (counts * h + tau)) ** 2, counts, h, 1, tau)
    assert tau == pytest.approx(1 / sigma ** 2, rel=0.1)


def test_ids_without_rows_are_left_out_and_result_is_clipped():
    counts = np.array([0.0, 0.0])
    assert precision(np.ones(2), counts, 0.25, 1, 7.0) == 7.0       # nothing seen: unchanged
    huge = precision(np.zeros(10_000), np.full(10_000, 1e6), 1.0, 1, 1.0)  # no signal at all
    assert TAU_RANGE[0] <= huge <= TAU_RANGE[1] and huge > 1e3


def test_curvature_is_the_weighted_bernoulli_variance():
    labels = np.array([1, 0, 0, 0], np.float32)
    assert curvature("binary", labels, np.ones(4)) == pytest.approx(0.25 * 0.75)
    weights = np.array([3.0, 1, 1, 1])                                 # pos_weight 3: p = 1/2
    assert curvature("binary", labels, weights) == pytest.approx(1.5 * 0.25)
    assert curvature("regression", labels, np.ones(4)) == 2.0
