"""Calibration: fits against scikit-learn / NumPy references, in-graph == NumPy, monotone,
auto's choice on held-out rows, serialization, the reliability plot."""

import itertools

import numpy as np
import pytest
import tensorflow as tf

from fm_keras.calibration import (MIN_BLOCK_ROWS, MIN_BLOCK_SHARE, MIN_KNOT_GAP, TIE_SLOPE,
                                  Y_EPS, Calibration, fit_calibration)


def _data(n, seed, truth=lambda z: 1 / (1 + np.exp(-z))):
    """Logits z ~ N(-1, 2) and labels drawn from truth(z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-1.0, 2.0, n)
    return z, (rng.random(n) < truth(z)).astype(np.float32)


def _logloss(y, p):
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def _step(z):  # a truth no sigmoid fits: flat, then a jump
    return np.where(z < 0, 0.05, 0.6)


def test_platt_recovers_the_planted_slope_and_intercept():
    z, y = _data(40_000, 0, truth=lambda z: 1 / (1 + np.exp(-(0.4 * z - 0.7))))
    cal = fit_calibration(z, y, "platt")
    assert cal.method == "platt"
    assert cal.parameters["a"] == pytest.approx(0.4, abs=0.03)
    assert cal.parameters["b"] == pytest.approx(-0.7, abs=0.05)


def _centered_isotonic_reference(z, y):
    """Slow and obvious: pool adjacent violators, clip, pool equal levels, knots at block
    centres, then merge (row-weighted) knots closer than MIN_KNOT_GAP and blocks of fewer
    than max(MIN_BLOCK_ROWS, MIN_BLOCK_SHARE * rows) rows."""
    order = np.argsort(z)
    blocks = []  # [sum z, sum y, rows]
    for zi, yi in zip(z[order], y[order]):
        blocks.append([zi, yi, 1])
        while len(blocks) > 1 and blocks[-2][1] / blocks[-2][2] >= blocks[-1][1] / blocks[-1][2]:
            last = blocks.pop()
            blocks[-1] = [a + b for a, b in zip(blocks[-1], last)]
    knots = []  # [centre, level, rows]
    for sz, sy, n in blocks:
        level = min(max(sy / n, Y_EPS), 1 - Y_EPS)
        if knots and knots[-1][1] == level:
            c, _, m = knots.pop()
            sz, n = sz + c * m, n + m
        knots.append([sz / n, level, n])
    merged, min_rows = [], max(MIN_BLOCK_ROWS, MIN_BLOCK_SHARE * len(z))

    def merge_last_two():
        (c1, v1, n1), (c2, v2, n2) = merged.pop(-2), merged.pop()
        merged.append([(c1 * n1 + c2 * n2) / (n1 + n2), (v1 * n1 + v2 * n2) / (n1 + n2),
                       n1 + n2])

    for k in knots:
        merged.append(k)
        while len(merged) > 1 and (merged[-1][0] - merged[-2][0] < MIN_KNOT_GAP
                                   or merged[-2][2] < min_rows):
            merge_last_two()
    while len(merged) > 1 and (merged[-1][2] < min_rows
                               or merged[-1][0] - merged[-2][0] < MIN_KNOT_GAP):
        merge_last_two()
    return np.array([k[0] for k in merged]), np.array([k[1] for k in merged])


@pytest.mark.parametrize("seed", [1, 2])
def test_isotonic_is_centered_isotonic_regression_plus_the_tie_slope(seed):
    z, y = _data(3000, seed, truth=_step)
    cal = fit_calibration(z, y, "isotonic")
    x_ref, y_ref = _centered_isotonic_reference(z, y)
    np.testing.assert_allclose(cal.parameters["x"], x_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(cal.parameters["y"], y_ref, rtol=1e-6, atol=1e-7)
    assert np.all(np.diff(cal.parameters["x"]) >= MIN_KNOT_GAP * (1 - 1e-6))
    assert np.all(np.diff(cal.parameters["y"]) > 0)
    assert 0.01 < cal.parameters["y"][0] and cal.parameters["y"][-1] < 0.99  # no 0/1 extremes
    grid = np.linspace(-10, 10, 2001)
    iso = np.interp(grid, x_ref, y_ref)
    odds = iso / (1 - iso) * np.exp(TIE_SLOPE * (grid - (x_ref[0] + x_ref[-1]) / 2))
    np.testing.assert_allclose(cal.probability_numpy(grid), odds / (1 + odds), atol=1e-6)
    # The tie-break moves the odds by < 0.5% within 5 logits of the knots' middle.
    near = np.abs(grid - (x_ref[0] + x_ref[-1]) / 2) < 5
    np.testing.assert_allclose(cal.probability_numpy(grid)[near], iso[near], rtol=5e-3)


def test_isotonic_keeps_close_logits_apart_in_float32():
    """A weak model's logits crowd beyond the outer knots: they must not tie (a tie would
    cost AUC on the probability)."""
    z, y = _data(20_000, 3, truth=lambda z: np.where(z < 0, 0.02, 0.15))  # CTR-like rates
    cal = fit_calibration(z, y, "isotonic")
    steps = np.arange(1, 200, dtype=np.float32) * 2e-3
    for logits in (np.float32(cal.parameters["x"][0]) - steps[::-1],
                   np.float32(cal.parameters["x"][-1]) + steps):
        assert np.all(np.diff(cal.probability(tf.constant(logits)).numpy()) > 0)


def test_logit_correction_is_applied_before_the_calibrator():
    z, y = _data(5000, 2)
    shifted = fit_calibration(z - 1.5, y, "platt", logit_correction=1.5)
    plain = fit_calibration(z, y, "platt")
    assert shifted.logit_correction == 1.5
    np.testing.assert_allclose(shifted.probability_numpy(z - 1.5), plain.probability_numpy(z),
                               atol=1e-6)


@pytest.mark.parametrize("method,shape", itertools.product(
    ["none", "platt", "isotonic"], [(7,), (3, 20), (1, 1)]))
def test_in_graph_equals_the_numpy_reference(method, shape):
    z, y = _data(3000, 3, truth=_step)
    cal = fit_calibration(z, y, method, logit_correction=-0.3)
    # Inside and far outside the knots, and exactly on some of them.
    logits = np.random.default_rng(4).normal(0, 4, shape).astype(np.float32)
    if method == "isotonic":
        logits.flat[0] = cal.parameters["x"][1] + 0.3
    got = cal.probability(tf.constant(logits)).numpy()
    assert got.shape == shape and got.dtype == np.float32
    np.testing.assert_allclose(got, cal.probability_numpy(logits), atol=1e-6)


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_strictly_increasing_so_no_order_changes(method):
    z, y = _data(3000, 5, truth=_step)
    cal = fit_calibration(z, y, method)
    grid = np.linspace(-12, 12, 5001)  # steps of ~5e-3, across plateaus and beyond the knots
    assert np.all(np.diff(cal.probability_numpy(grid)) > 0)
    graph = cal.probability(tf.constant(grid, tf.float32)).numpy()
    assert np.all(np.diff(graph) >= 0)
    assert np.all((graph > 0) & (graph < 1))


def test_auto_picks_by_held_out_logloss_and_beats_uncalibrated():
    # Overconfident logits (truth is sigmoid(z / 3)): a calibrator must win over none.
    z, y = _data(20_000, 6, truth=lambda z: 1 / (1 + np.exp(-z / 3)))
    cal = fit_calibration(z[:10_000], y[:10_000], "auto", seed=1)
    scores = cal.fit["cross_fitted_logloss"]
    assert cal.method == min(scores, key=scores.get) != "none"
    assert _logloss(y[10_000:], cal.probability_numpy(z[10_000:])) < \
        _logloss(y[10_000:], Calibration().probability_numpy(z[10_000:])) - 0.01
    # A step no sigmoid fits: isotonic.
    z, y = _data(10_000, 7, truth=_step)
    assert fit_calibration(z, y, "auto").method == "isotonic"


def test_degenerate_inputs_fall_back_to_the_correction_alone():
    cal = fit_calibration(np.arange(10.0), np.ones(10), "auto", logit_correction=0.5)
    assert cal.method == "none" and cal.logit_correction == 0.5
    assert "one class" in cal.fit["reason"]
    anti = fit_calibration(np.arange(100.0), (np.arange(100) < 50).astype(float), "platt")
    assert anti.method == "none" and "slope" in anti.fit["reason"]
    with pytest.raises(ValueError, match="calibration must be one of"):
        fit_calibration(np.zeros(4), np.zeros(4), "beta")
    with pytest.raises(ValueError, match="a > 0"):
        Calibration(method="platt", parameters={"a": -1.0, "b": 0.0})
    with pytest.raises(ValueError, match="strictly"):
        Calibration(method="isotonic", parameters={"x": [0.0, 0.0], "y": [0.1, 0.2]})


def test_round_trips_through_json():
    import json

    z, y = _data(2000, 8, truth=_step)
    for method in ("none", "platt", "isotonic"):
        cal = fit_calibration(z, y, method, logit_correction=-1.2)
        back = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
        assert back == cal
        np.testing.assert_array_equal(back.probability_numpy(z), cal.probability_numpy(z))
    assert Calibration.from_dict({"logit_correction": -1.0}) == Calibration(-1.0)

