"""FeatureEncoder: fitted vocabularies/statistics and raw -> slots, against NumPy."""

import json

import numpy as np
import pytest

from fm_keras._tf import keras, tf
from fm_keras.config import FeatureConfig
from fm_keras.data import Split
from fm_keras.features import FeatureEncoder, fit_features


def _split(**columns):
    arrays = {k: np.asarray(v, dtype=np.float32 if isinstance(v[0], float) else object)
              for k, v in columns.items()}
    return Split(arrays, None, rows_read=len(next(iter(arrays.values()))))


def _encode(encoder, **columns):
    inputs = {k: tf.constant(v) for k, v in columns.items()}
    ids, values = encoder(inputs)
    return ids.numpy(), values.numpy()


def test_categorical_vocabulary_min_count_and_oov():
    cfg = FeatureConfig("color", "categorical", "item", min_count=2, oov_buckets=3)
    (fitted,) = fit_features([cfg], _split(color=["red", "red", "blue", "blue", "blue", "green"]))
    assert fitted.vocabulary == ("blue", "red")  # most frequent first; green is below min_count
    encoder = FeatureEncoder([fitted])
    ids, values = _encode(encoder, color=["blue", "red", "green", "never-seen"])
    assert ids[:2, 0].tolist() == [3, 4]          # after the 3 OOV buckets
    assert 0 <= ids[2, 0] < 3 and 0 <= ids[3, 0] < 3
    assert values.tolist() == [[1.0]] * 4


def test_hash_buckets_stay_in_range():
    cfg = FeatureConfig("user", "categorical", "user", hash_buckets=7)
    (fitted,) = fit_features([cfg], _split(user=["a", "b"]))
    ids, _ = _encode(FeatureEncoder([fitted]), user=[f"u{i}" for i in range(100)])
    assert fitted.size == 7 and ids.min() >= 0 and ids.max() < 7


def test_multi_hot_weights_combiner_and_padding():
    cfg = FeatureConfig("tags", "multi_hot", "item", max_len=3, combiner="mean")
    (fitted,) = fit_features([cfg], _split(tags=["a|b", "b|c", "a"]))
    encoder = FeatureEncoder([fitted])
    ids, values = _encode(encoder, tags=["a:1|b:3", "c", "", "a|b|c|a"])
    vocab = {v: i + 1 for i, v in enumerate(fitted.vocabulary)}  # 1 OOV bucket first
    assert ids[0, :2].tolist() == [vocab["a"], vocab["b"]]
    np.testing.assert_allclose(values[0], [0.25, 0.75, 0.0])      # mean of weights 1 and 3
    np.testing.assert_allclose(values[1], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(values[2], [0.0, 0.0, 0.0])        # empty list: no features
    np.testing.assert_allclose(values[3], [1 / 3] * 3)            # truncated to max_len


# (raw token, the value it names, its weight): a weight only after the LAST ':' and only when
# that text is a number; otherwise the whole token is the value (issue 13).
TOKENS = [("tag:t81", "tag:t81", 1.0), ("tag:t9", "tag:t9", 1.0), ("a:0.5", "a", 0.5),
          ("b:x:2", "b:x", 2.0), ("c:", "c:", 1.0), ("d:1e-1", "d", 0.1), ("e: 3 ", "e", 3.0),
          ("f:2:g", "f:2:g", 1.0), ("h:-.5", "h", -0.5), ("i:inf", "i:inf", 1.0),
          ("j:1.5.2", "j:1.5.2", 1.0), (":4", "", 4.0)]


def test_multi_hot_weight_only_after_the_last_separator_in_both_paths():
    cfg = FeatureConfig("tags", "multi_hot", "item", max_len=1)
    raw = [t for t, _, _ in TOKENS]
    (fitted,) = fit_features([cfg], _split(tags=raw))
    named = {n for _, n, _ in TOKENS if n}
    assert set(fitted.vocabulary) == named                        # NumPy/pandas fit path
    ids, values = _encode(FeatureEncoder([fitted]), tags=raw)     # in-graph path
    vocab = {v: i + 1 for i, v in enumerate(fitted.vocabulary)}
    for (token, name, weight), i, v in zip(TOKENS, ids[:, 0], values[:, 0]):
        assert i == vocab.get(name, 0), token                      # same value, not OOV
        assert v == pytest.approx(weight), token
    assert ids[0, 0] != ids[1, 0]                                 # tag:t81 vs tag:t9


def test_multi_hot_default_max_len_from_data():
    cfg = FeatureConfig("tags", "multi_hot", "item", combiner="sqrtn")
    (fitted,) = fit_features([cfg], _split(tags=["a|b"] * 50 + ["a"] * 50))
    assert fitted.max_len == 2
    _, values = _encode(FeatureEncoder([fitted]), tags=["a:3|b:4"])
    np.testing.assert_allclose(values[0], [0.6, 0.8], rtol=1e-6)


@pytest.mark.parametrize("normalization", ["standard", "log", "min_max", "none"])
def test_numeric_normalization_matches_numpy(normalization):
    raw = np.array([1.0, 2.0, 4.0, 8.0, 100.0])
    cfg = FeatureConfig("price", "numeric", "item", normalization=normalization)
    (fitted,) = fit_features([cfg], _split(price=raw.astype(np.float32).tolist()))
    expect = {
        "standard": (raw - raw.mean()) / raw.std(),
        "log": (np.log1p(raw) - np.log1p(raw).mean()) / np.log1p(raw).std(),
        "min_max": (raw - raw.min()) / (raw.max() - raw.min()),
        "none": raw,
    }[normalization]
    _, values = _encode(FeatureEncoder([fitted]), price=raw.astype(np.float32))
    np.testing.assert_allclose(values[:, 0], expect, rtol=1e-5, atol=1e-5)


def test_numeric_missing_and_out_of_range_values_stay_finite():
    cfg = FeatureConfig("price", "numeric", "item")
    (fitted,) = fit_features([cfg], _split(price=[1.0, 2.0, 3.0]))
    _, values = _encode(FeatureEncoder([fitted]), price=np.array([np.nan, 1e30, -1e30], np.float32))
    assert values[0, 0] == pytest.approx(0.0, abs=1e-6)   # missing -> training mean -> 0
    assert np.isfinite(values).all()
    assert values[1, 0] == pytest.approx((3 - 2) / np.std([1, 2, 3]), rel=1e-5)  # clipped


def test_numeric_buckets_become_categorical():
    cfg = FeatureConfig("age", "numeric", "user", buckets=[18.0, 30.0, 50.0])
    (fitted,) = fit_features([cfg], _split(age=[20.0, 40.0]))
    ids, values = _encode(FeatureEncoder([fitted]), age=np.array([5, 18, 29, 49, 80], np.float32))
    assert ids[:, 0].tolist() == [0, 1, 1, 2, 3] and fitted.size == 4
    assert values[:, 0].tolist() == [1.0] * 5


def test_slots_ids_offsets_and_sides():
    configs = [FeatureConfig("user", "categorical", "user"),
               FeatureConfig("tags", "multi_hot", "item", max_len=2),
               FeatureConfig("hour", "categorical", "context"),
               FeatureConfig("price", "numeric", "item")]
    fitted = fit_features(configs, _split(user=["a", "b"], tags=["x|y", "y"], hour=["1", "2"],
                                          price=[1.0, 2.0]))
    encoder = FeatureEncoder(fitted)
    assert encoder.num_slots == 5
    assert encoder.slot_query_side.tolist() == [True, False, False, True, False]
    ids, _ = _encode(encoder, user=["b"], tags=["y"], hour=["1"], price=np.array([1.5], np.float32))
    assert ids[0].tolist() == [2, 3 + 1, 3, 6 + 1, 9]  # per-feature offsets 0, 3, 6, 9
    assert encoder.num_ids == 10


def test_query_key_names_are_the_user_tower_or_every_query_side_feature():
    def encoder(*towers):
        configs = [FeatureConfig(f"f{i}", "categorical", t) for i, t in enumerate(towers)]
        return FeatureEncoder(fit_features(configs, _split(**{c.name: ["a"] for c in configs})))

    assert encoder("user", "context", "item", "user").query_key_names() == ["f0", "f3"]
    assert encoder("context", "item").query_key_names() == ["f0"]


def test_missing_input_names_the_feature():
    (fitted,) = fit_features([FeatureConfig("user", "categorical", "user")], _split(user=["a"]))
    with pytest.raises(ValueError, match="missing input feature 'user'"):
        FeatureEncoder([fitted])({"other": tf.constant(["a"])})


def test_config_json_round_trip_and_saved_model(tmp_path):
    configs = [FeatureConfig("user", "categorical", "user", min_count=1),
               FeatureConfig("tags", "multi_hot", "item", max_len=2),
               FeatureConfig("price", "numeric", "item", normalization="log")]
    fitted = fit_features(configs, _split(user=["a", "b"], tags=["x|y", "y"], price=[1.0, 5.0]))
    encoder = FeatureEncoder(fitted)
    config = json.loads(json.dumps(keras.layers.serialize(encoder), allow_nan=False))  # strict
    clone = keras.layers.deserialize(config)
    columns = dict(user=["b", "zz"], tags=["y|x", ""], price=np.array([2.0, np.nan], np.float32))
    for got, want in zip(_encode(clone, **columns), _encode(encoder, **columns)):
        np.testing.assert_array_equal(got, want)

    module = tf.Module()
    module.encoder = encoder
    module.f = tf.function(lambda x: encoder(x), input_signature=[encoder.input_signature()])
    tf.saved_model.save(module, str(tmp_path / "enc"))
    loaded = tf.saved_model.load(str(tmp_path / "enc"))
    inputs = {k: tf.constant(v) for k, v in columns.items()}
    for got, want in zip(loaded.f(inputs), encoder(inputs)):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_a_feature_with_no_kept_value_maps_every_value_to_the_oov_buckets(tmp_path):
    # A column that is empty (or below min_count) in every training row keeps no vocabulary;
    # its values then hash into the oov buckets as StringLookup's own oov path does.
    configs = [FeatureConfig("tags", "multi_hot", "item", max_len=2, oov_buckets=3),
               FeatureConfig("city", "categorical", "user", min_count=5, oov_buckets=3)]
    fitted = fit_features(configs, _split(tags=["", ""], city=["x", "y"]))
    assert [f.vocabulary for f in fitted] == [(), ()] and [f.size for f in fitted] == [3, 3]
    encoder = FeatureEncoder(fitted)
    columns = dict(tags=["a|b", ""], city=["x", "new"])
    ids, values = _encode(encoder, **columns)
    tags = tf.strings.to_hash_bucket_fast(["a", "b"], 3).numpy()
    city = tf.strings.to_hash_bucket_fast(["x", "new"], 3).numpy()
    np.testing.assert_array_equal(ids, [[tags[0], tags[1], 3 + city[0]], [0, 0, 3 + city[1]]])
    np.testing.assert_array_equal(values, [[1, 1, 1], [0, 0, 1]])

    module = tf.Module()
    module.encoder = encoder
    module.f = tf.function(lambda x: encoder(x), input_signature=[encoder.input_signature()])
    tf.saved_model.save(module, str(tmp_path / "enc"))
    got_ids, got_values = tf.saved_model.load(str(tmp_path / "enc")).f(
        {k: tf.constant(v) for k, v in columns.items()})
    np.testing.assert_array_equal(got_ids.numpy(), ids)
    np.testing.assert_array_equal(got_values.numpy(), values)


def test_encoder_is_built_and_saves_without_the_unbuilt_layer_warning(tmp_path):
    """The export calls `encode`, never the layer: an unbuilt encoder made TF log
    "Skipping full serialization of TF-Keras layer ... because it is not built" per export."""
    import logging

    (fitted,) = fit_features([FeatureConfig("user", "categorical", "user")], _split(user=["a", "b"]))
    encoder = FeatureEncoder([fitted])
    module = tf.Module()
    module.encoder = encoder
    module.encode = tf.function(lambda user: encoder.encode({"user": user})[0],
                                input_signature=[tf.TensorSpec([None], tf.string)])
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    tf.get_logger().addHandler(handler)
    try:
        tf.saved_model.save(module, str(tmp_path / "m"))
    finally:
        tf.get_logger().removeHandler(handler)
    assert encoder.built
    assert not [r for r in records if "not built" in r.getMessage()]
    loaded = tf.saved_model.load(str(tmp_path / "m"))
    assert loaded.encode(tf.constant(["a", "b", "zz"])).numpy().tolist() == \
        _encode(encoder, user=["a", "b", "zz"])[0].tolist()


def test_vocabularies_are_not_walked_as_tracked_lists():
    # Keras visits every element of a tracked list on each walk of the layers (several per
    # `fit`): 0.44 s at 23k ids. The lookups keep their vocabulary untracked, unchanged.
    values = np.array([f"u{i}" for i in range(3000)], object)
    (feature,) = fit_features([FeatureConfig("user", "categorical", "user")],
                              Split({"user": values}, None, len(values)))
    encoder = FeatureEncoder([feature])
    (lookup,) = encoder._lookups.values()
    structures = [t for t in lookup._self_tracked_trackables
                  if isinstance(t, tf.__internal__.tracking.TrackableDataStructure)]
    assert structures == []
    assert lookup.input_vocabulary == list(feature.vocabulary)
    assert lookup.get_config()["vocabulary"] == list(feature.vocabulary)
    ids, _ = encoder({"user": tf.constant(["u5", "nope"])})
    assert ids.numpy()[:, 0].tolist() == [feature.vocabulary.index("u5") + 1, 0]


def test_encode_numpy_equals_the_graph_bit_for_bit():
    # Training encodes eagerly (`encode_numpy`), serving in a graph, where Grappler rewrites
    # arithmetic: a division by the scale became a product with its reciprocal, 1 ulp apart
    # for ~9% of values. Skew between the two would be training/serving skew.
    rng = np.random.default_rng(3)
    n = 5000
    configs = [FeatureConfig(f"x_{norm}", "numeric", "item", normalization=norm)
               for norm in ("standard", "log", "min_max", "none")]
    configs += [FeatureConfig(f"tags_{c}", "multi_hot", "item", combiner=c, max_len=3)
                for c in ("sum", "mean", "sqrtn")]
    columns = {f"x_{norm}": rng.lognormal(3, 2, n).astype(np.float32)
               for norm in ("standard", "log", "min_max", "none")}
    tags = np.array([f"t{a}:{w:.3f}|t{b}" for a, b, w in
                     zip(rng.integers(0, 50, n), rng.integers(0, 50, n), rng.uniform(0, 3, n))],
                    dtype=object)
    columns.update({f"tags_{c}": tags for c in ("sum", "mean", "sqrtn")})
    encoder = FeatureEncoder(fit_features(configs, _split(**columns)))
    eager = encoder.encode_numpy(columns, batch_size=2048)
    graph = tf.function(encoder.encode, input_signature=[encoder.input_signature()])(
        {k: tf.constant(v) for k, v in columns.items()})
    for got, want in zip(eager, graph):
        np.testing.assert_array_equal(got, want.numpy())


@pytest.mark.parametrize("combiner", ["sum", "mean", "sqrtn"])
def test_multi_hot_combiner_matches_numpy(combiner):
    """The combiner's weights against a NumPy reference: per row, the first `max_len`
    non-empty tokens, ``name:number`` weighted, the rest 1; mean divides by their sum, sqrtn
    by their norm."""
    rng = np.random.default_rng(7)
    cells, expected = [], []
    for _ in range(3000):
        tokens = [f"t{rng.integers(0, 40)}" + (f":{rng.uniform(0.1, 4):.4f}"
                                                if rng.random() < 0.5 else "")
                  for _ in range(rng.integers(0, 7))]
        tokens = [t if rng.random() < 0.9 else "" for t in tokens]  # empty tokens are skipped
        cells.append("|".join(tokens))
        weights = np.array([float(t.split(":")[1]) if ":" in t else 1.0
                            for t in tokens if t][:4], np.float64)
        if combiner == "mean":
            weights = weights / max(weights.sum(), 1e-12)
        elif combiner == "sqrtn":
            weights = weights / max(np.sqrt(np.square(weights).sum()), 1e-12)
        expected.append(np.pad(weights, (0, 4 - len(weights))))
    cfg = FeatureConfig("tags", "multi_hot", "item", combiner=combiner, max_len=4)
    encoder = FeatureEncoder(fit_features([cfg], _split(tags=np.array(cells, object))))
    _, values = encoder.encode_numpy({"tags": np.array(cells, object)}, batch_size=1000)
    np.testing.assert_allclose(values, np.array(expected), rtol=1e-6, atol=1e-7)
