"""FMModel: raw features in, logit/probabilities out; TFRS loss; SavedModel round-trip."""

import math

import numpy as np
import pytest

from fm_keras._tf import tf
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
