"""The validation line search of prior precisions: its FM math against the O(n^2) pairwise
reference, its incremental scores against a full recompute, and what it does to noise ids and
to real effects."""

import itertools

import numpy as np
import pytest

from fm_keras.prior_search import MULTIPLIERS, Slots, loss, search


def fm_logits(bias, w, v, ids, values):
    """The FM score of encoded rows, vectorized (checked against the pairwise sum below)."""
    vx = v[ids] * values[..., None]
    summed = vx.sum(1)
    return (bias + np.sum(w[ids] * values, 1)
            + 0.5 * (np.sum(summed ** 2, 1) - np.sum(vx ** 2, (1, 2))))


def _pairwise_reference(bias, w, v, ids, values):
    """The FM by its definition: every pair of slots, O(slots^2) per row."""
    out = np.full(len(ids), bias, np.float64)
    for r in range(len(ids)):
        for i in range(ids.shape[1]):
            out[r] += w[ids[r, i]] * values[r, i]
            for j in range(i + 1, ids.shape[1]):
                out[r] += (v[ids[r, i]] @ v[ids[r, j]]) * values[r, i] * values[r, j]
    return out


@pytest.mark.parametrize("rows,slots,k", itertools.product([1, 7], [1, 3, 5], [1, 4]))
def test_fm_logits_matches_the_pairwise_sum(rows, slots, k):
    rng = np.random.default_rng(rows * 100 + slots * 10 + k)
    w, v = rng.normal(size=30), rng.normal(size=(30, k))
    ids = rng.integers(0, 30, (rows, slots))
    values = rng.normal(size=(rows, slots)) * (rng.random((rows, slots)) < 0.8)
    np.testing.assert_allclose(fm_logits(0.3, w, v, ids, values),
                               _pairwise_reference(0.3, w, v, ids, values), rtol=1e-10)


def test_loss_is_logloss_or_mse():
    logits, labels = np.array([0.0, 2.0, -1.0]), np.array([1.0, 0.0, 1.0])
    p = 1 / (1 + np.exp(-logits))
    expected = -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    assert loss("binary", logits, labels) == pytest.approx(expected)
    assert loss("regression", logits, labels) == pytest.approx(np.mean((logits - labels) ** 2))


def _problem(seed=0, noise_scale=0.5, rows=40_000):
    """Two features: 400 ids fitted to pure noise (true effect 0) and 20 attribute values with
    real effects, fitted with a little noise; validation labels drawn from the truth."""
    rng = np.random.default_rng(seed)
    noise_ids, attrs, k = 400, 20, 3
    w_true = np.concatenate([np.zeros(noise_ids), rng.normal(0, 1.0, attrs)])
    v_true = np.concatenate([np.zeros((noise_ids, k)), rng.normal(0, 0.5, (attrs, k))])
    w = w_true + np.concatenate([rng.normal(0, noise_scale, noise_ids),
                                 rng.normal(0, 0.02, attrs)])
    v = v_true + np.concatenate([rng.normal(0, noise_scale, (noise_ids, k)),
                                 rng.normal(0, 0.02, (attrs, k))])
    ids = np.stack([rng.integers(0, noise_ids, rows),
                    noise_ids + rng.integers(0, attrs, rows),
                    noise_ids + rng.integers(0, attrs, rows)], 1)
    values = np.ones(ids.shape)
    logits = fm_logits(-0.5, w_true, v_true, ids, values)
    labels = (rng.random(rows) < 1 / (1 + np.exp(-logits))).astype(np.float64)
    groups = [("noise_id", slice(0, noise_ids)), ("attr", slice(noise_ids, noise_ids + attrs))]
    counts = np.concatenate([np.full(noise_ids, 20.0), np.full(attrs, 2000.0)])
    info = {"linear": counts * 0.2, "embeddings": counts * 0.2}
    taus = {name: {"linear": 1.0, "embeddings": 1.0} for name, _ in groups}
    return w, v, Slots(ids, values, labels), groups, info, taus


def test_noise_ids_are_held_back_and_real_effects_kept():
    w, v, valid, groups, info, taus = _problem()
    w2, v2, new = search("binary", -0.5, w, v, valid, groups, info, taus)
    assert new["noise_id"]["linear"] == max(MULTIPLIERS)       # the biggest step up
    assert new["noise_id"]["embeddings"] == max(MULTIPLIERS)
    rms = lambda a: np.sqrt(np.mean(a ** 2))  # noqa: E731
    assert rms(w2[:400]) < 0.5 * rms(w[:400]) and rms(v2[:400]) < 0.5 * rms(v[:400])
    # Well-measured real effects keep (nearly) all of their size.
    assert rms(w2[400:]) > 0.9 * rms(w[400:]) and rms(v2[400:]) > 0.9 * rms(v[400:])
    assert taus["noise_id"]["linear"] == 1.0                   # the input is not modified


def test_returned_weights_are_the_ridge_response_and_score_better():
    """The incremental scores of the search equal a full recompute: the returned weights are
    each group's ids rescaled by (info + tau) / (info + tau'), and their validation loss is
    below the input's."""
    w, v, valid, groups, info, taus = _problem(seed=1)
    w2, v2, new = search("binary", -0.5, w, v, valid, groups, info, taus)
    for name, part in groups:
        for kind, before, after in (("linear", w, w2), ("embeddings", v, v2)):
            scale = (info[kind][part] + taus[name][kind]) / (info[kind][part] + new[name][kind])
            expected = before[part] * (scale if before.ndim == 1 else scale[:, None])
            np.testing.assert_allclose(after[part], expected, rtol=1e-12)
    before = loss("binary", fm_logits(-0.5, w, v, valid.ids, valid.values), valid.labels)
    after = loss("binary", fm_logits(-0.5, w2, v2, valid.ids, valid.values), valid.labels)
    assert after < before


def test_an_exact_fit_is_left_alone_and_the_bounds_hold():
    """Regression labels equal to the fit: every change raises the loss, nothing moves. At
    the upper bound no multiplier above it is tried."""
    w, v, valid, groups, info, taus = _problem(seed=2, rows=2000)
    exact = Slots(valid.ids, valid.values, fm_logits(0.0, w, v, valid.ids, valid.values))
    w2, v2, new = search("regression", 0.0, w, v, exact, groups, info, taus)
    assert new == taus
    np.testing.assert_array_equal(w2, w)
    np.testing.assert_array_equal(v2, v)
    _, _, bounded = search("binary", -0.5, w, v, valid, groups, info, taus, tau_range=(0.5, 2.0))
    assert all(0.5 <= t <= 2.0 for p in bounded.values() for t in p.values())
    assert bounded["noise_id"]["linear"] == 2.0


def test_the_offset_shifts_the_scored_logits():
    """The logit correction (pos_weight / downsampling) is added before the loss: a model
    whose logits are all off by +1 scores like the exact one once offset by -1."""
    w, v, valid, groups, info, taus = _problem(seed=3, rows=2000)
    labels = fm_logits(0.0, w, v, valid.ids, valid.values)
    _, _, new = search("regression", 1.0, w, v, Slots(valid.ids, valid.values, labels, -1.0),
                       groups, info, taus)
    assert new == taus
