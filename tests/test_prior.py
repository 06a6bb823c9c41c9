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


def test_callback_applies_the_validation_search_to_the_layer():
    """With validation rows, the update between epochs rescales the layer's tables as
    `prior_search.search` says and sets each id's L2 to tau / (2 n) from its chosen precision;
    a noise feature ends up held back harder than EM alone would hold it."""
    from types import SimpleNamespace

    from fm_keras.layers import FactorizationMachine
    from fm_keras.prior import EmpiricalBayesPrior
    from fm_keras.prior_search import Slots

    rng = np.random.default_rng(0)
    n_noise, n_attr, k, rows = 200, 10, 2, 20_000
    fm = FactorizationMachine(n_noise + n_attr, k, l2_prior=10.0)
    fm((np.zeros([1, 2], np.int32), np.zeros([1, 2], np.float32)))
    w_attr = rng.normal(0, 1.0, n_attr)
    fm.assign_parameters(linear=np.concatenate([rng.normal(0, 0.5, n_noise), w_attr]),
                         embeddings=rng.normal(0, 0.01, (n_noise + n_attr, k)))
    ids = np.stack([rng.integers(0, n_noise, rows), n_noise + rng.integers(0, n_attr, rows)], 1)
    values = np.ones(ids.shape, np.float32)
    labels = (rng.random(rows) < 1 / (1 + np.exp(-w_attr[ids[:, 1] - n_noise]))).astype(float)
    features = [SimpleNamespace(config=SimpleNamespace(name=name), size=size)
                for name, size in (("noise", n_noise), ("attr", n_attr))]
    model = SimpleNamespace(fm=fm, encoder=SimpleNamespace(features=features,
                                                           offsets=[0, n_noise]))
    counts = np.bincount(ids.ravel(), minlength=n_noise + n_attr)

    em_only = EmpiricalBayesPrior(model, counts, ids[:500], values[:500], 0.2)
    em_only.update()
    fm.set_prior(counts)  # back to the start for the second callback
    searched = EmpiricalBayesPrior(model, counts, ids[:500], values[:500], 0.2)
    searched.search_on(Slots(ids, values, labels))
    before = fm.linear.numpy().copy()
    searched.update()
    tau = searched.precisions
    assert tau["noise"]["linear"] > 4 * em_only.precisions["noise"]["linear"]
    after = fm.linear.numpy()
    assert np.sqrt(np.mean(after[:n_noise] ** 2)) < 0.5 * np.sqrt(np.mean(before[:n_noise] ** 2))
    np.testing.assert_allclose(fm.prior.numpy()[:n_noise, 0],
                               0.5 * tau["noise"]["linear"] / counts[:n_noise], rtol=1e-5)


@pytest.mark.parametrize("model, adaptive, task, callback, prior_set", [
    ({"l2_prior": 10.0}, True, "binary", True, True),
    ({"l2_prior": 10.0}, False, "binary", False, True),
    ({"l2_prior": 0.0}, True, "binary", False, False),
    ({"l2_prior": 10.0}, True, "retrieval", False, False),
])
def test_attach_prior_sets_the_counts_and_returns_the_callback_when_adaptive(
        model, adaptive, task, callback, prior_set):
    """The one entry point of one machine and clusters: the per-id L2 tau / (2 n) for seen
    ids (0 for unseen) and the re-estimation callback only with ``l2_prior_adaptive``."""
    from types import SimpleNamespace

    from fm_keras.config import ModelConfig, TrainingConfig
    from fm_keras.layers import FactorizationMachine
    from fm_keras.prior import EmpiricalBayesPrior, attach_prior

    fm = FactorizationMachine(6, 2, l2_prior=model["l2_prior"])
    fm((np.zeros([1, 2], np.int32), np.zeros([1, 2], np.float32)))
    features = [SimpleNamespace(config=SimpleNamespace(name="f"), size=6)]
    fm_model = SimpleNamespace(fm=fm, encoder=SimpleNamespace(features=features, offsets=[0]))
    config = SimpleNamespace(model=ModelConfig(task=task, l2_prior=model["l2_prior"],
                                               l2_prior_adaptive=adaptive),
                             training=TrainingConfig())
    counts = np.array([4, 0, 1, 2, 0, 8])
    ids = np.array([[0, 2], [3, 5]])
    got = attach_prior(fm_model, config, counts, ids, np.ones(ids.shape, np.float32),
                       np.array([0.0, 1.0]))
    assert isinstance(got, EmpiricalBayesPrior) if callback else got is None
    if prior_set:
        expected = np.where(counts > 0, 0.5 * 10.0 / np.maximum(counts, 1), 0.0)
        np.testing.assert_allclose(fm.prior.numpy(), np.stack([expected] * 2, 1), rtol=1e-6)
    elif model["l2_prior"]:
        assert not fm.prior.numpy().any()


def test_a_resumed_run_goes_on_from_the_restored_precisions():
    """After ``--resume`` the checkpoint restores the layer's per-id L2 (tau / (2 n)); the
    callback, made anew with `l2_prior`'s precisions, takes the restored ones before its first
    update, and keeps its own where the layer holds them already."""
    from types import SimpleNamespace

    from fm_keras.layers import FactorizationMachine
    from fm_keras.prior import EmpiricalBayesPrior

    fm = FactorizationMachine(8, 2, l2_prior=10.0)
    fm((np.zeros([1, 2], np.int32), np.zeros([1, 2], np.float32)))
    features = [SimpleNamespace(config=SimpleNamespace(name=name), size=4)
                for name in ("user", "item")]
    model = SimpleNamespace(fm=fm, encoder=SimpleNamespace(features=features, offsets=[0, 4]))
    counts = np.array([3, 0, 5, 1, 2, 2, 0, 7])
    callback = EmpiricalBayesPrior(model, counts, np.array([[0, 4]]), np.ones([1, 2]), 0.2)
    fm.set_prior(counts, tau_linear=np.r_[[2.5] * 4, [10.0] * 4],
                 tau_embeddings=np.r_[[40.0] * 4, [10.0] * 4])  # as a checkpoint restores it
    callback.adopt_restored()
    assert callback.precisions["user"] == pytest.approx({"linear": 2.5, "embeddings": 40.0})
    assert callback.precisions["item"] == {"linear": 10.0, "embeddings": 10.0}  # untouched
