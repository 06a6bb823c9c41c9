"""Epoch-end work for large tables: sampled finite checks, the best weights in memory,
checkpoints by time and in the background, resume from the checkpoint's epoch."""

import json

import numpy as np
import pytest

from fm_keras import checkpoints
from fm_keras._tf import tf
from fm_keras.checkpoints import (BestWeights, CheckpointWriter, checkpoint_due, is_large,
                                  parameters_finite, saved_trained_rows, trained_rows)
from fm_keras.config import DataConfig, ExperimentConfig, FeatureConfig, TrainingConfig
from fm_keras.errors import TrainingDivergedError
from fm_keras.features import FittedFeature
from fm_keras.model import build_model, make_optimizer
from fm_keras.runs import TrainingState


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


def _state(tmp_path, epochs: int = 10, resume: bool = False, trained=None):
    features = (FittedFeature(FeatureConfig("f", "categorical", "user", hash_buckets=64)),)
    config = ExperimentConfig(DataConfig(train=("unused.csv",), label="click"),
                              tuple(f.config for f in features),
                              training=TrainingConfig(optimizer="adam", epochs=epochs,
                                                      early_stopping_patience=5))
    model = build_model(features, config.model, config.training)
    model.compile(optimizer=make_optimizer(config.training), weighted_metrics=[])
    model.optimizer.build(model.trainable_variables)
    (tmp_path / "run").mkdir(exist_ok=True)  # as train() does
    state = TrainingState(str(tmp_path / "run"), model, config, resume=resume,
                          trained_rows=trained)
    state.set_model(model)
    return model, state


def test_checkpoint_due_every_epoch_for_small_tables_by_time_for_large_ones():
    assert checkpoint_due(large=False, last_epoch=False, seconds_since_checkpoint=0.0)
    assert not checkpoint_due(large=True, last_epoch=False, seconds_since_checkpoint=599.0)
    assert checkpoint_due(large=True, last_epoch=False, seconds_since_checkpoint=600.0)
    assert checkpoint_due(large=True, last_epoch=True, seconds_since_checkpoint=0.0)
    assert checkpoint_due(True, False, 5.0, every_seconds=5.0)
    assert not checkpoint_due(True, False, 4.9, every_seconds=5.0)


@pytest.mark.parametrize("large_from", [checkpoints.PARTIAL_COPY_MIN_ELEMENTS, 0],
                         ids=["eager", "xla"])
@pytest.mark.parametrize("sparse_read", [False, True], ids=["dense", "copy_on_read"])
def test_best_weights_copy_restore_and_checkpoint(tmp_path, monkeypatch, large_from,
                                                  sparse_read):
    monkeypatch.setattr(checkpoints, "PARTIAL_COPY_MIN_ELEMENTS", large_from)
    live = [tf.Variable(np.arange(8, dtype=np.float32).reshape(4, 2)), tf.Variable([1.0])]
    if sparse_read:  # as in training: the table then stays in TF's copy-on-read mode
        tf.gather(live[0], [0])
    best = BestWeights(live)
    assert best.large == [large_from == 0] * 2
    best.save()
    saved = [v.numpy().copy() for v in live]
    live[0].scatter_add(tf.IndexedSlices(tf.ones([1, 2]), tf.constant([2])))  # in place
    live[1].assign([5.0])
    np.testing.assert_array_equal(best.copies[0].numpy(), saved[0])  # a copy, not an alias
    path = tf.train.Checkpoint(best=best.trackable).write(str(tmp_path / "ck"))
    best.restore()
    for v, want in zip(live, saved):
        np.testing.assert_array_equal(v.numpy(), want)
    other = BestWeights([tf.Variable(tf.zeros([4, 2])), tf.Variable([0.0])])
    tf.train.Checkpoint(best=other.trackable).read(path).assert_existing_objects_matched()
    np.testing.assert_array_equal(other.copies[0].numpy(), saved[0])


@pytest.fixture
def partial_copies(monkeypatch):
    """Tables of any size get partial best-weights copies (the real threshold is 4M elements)."""
    monkeypatch.setattr(checkpoints, "PARTIAL_COPY_MIN_ELEMENTS", 0)


def test_trained_rows_are_the_counted_ids_and_every_given_id():
    counts = np.array([0, 3, 0, 0, 1, 0, 0, 0])
    zero_value_ids = np.array([[0, 0], [5, 0]])  # any shape
    catalog = np.array([6])
    want = np.zeros(8, bool)
    want[[1, 4]] = True                          # counted (x != 0)
    want[[0, 5, 6]] = True                       # looked up with x = 0, drawn from the catalog
    np.testing.assert_array_equal(
        trained_rows(8, zero_value_ids, catalog, counts=counts), want)
    np.testing.assert_array_equal(trained_rows(8, np.array([2, 2, 7])),
                                  np.isin(np.arange(8), [2, 7]))


def test_partial_copy_holds_the_trained_rows_and_restores_them_exactly(tmp_path,
                                                                       partial_copies):
    rng = np.random.default_rng(0)
    table = tf.Variable(rng.normal(size=(10, 3)).astype(np.float32))
    linear = tf.Variable(rng.normal(size=10).astype(np.float32))
    bias = tf.Variable(0.5)
    trained = np.isin(np.arange(10), [1, 4, 7])
    best = BestWeights([table, linear, bias], trained)
    assert best.partial == [True, True, False]
    assert best.copies[0].shape == (3, 3) and best.copies[1].shape == (3,)
    saved = [v.numpy().copy() for v in (table, linear, bias)]
    # What an epoch does: the trained rows (and dense variables) change, no other row.
    table.scatter_add(tf.IndexedSlices(tf.ones([3, 3]), tf.constant([1, 4, 7])))
    linear.scatter_update(tf.IndexedSlices(tf.constant([9.0, 9.0]), tf.constant([4, 7])))
    bias.assign(2.0)
    path = tf.train.Checkpoint(best=best.trackable).write(str(tmp_path / "ck"))
    best.restore()
    for v, want in zip((table, linear, bias), saved):
        np.testing.assert_array_equal(v.numpy(), want)
    # The copy and its rows round-trip through a checkpoint into the same rows.
    table.scatter_add(tf.IndexedSlices(tf.ones([3, 3]), tf.constant([1, 4, 7])))
    other = BestWeights([table, linear, bias], trained)
    tf.train.Checkpoint(best=other.trackable).read(path).assert_existing_objects_matched()
    other.restore()
    np.testing.assert_array_equal(table.numpy(), saved[0])


def test_whole_copies_without_a_row_set_or_when_it_covers_most_rows(partial_copies):
    table = tf.Variable(tf.ones([10, 3]))
    assert BestWeights([table]).rows is None
    most = np.arange(10) < 6                     # 60% > PARTIAL_COPY_MAX_SHARE
    assert BestWeights([table], most).partial == [False]
    assert BestWeights([table], np.arange(12) < 2).partial == [False]  # not this table's rows


def test_best_weights_of_an_unbuilt_model_is_an_error():
    with pytest.raises(ValueError, match="build the model"):
        BestWeights([])


def _epochs(state, aucs, first=0):
    for epoch, auc in enumerate(aucs, start=first):
        state.on_epoch_end(epoch, {"loss": 0.3, "val_auc": auc})


def test_early_stopping_says_which_epoch_is_best(tmp_path, capsys):
    """Gains under min_delta (1e-4) move the best epoch but count toward the patience (5):
    the run stops with its last epoch best, and the line says so."""
    _, state = _state(tmp_path)
    _epochs(state, [0.7, 0.71, 0.71002, 0.71004, 0.71006, 0.71008, 0.7101])
    assert state.stopper.stopped and state.best_epoch == 7
    assert capsys.readouterr().err.splitlines()[-1] == (
        "fm-keras: early stopping after epoch 7: val_auc has not improved by more than 0.0001 "
        "for 5 epochs; best was epoch 7, the last, ahead by less than 0.0001")
    (tmp_path / "other").mkdir()
    _, state = _state(tmp_path / "other")
    _epochs(state, [0.7, 0.71, 0.70, 0.70, 0.70, 0.70, 0.70])
    assert capsys.readouterr().err.splitlines()[-1].endswith("for 5 epochs; best was epoch 2")


def test_large_tables_checkpoint_by_time_and_at_the_last_epoch(tmp_path, small_threshold):
    model, state = _state(tmp_path, epochs=4)
    assert state.large and state.last.asynchronous
    state.on_train_begin()
    _epochs(state, [0.7])  # improving, but no checkpoint due: the best is a copy in memory
    best = model.fm.embeddings.numpy().copy()
    model.fm.table.assign_add(tf.ones_like(model.fm.table))
    _epochs(state, [0.6, 0.65], first=1)
    state.last.sync()
    assert state.last.latest_checkpoint is None
    saved = json.loads((tmp_path / "run" / "state.json").read_text())
    assert saved["epoch"] == 3 and saved["checkpoint_epoch"] == 0 and saved["best_epoch"] == 1
    _epochs(state, [0.6], first=3)  # the last epoch (training.epochs = 4): checkpointed
    state.restore_best()
    np.testing.assert_array_equal(model.fm.embeddings.numpy(), best)
    keys = {k for k, _ in tf.train.list_variables(state.last.latest_checkpoint)}
    assert any(k.startswith("optimizer") for k in keys) and any(k.startswith("best/") for k in keys)
    assert json.loads((tmp_path / "run" / "state.json").read_text())["checkpoint_epoch"] == 4


def test_resume_continues_after_the_epoch_the_checkpoint_holds(tmp_path, small_threshold):
    """state.json is written every epoch, the checkpoint every few: resume follows the
    checkpoint (its weights, optimizer, best copy and early-stopping state together)."""
    model, state = _state(tmp_path, epochs=6)
    state.checkpoint_seconds = 0.0  # every epoch for now
    _epochs(state, [0.7, 0.72])
    state.last.sync()
    at_checkpoint = [v.numpy().copy() for v in model.fm.trainable_weights]
    state.checkpoint_seconds = float("inf")
    model.fm.table.assign_add(tf.ones_like(model.fm.table))
    _epochs(state, [0.8], first=2)  # a new best, trained but not checkpointed
    assert json.loads((tmp_path / "run" / "state.json").read_text())["epoch"] == 3

    again, resumed = _state(tmp_path, epochs=6, resume=True)
    assert resumed.initial_epoch == 2 and resumed.checkpoint_epoch == 2
    assert len(resumed.history) == 2 and resumed.best_epoch == 2
    assert resumed.stopper.best_value == pytest.approx(0.72)
    for v, want in zip(again.fm.trainable_weights, at_checkpoint):
        np.testing.assert_array_equal(v.numpy(), want)
    for v in again.fm.trainable_weights:
        v.assign(tf.zeros_like(v))
    resumed.restore_best()  # the best copy (epoch 2's) came back with the checkpoint
    for v, want in zip(again.fm.trainable_weights, at_checkpoint):
        np.testing.assert_array_equal(v.numpy(), want)


def test_resume_restores_a_partial_best_copy(tmp_path, small_threshold, partial_copies):
    """The trained rows' copy is saved with the checkpoint and restored after a resume."""
    trained = np.arange(64) % 3 == 0  # of the 64 hash buckets of feature f
    model, state = _state(tmp_path, epochs=6, trained=trained)
    assert state.best_weights.rows is not None
    rows = tf.constant(np.flatnonzero(trained))

    def train_an_epoch(m):  # changes the trained rows only, as a training epoch does
        for v in (m.fm.table,):
            v.scatter_add(tf.IndexedSlices(tf.ones([len(rows), *v.shape[1:]]), rows))

    state.checkpoint_seconds = 0.0
    train_an_epoch(model)
    _epochs(state, [0.7])
    best = [v.numpy().copy() for v in model.fm.trainable_weights]
    train_an_epoch(model)
    _epochs(state, [0.6], first=1)
    state.last.sync()
    # The copy is rebuilt on the checkpoint's rows, even if the data now trains others.
    for now in (trained, None, np.arange(64) < 5):
        again, resumed = _state(tmp_path, epochs=6, resume=True, trained=now)
        np.testing.assert_array_equal(resumed.best_weights.rows.numpy(), np.flatnonzero(trained))
        train_an_epoch(again)
        resumed.restore_best()
        for v, want in zip(again.fm.trainable_weights, best):
            np.testing.assert_array_equal(v.numpy(), want)


def test_resume_from_whole_copies_stays_whole(tmp_path, small_threshold, partial_copies):
    """A checkpoint whose best copy is whole (no rows saved: a small table, or an earlier
    fm-keras) resumes with whole copies."""
    model, state = _state(tmp_path, epochs=6)
    state.checkpoint_seconds = 0.0
    _epochs(state, [0.7])
    state.last.sync()
    assert saved_trained_rows(state.last.latest_checkpoint, model.fm.num_ids) is None
    _, resumed = _state(tmp_path, epochs=6, resume=True, trained=np.arange(64) < 5)
    assert resumed.best_weights.rows is None


def test_final_full_check_catches_what_sampling_missed(tmp_path, small_threshold):
    model, state = _state(tmp_path)
    _epochs(state, [0.7])
    copy = next(c for c, v in zip(state.best_weights.copies, state.best_weights.live)
                if v is model.fm.table)
    values = copy.numpy()
    values[-1, 0] = np.nan
    copy.assign(values)
    with pytest.raises(TrainingDivergedError, match="not finite"):
        state.restore_best()
