"""Epoch-end work for large tables: sampled finite checks, background checkpoint writes."""

import numpy as np
import pytest

from fm_keras import checkpoints
from fm_keras._tf import tf
from fm_keras.checkpoints import CheckpointWriter, is_large, parameters_finite
from fm_keras.config import DataConfig, ExperimentConfig, FeatureConfig, TrainingConfig
from fm_keras.errors import TrainingDivergedError
from fm_keras.features import FittedFeature
from fm_keras.model import build_model, make_optimizer
from fm_keras.training import TrainingState


@pytest.fixture
def small_threshold(monkeypatch):
    """Tables over 100 elements count as large (the real threshold is 4M elements)."""
    monkeypatch.setattr(checkpoints, "LARGE_VARIABLE_ELEMENTS", 100)
    monkeypatch.setattr(checkpoints, "SAMPLED_ROWS", 8)


def test_full_check_finds_any_non_finite_element():
    table = np.zeros((50, 4), np.float32)
    table[37, 2] = np.nan
    assert parameters_finite([tf.Variable(np.zeros(3, np.float32))])
    assert not parameters_finite([tf.Variable(table)])
    table[37, 2] = np.inf
    assert not parameters_finite([tf.Variable(table)], sampled=False)


def test_large_tables_are_sampled(small_threshold):
    table = np.zeros((1000, 4), np.float32)
    variable = tf.Variable(table)
    assert is_large([variable])
    table[:, 0] = np.nan  # every row bad: any sample sees it
    assert not parameters_finite([tf.Variable(table)], seed=3)
    one_bad = np.zeros((1000, 4), np.float32)
    one_bad[999, 0] = np.nan
    results = {parameters_finite([tf.Variable(one_bad)], seed=s) for s in range(5)}
    assert results == {True}  # 8 of 1000 rows: the sample misses it (O(1) cost, by design)
    assert not parameters_finite([tf.Variable(one_bad)], sampled=False)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_writer_saves_and_reads_back(tmp_path, asynchronous):
    variable = tf.Variable(np.arange(12, dtype=np.float32).reshape(3, 4))
    writer = CheckpointWriter(tf.train.Checkpoint(v=variable), str(tmp_path / "ck"),
                              asynchronous)
    writer.save()
    variable.assign_add(tf.ones([3, 4]))
    path = writer.save()
    writer.sync()
    assert writer.latest_checkpoint == path
    again = tf.Variable(tf.zeros([3, 4]))
    tf.train.Checkpoint(v=again).read(path).assert_existing_objects_matched()
    np.testing.assert_array_equal(again.numpy(), variable.numpy())
    assert len([p for p in (tmp_path / "ck").iterdir() if p.name.endswith(".index")]) == 1


def _state(tmp_path):
    features = (FittedFeature(FeatureConfig("f", "categorical", "user", hash_buckets=64)),)
    config = ExperimentConfig(DataConfig(train=("unused.csv",), label="click"),
                              tuple(f.config for f in features),
                              training=TrainingConfig(optimizer="adam"))
    model = build_model(features, config.model, config.training)
    model.compile(optimizer=make_optimizer(config.training), weighted_metrics=[])
    model.optimizer.build(model.trainable_variables)
    (tmp_path / "run").mkdir()  # as train() does: background writes create their own dirs
    state = TrainingState(str(tmp_path / "run"), model, config, resume=False)
    state.set_model(model)
    return model, state


def test_training_state_checkpoints_large_tables_in_the_background(tmp_path, small_threshold):
    model, state = _state(tmp_path)
    assert state.large and state.last.asynchronous and state.best.asynchronous
    best = model.fm.embeddings.numpy().copy()
    state.on_epoch_end(0, {"loss": 0.3, "val_auc": 0.7})
    model.fm.embeddings.assign_add(tf.ones_like(model.fm.embeddings))
    state.on_epoch_end(1, {"loss": 0.3, "val_auc": 0.6})   # worse: best stays epoch 1
    state.restore_best()
    np.testing.assert_array_equal(model.fm.embeddings.numpy(), best)
    # The best checkpoint holds the weights only; the last one the optimizer slots too.
    best_keys = {k for k, _ in tf.train.list_variables(state.best.latest_checkpoint)}
    last_keys = {k for k, _ in tf.train.list_variables(state.last.latest_checkpoint)}
    assert not any(k.startswith("optimizer") for k in best_keys)
    assert any(k.startswith("optimizer") for k in last_keys)


def test_final_full_check_catches_what_sampling_missed(tmp_path, small_threshold):
    model, state = _state(tmp_path)
    state.on_epoch_end(0, {"loss": 0.3, "val_auc": 0.7})
    state.best.sync()
    values = model.fm.embeddings.numpy()
    values[-1, 0] = np.nan
    state.best = CheckpointWriter(tf.train.Checkpoint(fm=model.fm), str(tmp_path / "bad"), False)
    model.fm.embeddings.assign(values)
    state.best.save()
    with pytest.raises(TrainingDivergedError, match="not finite"):
        state.restore_best()
