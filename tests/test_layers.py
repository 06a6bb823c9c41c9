"""FactorizationMachine against a float64 O(n^2) NumPy reference, plus the layer contract."""

import itertools
import json

import numpy as np
import pytest

from fm_keras._tf import keras, tf
from fm_keras.layers import FactorizationMachine


def fm_reference(bias, w, v, ids, values):
    """Dense O(n^2) FM: y = w0 + sum_i w_i x_i + sum_{i<j} <v_i, v_j> x_i x_j (float64)."""
    n = len(w)
    out = []
    for row_ids, row_values in zip(ids, values):
        x = np.zeros(n)
        np.add.at(x, row_ids, row_values)  # padding slots (x = 0) add nothing
        y = bias + w @ x
        for i, j in itertools.combinations(range(n), 2):
            y += (v[i] @ v[j]) * x[i] * x[j]
        out.append(y)
    return np.array(out)


def _layer(num_ids, k, seed=0):
    layer = FactorizationMachine(num_ids, k)
    layer.build(None)
    rng = np.random.default_rng(seed)
    layer.bias.assign(rng.normal())
    layer.assign_parameters(linear=rng.normal(size=num_ids),
                            embeddings=rng.normal(scale=0.5, size=(num_ids, k)))
    return layer


def _inputs(kind, batch, num_ids, rng):
    """Slots as the encoder makes them: categorical x=1, weighted multi-hot, numeric x=value."""
    if kind == "categorical":  # one slot per field, distinct id ranges, x = 1
        ids = np.stack([rng.integers(f * 5, f * 5 + 5, batch) for f in range(num_ids // 5)], 1)
        return ids, np.ones(ids.shape)
    if kind == "multi_hot":  # a 4-slot list with weights and zero-weight padding
        ids = np.stack([rng.choice(num_ids, 4, replace=False) for _ in range(batch)])
        values = rng.uniform(0.1, 2.0, (batch, 4)) * (rng.random((batch, 4)) < 0.7)
        return ids, values
    ids = np.tile(np.arange(3), (batch, 1))  # numeric: fixed ids, x = normalized value
    return ids, rng.normal(size=(batch, 3))


@pytest.mark.parametrize("kind,k,seed", list(itertools.product(
    ["categorical", "multi_hot", "numeric"], [1, 4, 10], [0, 1])))
def test_matches_pairwise_reference(kind, k, seed):
    rng = np.random.default_rng(seed)
    num_ids = 15
    layer = _layer(num_ids, k, seed)
    ids, values = _inputs(kind, 16, num_ids, rng)
    got = layer((tf.constant(ids, tf.int32), tf.constant(values, tf.float32))).numpy()[:, 0]
    want = fm_reference(float(layer.bias.numpy()), layer.linear.numpy().astype(np.float64),
                        layer.embeddings.numpy().astype(np.float64), ids, values)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_mixed_row_matches_reference():
    """One row with categorical, weighted multi-hot (with padding) and numeric slots."""
    layer = _layer(12, 10, seed=5)
    ids = np.array([[0, 3, 4, 4, 0, 11]])           # cat, multi-hot x3 (one pad), numeric
    values = np.array([[1.0, 0.5, 2.0, 0.0, 0.0, -1.3]])
    got = layer((tf.constant(ids), tf.constant(values, tf.float32))).numpy()[0, 0]
    want = fm_reference(float(layer.bias.numpy()), layer.linear.numpy().astype(np.float64),
                        layer.embeddings.numpy().astype(np.float64), ids, values)[0]
    assert got == pytest.approx(want, abs=1e-4)


def test_zero_value_slot_adds_nothing():
    layer = _layer(10, 4)
    ids = tf.constant([[1, 2, 3]])
    base = layer((ids[:, :2], tf.constant([[1.0, 1.0]])))
    padded = layer((ids, tf.constant([[1.0, 1.0, 0.0]])))
    np.testing.assert_allclose(base.numpy(), padded.numpy(), atol=1e-6)


def test_side_terms_decompose_the_score():
    """bias + L_Q + L_I + P_Q + P_I + <S_Q, S_I> == FM score."""
    layer = _layer(20, 6, seed=2)
    rng = np.random.default_rng(2)
    ids = tf.constant(rng.integers(0, 20, (8, 5)), tf.int32)
    values = tf.constant(rng.normal(size=(8, 5)), tf.float32)
    query = tf.constant([True, True, False, False, False])
    lq, pq, sq = layer.side_terms(ids, values, query)
    li, pi, si = layer.side_terms(ids, values, ~query)
    total = layer.bias + lq + li + pq + pi + tf.reduce_sum(sq * si, 1)
    np.testing.assert_allclose(total.numpy(), layer((ids, values)).numpy()[:, 0], atol=1e-4)


def test_l2_penalizes_only_touched_rows():
    layer = FactorizationMachine(100, 3, l2_embeddings=0.1, l2_linear=0.01)
    layer.build(None)
    layer.assign_parameters(linear=np.ones(100), embeddings=np.ones([100, 3]))
    layer((tf.constant([[1, 2]]), tf.constant([[1.0, 0.0]])))  # only id 1 is non-zero
    assert float(tf.add_n(layer.losses)) == pytest.approx(0.1 * 3 + 0.01 * 1)


@pytest.mark.parametrize("bad", [{"num_ids": 0}, {"num_ids": 5, "embedding_dim": 0},
                                 {"num_ids": 5, "l2_embeddings": -1.0}, {"num_ids": True},
                                 {"num_ids": 10.0}, {"num_ids": np.float64(10)},
                                 {"num_ids": 5, "embedding_dim": np.int64(0)}])
def test_rejects_bad_arguments(bad):
    with pytest.raises(ValueError, match="must be"):
        FactorizationMachine(**bad)


def test_config_json_round_trip():
    layer = FactorizationMachine(50, 7, l2_embeddings=1e-3, l2_linear=1e-4, name="fm")
    config = json.loads(json.dumps(keras.layers.serialize(layer)))
    clone = keras.layers.deserialize(config)
    assert isinstance(clone, FactorizationMachine)
    assert clone.get_config() == layer.get_config()


def test_save_load_same_predictions(tmp_path):
    ids_in = keras.Input([6], dtype=tf.int32)
    values_in = keras.Input([6], dtype=tf.float32)
    model = keras.Model([ids_in, values_in], FactorizationMachine(30, 10)([ids_in, values_in]))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 30, (32, 6)).astype(np.int32)
    values = rng.normal(size=(32, 6)).astype(np.float32)
    before = model.predict([ids, values], verbose=0)
    path = str(tmp_path / "fm.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded.predict([ids, values], verbose=0), before, atol=1e-6)


def test_per_slot_l2():
    """One L2 value per slot: e.g. id slots regularized harder than shared attributes."""
    layer = FactorizationMachine(100, 3, l2_embeddings=[0.1, 2.0, 0.1], l2_linear=[0.01, 3.0, 0.01])
    layer.build(None)
    layer.assign_parameters(linear=np.ones(100), embeddings=np.ones([100, 3]))
    layer((tf.constant([[1, 2, 3]]), tf.constant([[1.0, 1.0, 0.0]])))  # slot 3 is padding
    assert float(tf.add_n(layer.losses)) == pytest.approx((0.1 + 2.0) * 3 + (0.01 + 3.0) * 1)
    clone = keras.layers.deserialize(json.loads(json.dumps(keras.layers.serialize(layer))))
    assert clone.get_config() == layer.get_config()
    with pytest.raises(ValueError, match="l2_linear must be >= 0"):
        FactorizationMachine(10, 2, l2_linear=[0.1, -1.0])


def test_l2_prior_matches_numpy_reference():
    """l2_prior = tau: L2 tau / (2 n_id) per touched occurrence, averaged over the batch."""
    rng = np.random.default_rng(4)
    num_ids, k, tau = 12, 3, 7.0
    layer = FactorizationMachine(num_ids, k, l2_prior=tau)
    layer.build(None)
    v = rng.normal(size=(num_ids, k)).astype(np.float32)
    w = rng.normal(size=num_ids).astype(np.float32)
    layer.assign_parameters(linear=w, embeddings=v)
    counts = rng.integers(0, 50, num_ids)
    layer.set_prior(counts)
    ids = rng.integers(0, num_ids, (5, 4))
    values = rng.uniform(0.5, 2.0, (5, 4)) * (rng.random((5, 4)) < 0.8)
    layer((tf.constant(ids), tf.constant(values, tf.float32)))
    per_row = [sum(0.5 * tau / counts[i] * (v[i] @ v[i] + w[i] ** 2)
                   for i, x in zip(row_ids, row_x) if x != 0 and counts[i] > 0)
               for row_ids, row_x in zip(ids, values)]
    assert float(tf.add_n(layer.losses)) == pytest.approx(np.mean(per_row), rel=1e-5)
    clone = keras.layers.deserialize(json.loads(json.dumps(keras.layers.serialize(layer))))
    assert clone.get_config()["l2_prior"] == tau


def test_l2_prior_is_off_until_counts_are_set_and_checks_them():
    layer = FactorizationMachine(10, 2, l2_prior=1.0)
    layer.build(None)
    layer((tf.constant([[1, 2]]), tf.constant([[1.0, 1.0]])))
    assert float(tf.add_n(layer.losses)) == 0.0         # no counts yet: no prior
    with pytest.raises(ValueError, match=r"shape \[10\]"):
        layer.set_prior(np.ones(9))
    plain = FactorizationMachine(10, 2)
    plain.build(None)
    with pytest.raises(ValueError, match="needs l2_prior > 0"):
        plain.set_prior(np.ones(10))
    with pytest.raises(ValueError, match="l2_prior must be >= 0"):
        FactorizationMachine(10, 2, l2_prior=-1.0)


# Regressions from the third new user's trial (defects 1-8 of the layer).

def test_rejects_inputs_of_another_rank_or_shape():
    """[batch, slots, 1] inputs gave [batch, 1, k + 1] (bias + slot 0 only), silently."""
    layer = FactorizationMachine(10, 4)
    ids, values = np.array([[3, 7, 9]]), np.ones((1, 3), np.float32)
    with pytest.raises(ValueError, match=r"shape \[batch, slots\].*\[1, 3, 1\]"):
        layer((ids[..., None], values[..., None]))
    with pytest.raises(ValueError, match=r"the same shape.*\[1, 3\].*\[1, 2\]"):
        layer((ids, values[:, :2]))
    with pytest.raises(ValueError, match="both be dense"):
        layer((tf.ragged.constant([[1, 2]]), values[:, :2]))
    ids_in, values_in = keras.Input([3, 1], dtype=tf.int32), keras.Input([3, 1])
    with pytest.raises(ValueError, match=r"\[None, 3, 1\]"):
        FactorizationMachine(10, 4)((ids_in, values_in))


def test_accepts_numpy_integer_sizes_as_ints():
    layer = FactorizationMachine(np.int64(10), np.int32(4))
    config = layer.get_config()
    assert (config["num_ids"], config["embedding_dim"]) == (10, 4)
    assert type(config["num_ids"]) is int and type(config["embedding_dim"]) is int
    json.dumps(config)
    assert layer((tf.constant([[1, 2]]), tf.constant([[1.0, 1.0]]))).shape == [1, 1]


def test_per_slot_l2_of_another_length_names_parameter_and_counts():
    """It failed only at the first call: "Incompatible shapes: [2] vs. [2,11]"."""
    message = r"l2_linear has 2 values.*3 slots"
    with pytest.raises(ValueError, match=message):
        FactorizationMachine(10, 2, l2_linear=[0.1, 0.2]).build([[None, 3], [None, 3]])
    with pytest.raises(ValueError, match=message):
        FactorizationMachine(10, 2, l2_linear=[0.1, 0.2])((tf.constant([[1, 2, 3]]),
                                                           tf.ones([1, 3])))
    ragged = FactorizationMachine(10, 2, l2_embeddings=[0.1, 0.2])
    with pytest.raises(tf.errors.InvalidArgumentError, match="l2_embeddings has 2 values"):
        ragged((tf.ragged.constant([[1], [1, 2, 3]]), tf.ragged.constant([[1.0], [1.0] * 3])))
    unknown = FactorizationMachine(10, 2, l2_linear=[0.1, 0.2])  # slots unknown when traced
    spec = [tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None, None], tf.float32)]
    call = tf.function(lambda ids, values: unknown((ids, values)), input_signature=spec)
    call(tf.constant([[1, 2]]), tf.ones([1, 2]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="l2_linear has 2 values"):
        call(tf.constant([[1, 2, 3]]), tf.ones([1, 3]))


def test_side_terms_of_one_sides_slots_ignore_the_per_slot_l2_lists():
    """Towers and retrieval call side_terms on one side's slots (2 of 4 here): never
    regularized, so a per-slot L2 list of all the slots is not a shape error there."""
    layer = FactorizationMachine(10, 3, l2_embeddings=[0.1, 0.2, 0.3, 0.4], l2_linear=0.01)
    layer.build(None)
    ids, values = tf.constant([[1, 5]]), tf.constant([[1.0, 2.0]])
    linear, pairs, summed = layer.side_terms(ids, values, tf.ones_like(values, tf.bool))
    assert summed.shape == [1, 3] and not layer.losses
    with pytest.raises(ValueError, match="l2_embeddings has 4 values"):
        layer((ids, values))  # the whole FM on 2 slots: the list does not fit


@pytest.mark.parametrize("l2_embeddings", [0.2, [0.1, 0.5, 2.0, 0.3]])
def test_ragged_inputs_match_zero_padded_dense_with_l2(l2_embeddings):
    """Ragged inputs with any l2_* set failed ("mismatched row_splits dtypes")."""
    rng = np.random.default_rng(6)
    layer = FactorizationMachine(12, 3, l2_embeddings=l2_embeddings, l2_linear=0.05,
                                 l2_prior=4.0)
    layer.build(None)
    layer.set_prior(rng.integers(1, 9, 12))
    rows = [[(1, 0.5), (4, 2.0)], [(2, 1.0)], [(5, 1.5), (7, -0.5), (11, 1.0), (0, 0.0)]]
    ids = tf.ragged.constant([[i for i, _ in row] for row in rows])
    values = tf.ragged.constant([[x for _, x in row] for row in rows], tf.float32)
    ragged = layer((ids, values)).numpy()
    ragged_penalty = float(tf.add_n(layer.losses))
    dense = layer((ids.to_tensor(0, shape=[3, 4]), values.to_tensor(0.0, shape=[3, 4]))).numpy()
    np.testing.assert_allclose(ragged, dense, rtol=1e-6, atol=1e-6)
    assert ragged_penalty == pytest.approx(float(tf.add_n(layer.losses)), rel=1e-6)
    assert ragged_penalty > 0


@pytest.fixture
def mixed_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _small_l2_penalty(table, ids, values):
    layer = FactorizationMachine(40, 4, l2_embeddings=1e-5, l2_linear=1e-6)
    layer.build(None)
    layer.table.assign(table)
    out = layer((ids, values))
    return out.dtype, float(tf.add_n(layer.losses))


def test_l2_penalty_does_not_underflow_under_mixed_float16(mixed_float16):
    """Squares of weights ~0.01 times L2 1e-5 are below float16's range: the penalty was 0."""
    rng = np.random.default_rng(7)
    table = rng.normal(0, 0.01, (40, 5)).astype(np.float32)
    ids, values = rng.integers(0, 40, (32, 6)), rng.uniform(0.5, 1.5, (32, 6)).astype(np.float32)
    dtype, penalty = _small_l2_penalty(table, ids, values)
    assert dtype == tf.float16
    keras.mixed_precision.set_global_policy("float32")
    dtype, want = _small_l2_penalty(table, ids, values)
    assert dtype == tf.float32 and want > 0
    assert penalty == pytest.approx(want, rel=1e-3)


@pytest.mark.parametrize("use", ["linear", "embeddings", "assign_parameters", "set_prior"])
def test_weights_before_build_say_to_build(use):
    layer = FactorizationMachine(10, 2, l2_prior=1.0)
    with pytest.raises(ValueError, match=r"call the layer on inputs or build\(\) it first"):
        if use == "assign_parameters":
            layer.assign_parameters(linear=np.zeros(10))
        elif use == "set_prior":
            layer.set_prior(np.ones(10))
        else:
            getattr(layer, use)


def test_takes_an_ids_values_dict():
    """A dict's keys were unpacked as the pair: "Cast string to float is not supported"."""
    layer = _layer(10, 3)
    ids, values = tf.constant([[1, 2, 5]]), tf.constant([[1.0, 0.5, 2.0]])
    np.testing.assert_array_equal(layer({"ids": ids, "values": values}).numpy(),
                                  layer((ids, values)).numpy())
    with pytest.raises(TypeError, match="'ids' and 'values'.*'x'"):
        layer({"ids": ids, "x": values})
    with pytest.raises(TypeError, match=r"a tuple \(ids, values\)"):
        layer(ids)
