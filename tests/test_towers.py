"""The towers against a NumPy FM: <user_vector, item_vector> + user_offset == the FM score."""

import numpy as np
import pytest

from fm_keras._tf import keras, tf
from fm_keras.config import FeatureConfig
from fm_keras.data import Split
from fm_keras.features import FeatureEncoder, fit_features
from fm_keras.layers import FactorizationMachine
from fm_keras.towers import ItemTower, UserTower, item_vector, side_slot_order, user_outputs


def _fm_numpy(bias, w, v, ids, x):
    """The O(n^2) FM of one row."""
    total = bias + sum(w[i] * xi for i, xi in zip(ids, x))
    for a in range(len(ids)):
        for b in range(a + 1, len(ids)):
            total += v[ids[a]] @ v[ids[b]] * x[a] * x[b]
    return total


@pytest.mark.parametrize("seed,q_slots,i_slots", [(0, 1, 1), (1, 3, 2), (2, 2, 4)])
def test_towers_reproduce_the_fm_score(seed, q_slots, i_slots):
    rng = np.random.default_rng(seed)
    fm = FactorizationMachine(30, 4)
    fm.build(None)
    fm.bias.assign(0.3)
    fm.assign_parameters(linear=rng.normal(size=30), embeddings=rng.normal(size=(30, 4)))
    q_ids, i_ids = rng.integers(0, 15, (5, q_slots)), rng.integers(15, 30, (5, i_slots))
    q_x, i_x = rng.normal(size=(5, q_slots)), rng.normal(size=(5, i_slots))
    user = user_outputs(fm, tf.constant(q_ids, tf.int32), tf.constant(q_x, tf.float32))
    item = item_vector(fm, tf.constant(i_ids, tf.int32), tf.constant(i_x, tf.float32)).numpy()
    got = (user["user_vector"].numpy() * item).sum(1) + user["user_offset"].numpy()
    want = [_fm_numpy(0.3, fm.linear.numpy(), fm.embeddings.numpy(),
                      list(q_ids[r]) + list(i_ids[r]), list(q_x[r]) + list(i_x[r]))
            for r in range(5)]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert (user["user_vector"].numpy()[:, 0] == 1).all()


def test_side_slot_order_restores_spec_order():
    query_side = np.array([False, True, True, False, True])
    slots = np.arange(5)
    joined = np.concatenate([slots[query_side], slots[~query_side]])
    np.testing.assert_array_equal(joined[side_slot_order(query_side).numpy()], slots)


def test_keras_towers_take_raw_features_of_their_side():
    configs = [FeatureConfig("user_id", "categorical", "user"),
               FeatureConfig("item_id", "categorical", "item")]
    split = Split({"user_id": np.array(["a", "b"], object),
                   "item_id": np.array(["x", "y"], object)}, None, 2)
    encoder = FeatureEncoder(fit_features(configs, split))
    fm = FactorizationMachine(encoder.num_ids, 3)
    user, item = UserTower(encoder, fm), ItemTower(encoder, fm)
    assert user.feature_names == ["user_id"] and item.feature_names == ["item_id"]
    assert user({"user_id": tf.constant(["a", "zz"])})["user_vector"].shape == (2, 4)
    assert item({"item_id": tf.constant(["x"])}).shape == (1, 4)
    only_users = FeatureEncoder(fit_features(configs[:1], split))
    with pytest.raises(ValueError, match="no item features"):
        ItemTower(only_users, FactorizationMachine(only_users.num_ids, 3))


def _towers():
    configs = [FeatureConfig("user_id", "categorical", "user"),
               FeatureConfig("age", "numeric", "user"),
               FeatureConfig("item_id", "categorical", "item")]
    split = Split({"user_id": np.array(["a", "b"], object), "age": np.array([20.0, 40.0]),
                   "item_id": np.array(["x", "y"], object)}, None, 2)
    encoder = FeatureEncoder(fit_features(configs, split))
    fm = FactorizationMachine(encoder.num_ids, 3,
                              embeddings_initializer=keras.initializers.RandomNormal(0, 0.5))
    return UserTower(encoder, fm), ItemTower(encoder, fm)


def test_towers_save_as_saved_models_without_a_first_call(tmp_path):
    # Issue 19.1: a tower's save raised "the input shape is not available" until called.
    user, item = _towers()
    inputs = {"user_tower": {"user_id": tf.constant(["a", "b", "zz"]),
                             "age": tf.constant([30.0, np.nan, 99.0])},
              "item_tower": {"item_id": tf.constant(["y", "x", "?"])}}
    for tower in (user, item):
        tower.save(str(tmp_path / tower.name))
        loaded = keras.models.load_model(str(tmp_path / tower.name))
        got, want = loaded(inputs[tower.name]), tower(inputs[tower.name])
        tf.nest.map_structure(lambda a, b: np.testing.assert_allclose(a.numpy(), b.numpy(),
                                                                       atol=1e-6), got, want)


@pytest.mark.parametrize("path", ["t.keras", "t.h5"])
def test_towers_refuse_the_keras_and_h5_formats_at_save(tmp_path, path):
    for tower in _towers():
        with pytest.raises(ValueError, match=f"{type(tower).__name__} cannot be saved in the "
                                             ".*format.*SavedModel"):
            tower.save(str(tmp_path / path))
    assert not list(tmp_path.iterdir())
