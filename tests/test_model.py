"""FMModel: raw features in, logit/probabilities out; TFRS loss; SavedModel round-trip."""

import math

import numpy as np
import pytest

from fm_keras._tf import keras, tf
from fm_keras.config import FeatureConfig, ModelConfig, TrainingConfig
from fm_keras.data import Split
from fm_keras.features import fit_features
from fm_keras.model import FMModel, build_model, make_optimizer

CONFIGS = [FeatureConfig("user", "categorical", "user"),
           FeatureConfig("tags", "multi_hot", "item", max_len=2),
           FeatureConfig("price", "numeric", "item")]
COLUMNS = {"user": np.array(["a", "b", "c"], object), "tags": np.array(["x|y", "y", ""], object),
           "price": np.array([1.0, 2.0, np.nan], np.float32)}


def _model(task="binary", training=None):
    features = fit_features(CONFIGS, Split(dict(COLUMNS), None, 3))
    return build_model(features, ModelConfig(task=task, init_stddev=0.3), training)


def _raw():
    return {k: tf.constant(v) for k, v in COLUMNS.items()}


def test_outputs_and_calibration_shift():
    model = _model(training=TrainingConfig(pos_weight=4.0, neg_sample_rate=0.5))
    out = model(_raw())
    correction = -math.log(4.0) + math.log(0.5)
    np.testing.assert_allclose(out["raw_probability"], tf.sigmoid(out["logit"]), atol=1e-6)
    np.testing.assert_allclose(out["probability"], tf.sigmoid(out["logit"] + correction), atol=1e-6)


def test_call_equals_layer_on_encoded_slots():
    model = _model()
    ids, values = model.encoder(_raw())
    np.testing.assert_allclose(model(_raw())["logit"], model.logits(ids, values), atol=1e-6)


def test_regression_task_outputs_prediction():
    assert set(_model("regression")(_raw())) == {"prediction"}


def test_compute_loss_uses_weights():
    model = _model()
    ids, values = model.encoder(_raw())
    labels = tf.constant([1.0, 0.0, 1.0])
    base = model.compute_loss(({"ids": ids, "values": values}, labels, tf.ones([3])))
    doubled = model.compute_loss(({"ids": ids, "values": values}, labels, 2 * tf.ones([3])))
    assert float(doubled) == pytest.approx(2 * float(base), rel=1e-5)


def test_mismatched_layers_are_rejected():
    model = _model()
    other = build_model(fit_features(CONFIGS[:1], Split({"user": COLUMNS["user"]}, None, 3)),
                        ModelConfig())
    with pytest.raises(ValueError, match="build both from the same features"):
        FMModel(model.encoder, other.fm)


def _encoded_batch(model):
    """(x, y, w) of the encoded `COLUMNS`: one batch of 3 rows, every weight 1."""
    ids, values = model.encoder(_raw())
    return {"ids": ids, "values": values}, tf.constant([1.0, 0.0, 1.0]), tf.ones([3])


def _fit_on(batches, epochs=2):
    """A fresh `_model` (seeded) trained on `_encoded_batch` cut by `batches`; returns it and
    its history."""
    keras.utils.set_random_seed(5)
    model = _model()
    model.compile(optimizer=make_optimizer(TrainingConfig(optimizer="adam", learning_rate=0.1)))
    data = tf.data.Dataset.from_tensors(_encoded_batch(model)).map(batches)
    return model, model.fit(data, epochs=epochs, verbose=0).history


def test_fit_and_evaluate_take_batches_with_or_without_sample_weights():
    # Issue 19.2: (x, y) batches failed "not enough values to unpack (expected 3, got 2)".
    weighted, weighted_history = _fit_on(lambda x, y, w: (x, y, w))
    model, history = _fit_on(lambda x, y, w: (x, y))
    np.testing.assert_allclose(model.fm.table.numpy(), weighted.fm.table.numpy(), atol=1e-7)
    np.testing.assert_allclose(history["loss"], weighted_history["loss"], rtol=1e-6)
    x, y, w = _encoded_batch(model)
    got = model.evaluate(tf.data.Dataset.from_tensors((x, y)), verbose=0, return_dict=True)
    want = model.evaluate(tf.data.Dataset.from_tensors((x, y, w)), verbose=0, return_dict=True)
    assert got == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("batches", [lambda x, y, w: (x,), lambda x, y, w: x])
def test_fit_without_labels_says_what_it_needs(batches):
    with pytest.raises(ValueError, match=r"labelled batches: give fit/evaluate \(x, y\)"):
        _fit_on(batches, epochs=1)


@pytest.mark.parametrize("name", ["adam", "adagrad", "ftrl", "sgd"])
def test_optimizers(name):
    optimizer = make_optimizer(TrainingConfig(optimizer=name, learning_rate=0.1))
    assert optimizer.learning_rate.numpy() == pytest.approx(0.1)


def test_saved_model_round_trip_takes_raw_features(tmp_path):
    model = _model(training=TrainingConfig(pos_weight=2.0))
    module = tf.Module()
    module.model = model
    module.serve = tf.function(lambda x: model(x),
                               input_signature=[model.encoder.input_signature()])
    tf.saved_model.save(module, str(tmp_path / "m"))
    loaded = tf.saved_model.load(str(tmp_path / "m"))
    got, want = loaded.serve(_raw()), model(_raw())
    for key in want:
        np.testing.assert_allclose(got[key].numpy(), want[key].numpy(), atol=1e-6)


def _raw_rows(model, rows=64):
    """Raw features for `model`, drawn from its vocabularies (with unseen values and NaNs)."""
    rng = np.random.default_rng(0)
    columns = {}
    for feature in model.encoder.features:
        if feature.config.kind == "numeric":
            x = rng.normal(size=rows).astype(np.float32)
            columns[feature.config.name] = tf.constant(np.where(x > 1.5, np.nan, x * 10))
        else:
            pool = [*feature.vocabulary[:50], "never_seen"]
            columns[feature.config.name] = tf.constant(rng.choice(pool, rows).astype(object))
    return columns


def test_keras_save_of_a_loaded_run_is_a_saved_model_without_a_first_call(small_run, tmp_path):
    # Issue 19.1: `load_run(...).model.save(dir)` raised "the input shape is not available".
    from fm_keras.runs import load_run

    model = load_run(small_run).model
    model.save(str(tmp_path / "m"))
    loaded = keras.models.load_model(str(tmp_path / "m"))
    raw = _raw_rows(model)
    got, want = loaded(raw), model(raw)
    assert set(got) == set(want) == {"logit", "raw_probability", "probability"}
    for key in want:
        np.testing.assert_allclose(got[key].numpy(), want[key].numpy(), atol=1e-6)


@pytest.mark.parametrize("path, save_format, fmt", [("m.keras", None, "keras"),
                                                    ("m.h5", None, "h5"),
                                                    ("m", "h5", "h5")])
def test_keras_and_h5_formats_fail_at_save_saying_what_to_use(tmp_path, path, save_format, fmt):
    # Issue 19.1: `.keras` saved with warnings, then load_model failed "Unable to revive".
    model = _model()
    with pytest.raises(ValueError, match=f"FMModel cannot be saved in the {fmt} format .*"
                                         "SavedModel.*load_run.*fm-keras export"):
        model.save(str(tmp_path / path), save_format=save_format)
    assert not list(tmp_path.iterdir())


def test_keras_save_model_function_fails_on_the_missing_config(tmp_path):
    with pytest.raises(NotImplementedError, match="no Keras config.*SavedModel"):
        keras.models.save_model(_model(), str(tmp_path / "m.keras"))


def test_feature_l2_overrides_the_model_l2_for_its_slots():
    import dataclasses

    configs = [dataclasses.replace(CONFIGS[0], l2=2.0), *CONFIGS[1:]]
    features = fit_features(configs, Split(dict(COLUMNS), None, 3))
    fm = build_model(features, ModelConfig(l2_embeddings=1e-4, l2_linear=1e-5)).fm
    assert fm.l2_embeddings == [2.0, 1e-4, 1e-4, 1e-4]         # user, tags x2, price
    assert fm.l2_linear == [2.0, 1e-5, 1e-5, 1e-5]
    assert _model().fm.l2_embeddings == ModelConfig().l2_embeddings  # no override: a scalar


def test_towers_need_both_sides():
    import numpy as np

    from fm_keras.config import FeatureConfig, ModelConfig
    from fm_keras.data import Split
    from fm_keras.features import fit_features
    from fm_keras.model import build_model

    split = Split({"user_id": np.array(["a", "b"], object)}, None, 2)
    model = build_model(fit_features([FeatureConfig("user_id", "categorical", "user")], split),
                        ModelConfig())
    with pytest.raises(ValueError, match="no towers: it needs both query-side"):
        model.user_tower
