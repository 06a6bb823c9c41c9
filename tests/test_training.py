"""Training runs end to end on small synthetic data: run dir, resume, divergence, calibration."""

import dataclasses
import json
import os

import numpy as np
import pandas as pd
import pytest

from trained_rows_testlib import changed_rows, record_trained_rows, with_new_catalog_items
from fm_keras import checkpoints, training
from fm_keras.config import load_experiment
from fm_keras.errors import ConfigError, DataError, RunError, TrainingDivergedError
from fm_keras.data import load_data_split
from fm_keras.runs import TrainingState, load_run, predict_split
from fm_keras.training import train


def _config(synth_dir, **training):
    config = load_experiment(os.path.join(synth_dir, "experiment.yaml"))
    defaults = {"epochs": 2, "steps_per_execution": 8, "batch_size": 1024}  # small data: small batches
    return dataclasses.replace(
        config, training=dataclasses.replace(config.training, **{**defaults, **training}))


@pytest.fixture(scope="module")
def calib_synth(tmp_path_factory):
    """Enough rows that the test set's positive rate is known to a few percent."""
    from fm_keras.synth import generate

    out = tmp_path_factory.mktemp("calib")
    generate(str(out), rows=150_000, seed=11)
    return str(out)


def test_each_split_is_encoded_once(small_synth, tmp_path, monkeypatch):
    """The validation rows feed the per-epoch metrics, the prior's line search, the
    calibration and the final metrics: encoded once for all four (they were encoded four
    times)."""
    from fm_keras.features import FeatureEncoder

    rows, original = [], FeatureEncoder.encode_numpy

    def counted(self, columns, *args, **kwargs):
        rows.append(len(next(iter(columns.values()))))
        return original(self, columns, *args, **kwargs)

    monkeypatch.setattr(FeatureEncoder, "encode_numpy", counted)
    synth_dir, _ = small_synth
    config = _config(synth_dir, epochs=1)
    assert config.model.l2_prior_validation  # the line search is on
    record = train(config, str(tmp_path / "run"), verbose=0)
    assert "test" in record["metrics"]  # train, valid, then the test rows: one call each
    assert len(rows) == 3 and rows[:2] == [record["rows"]["train"], record["rows"]["valid"]], \
        rows


def test_run_directory_and_load(small_synth, tmp_path):
    synth_dir, _ = small_synth
    run_dir = str(tmp_path / "run")
    record = train(_config(synth_dir, learning_rate=0.02), run_dir, verbose=0)  # 2 short epochs
    assert record["status"] == "complete"
    assert sorted(os.listdir(run_dir)) == ["checkpoints", "experiment.json", "features.json",
                                           "model", "run.json", "state.json"]
    assert record["rows"]["dropped"]["cached_exposures"] > 0
    assert record["metrics"]["test"]["auc"] > 0.6
    # The calibrator (auto) is chosen on cross-fitted validation logloss, stored in run.json
    # and used by the loaded run's probability.
    cal = record["calibration"]
    assert cal["method"] == min(cal["fit"]["cross_fitted_logloss"],
                                key=lambda m: cal["fit"]["cross_fitted_logloss"][m] or np.inf)
    run = load_run(run_dir)
    assert run.model.calibration.to_dict() == cal
    valid = load_data_split(run.config.data, "valid", run.config.features, "binary")
    out = predict_split(run.model, valid)
    np.testing.assert_allclose(out["probability"],
                               run.model.calibration.probability_numpy(out["logit"]), atol=1e-6)
    run = load_run(run_dir)
    test = load_data_split(run.config.data, "test", run.config.features, "binary")
    probs = predict_split(run.model, test)["probability"]
    from fm_keras.evaluation import binary_metrics
    assert binary_metrics(test.labels, probs)["auc"] == pytest.approx(
        record["metrics"]["test"]["auc"], abs=1e-6)
    with pytest.raises(RunError, match="holds a finished run"):
        train(_config(synth_dir), run_dir, verbose=0)


@pytest.mark.parametrize("role", ["train", "test"])
def test_bad_data_leaves_no_run_dir(small_synth, tmp_path, role):
    # A new user's trial: a bad test file was read after training, and the run directory of
    # the wasted training stayed.
    synth_dir, _ = small_synth
    bad = tmp_path / "bad.csv"
    bad.write_text("user_id,click\nu1,1\n")
    config = _config(synth_dir)
    config = dataclasses.replace(config, data=dataclasses.replace(config.data,
                                                                  **{role: (str(bad),)}))
    with pytest.raises(DataError, match="bad.csv: missing column"):
        train(config, str(tmp_path / "run"), verbose=0)
    assert not (tmp_path / "run").exists()


def test_a_training_glob_holding_the_validation_file_fails_before_the_run_dir(small_synth,
                                                                             tmp_path):
    """data.train: '<dir>/[tv]*.csv' also matched valid.csv and test.csv, and the run trained
    on them silently."""
    synth_dir, _ = small_synth
    config = _config(synth_dir)
    config = dataclasses.replace(config, data=dataclasses.replace(
        config.data, train=(os.path.join(synth_dir, "[tv]*.csv"),)))
    with pytest.raises(DataError, match=r"data: valid file .*valid.csv is also a training file"):
        train(config, str(tmp_path / "run"), verbose=0)
    assert not (tmp_path / "run").exists()


def test_a_shard_directory_as_data_train_still_gets_the_convert_hint(small_synth, tmp_path):
    """data.train naming a converted shard directory (not its shards.json) is the ConfigError
    that names the manifest; the disjoint-splits check ran first and said "no such file"."""
    from fm_keras.convert import MANIFEST

    synth_dir, _ = small_synth
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / MANIFEST).write_text("{}")
    config = _config(synth_dir)
    config = dataclasses.replace(config, data=dataclasses.replace(config.data,
                                                                  train=(str(shards),)))
    with pytest.raises(ConfigError, match="is a shard directory; name its manifest"):
        train(config, str(tmp_path / "run"), verbose=0)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("existed", [False, True])
def test_a_run_stopped_before_writing_leaves_no_run_dir_it_made(small_synth, tmp_path,
                                                                 monkeypatch, existed):
    # Ctrl-C / SIGTERM while the out-of-core shards are written: the shard writer removes its
    # temp directory, which left the (empty) run directory it had been made in.
    synth_dir, _ = small_synth
    config = _config(synth_dir)
    config = dataclasses.replace(config, data=dataclasses.replace(config.data,
                                                                  out_of_core="true"))
    run_dir = tmp_path / "run"

    def stopped_while_writing(config, encoder, directory, fit):
        os.makedirs(directory)
        os.rmdir(directory)  # as fsutil.atomic_dir cleans up on the way out
        raise KeyboardInterrupt

    monkeypatch.setattr(training.out_of_core, "write_shards", stopped_while_writing)
    if existed:
        run_dir.mkdir()
    with pytest.raises(KeyboardInterrupt):
        train(config, str(run_dir), verbose=0)
    assert run_dir.exists() == existed  # a directory that was there before stays


@pytest.mark.parametrize("missing", [True, False])
def test_a_large_table_without_huge_pages_logs_how_to_get_them(small_synth, tmp_path,
                                                                 monkeypatch, capsys, missing):
    synth_dir, _ = small_synth
    monkeypatch.setattr(training.hugepages, "missing", lambda: missing)
    monkeypatch.setattr(checkpoints, "LARGE_VARIABLE_ELEMENTS", 100)  # the table is "large"

    def stop(*args, **kwargs):  # the hint comes before the step is chosen: stop there
        raise KeyboardInterrupt

    monkeypatch.setattr(training.compiled_steps, "choose", stop)
    with pytest.raises(KeyboardInterrupt):
        train(_config(synth_dir), str(tmp_path / "run"), verbose=0)
    hinted = "start Python with GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in capsys.readouterr().err
    assert hinted == missing


def _with_split(config, role, path):
    return dataclasses.replace(config, data=dataclasses.replace(config.data, **{role: (path,)}))


def test_single_class_training_labels_fail_before_the_run_dir(small_synth, tmp_path):
    synth_dir, _ = small_synth
    frame = pd.read_csv(os.path.join(synth_dir, "train.csv"))
    frame[frame["click"] == 0].to_csv(tmp_path / "no_clicks.csv", index=False)
    config = _with_split(_config(synth_dir), "train", str(tmp_path / "no_clicks.csv"))
    with pytest.raises(DataError, match="no_clicks.csv: label column 'click': every training row"):
        train(config, str(tmp_path / "run"), verbose=0)
    assert not (tmp_path / "run").exists()


def test_single_class_validation_stops_on_logloss(small_synth, tmp_path, capsys):
    synth_dir, _ = small_synth
    frame = pd.read_csv(os.path.join(synth_dir, "valid.csv"))
    frame[frame["click"] == 0].to_csv(tmp_path / "valid0.csv", index=False)
    config = _with_split(_config(synth_dir), "valid", str(tmp_path / "valid0.csv"))
    record = train(config, str(tmp_path / "run"), verbose=0)
    err = capsys.readouterr().err
    assert "AUC is undefined; early stopping watches val_logloss" in err
    assert "calibration: none (validation rows hold one class)" in err
    assert any("AUC is undefined" in w for w in record["warnings"])
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["monitor"] == "val_logloss"
    assert all("val_auc" not in epoch and epoch["val_logloss"] > 0 for epoch in record["history"])
    assert record["metrics"]["valid"]["auc"] is None


def test_resume_continues_an_interrupted_run(small_synth, tmp_path, monkeypatch):
    synth_dir, _ = small_synth
    run_dir = str(tmp_path / "run")
    original = TrainingState.on_epoch_end

    def interrupt_after_first_epoch(self, epoch, logs=None):
        original(self, epoch, logs)
        raise KeyboardInterrupt

    monkeypatch.setattr(TrainingState, "on_epoch_end", interrupt_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(_config(synth_dir, epochs=3), run_dir, verbose=0)
    monkeypatch.setattr(TrainingState, "on_epoch_end", original)
    with pytest.raises(RunError, match="not a finished fm_keras run.*--resume"):
        load_run(run_dir)
    with pytest.raises(RunError, match="pass --resume"):
        train(_config(synth_dir, epochs=3), run_dir, verbose=0)
    # Resumed with compiled steps (the first process ran Keras' step: 16 batches an epoch):
    # how the steps run may change, the checkpointed optimizer state carries over.
    record = train(_config(synth_dir, epochs=3, compiled_steps="always"), run_dir, resume=True,
                   verbose=0)
    assert len(record["history"]) == 3  # epoch 1 from the first process, 2-3 resumed
    assert record["compiled_steps"]["enabled"]
    assert record["history"][2]["loss"] < record["history"][0]["loss"]


def test_resume_from_a_checkpoint_older_than_the_last_epoch(small_synth, tmp_path, monkeypatch,
                                                            capsys):
    """Issue 13: large tables are checkpointed every few epochs, not every epoch. A run stopped
    after epoch 2 whose checkpoint holds epoch 1 resumes after epoch 1: epoch 2 is trained
    again, and the run ends as good as an uninterrupted one (not bit-equal: a new process
    starts the per-epoch shuffle over)."""
    from fm_keras import runs

    synth_dir, _ = small_synth
    config = _config(synth_dir, epochs=3, early_stopping_patience=10)
    run_dir = str(tmp_path / "run")
    ends = []

    def first_epoch_only(large, last_epoch, seconds, every):
        ends.append(1)
        return last_epoch or len(ends) == 1

    original = TrainingState.on_epoch_end

    def interrupt_after_second_epoch(self, epoch, logs=None):
        original(self, epoch, logs)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(runs, "checkpoint_due", first_epoch_only)
    monkeypatch.setattr(TrainingState, "on_epoch_end", interrupt_after_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(config, run_dir, verbose=0)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["epoch"] == 2 and state["checkpoint_epoch"] == 1
    monkeypatch.setattr(TrainingState, "on_epoch_end", original)
    capsys.readouterr()
    record = train(config, run_dir, resume=True, verbose=0)
    assert "resuming after epoch 1, the checkpoint's" in capsys.readouterr().err
    assert len(record["history"]) == 3
    assert record["history"][0] == state["history"][0]  # epoch 1 from the checkpoint
    monkeypatch.setattr(runs, "checkpoint_due", lambda *args: True)
    straight = train(config, str(tmp_path / "straight"), verbose=0)
    assert record["metrics"]["valid"]["auc"] == pytest.approx(
        straight["metrics"]["valid"]["auc"], abs=0.02)


@pytest.fixture(scope="module")
def early_stopped_run(small_synth, tmp_path_factory):
    """A run that early stopping ends before its 8 epochs; returns (run_dir, record). Both
    tests below only read it."""
    synth_dir, _ = small_synth
    run_dir = str(tmp_path_factory.mktemp("early_stopped") / "run")
    record = train(_config(synth_dir, epochs=8, early_stopping_patience=1, optimizer="adam",
                           learning_rate=0.05), run_dir, verbose=0)
    return run_dir, record


def test_early_stopping_restores_best_epoch(early_stopped_run):
    _, record = early_stopped_run
    aucs = [h["val_auc"] for h in record["history"]]
    assert record["best_epoch"] == int(np.argmax(aucs)) + 1  # 1-based, like the log lines
    assert record["metrics"]["valid"]["auc"] == pytest.approx(max(aucs), abs=0.01)


@pytest.fixture(scope="module")
def one_epoch_run(small_synth, tmp_path_factory):
    """A run of one epoch (its cap); returns (run_dir, record, what it printed on stderr).
    The tests only read it."""
    import contextlib
    import io

    synth_dir, _ = small_synth
    run_dir = tmp_path_factory.mktemp("one_epoch") / "run"
    with contextlib.redirect_stderr(io.StringIO()) as err:
        record = train(_config(synth_dir, epochs=1), str(run_dir), verbose=0)
    return run_dir, record, err.getvalue()


def test_progress_shows_no_unmeasured_train_metrics(one_epoch_run):
    """Regression: train-time auc/logloss printed as 0 (TFRS computes them on validation only)."""
    _, record, _ = one_epoch_run
    logs = record["history"][0]
    assert {"loss", "val_auc", "val_logloss"} <= set(logs)
    assert not {"auc", "logloss"} & set(logs)
    assert logs["loss"] > 0 and 0.5 < logs["val_auc"] < 1


def test_divergence_stops_with_advice(small_synth, tmp_path):
    synth_dir, _ = small_synth
    with pytest.raises(TrainingDivergedError, match="Decrease training.learning_rate"):
        train(_config(synth_dir, optimizer="sgd", learning_rate=1e12), str(tmp_path / "run"),
              verbose=0)


@pytest.mark.parametrize("training", [{"pos_weight": 5.0}, {"neg_sample_rate": 0.2}])
def test_corrected_probability_is_calibrated(calib_synth, tmp_path, training):
    """Must show 5: the corrected mean is within 10% of the observed test positive rate."""
    record = train(_config(calib_synth, epochs=3, **training), str(tmp_path / "run"), verbose=0)
    test = record["metrics"]["test"]
    assert abs(test["calibration_ratio"] - 1) < 0.10, test
    assert abs(test["raw"]["calibration_ratio"] - 1) > 0.5  # the uncorrected one is far off


def test_epoch_cap_while_improving_warns_and_is_recorded(small_synth, one_epoch_run):
    """Issue 11: a run that hits training.epochs before early stopping ended it says so."""
    synth_dir, _ = small_synth
    run_dir, record, err = one_epoch_run
    assert record["best_epoch"] == 1 and not record["converged"]
    # The empirical Bayes prior is re-estimated between epochs: after one, none yet.
    config = _config(synth_dir)
    assert set(record["prior"]) == {f.name for f in config.features}
    assert all(tau == config.model.l2_prior for p in record["prior"].values() for tau in p.values())
    assert "raise training.epochs" in record["warnings"][0]
    # One epoch: its mean training loss (the first steps' included) is still near the base
    # rate's, so early stopping has not judged the run yet, and the warning says that.
    assert "warning: the epoch cap ended the run before early stopping could judge it" in err
    state = load_run(str(run_dir)).info
    assert state["converged"] is False
    # state.json says whether early stopping ended the run: here the epoch cap did.
    assert json.loads((run_dir / "state.json").read_text())["early_stopped"] is False


def test_early_stop_is_converged_and_state_agrees(small_synth, early_stopped_run):
    synth_dir, _ = small_synth
    run_dir, record = early_stopped_run
    with open(os.path.join(run_dir, "state.json")) as f:
        state = json.load(f)
    assert len(record["history"]) < 8 and record["converged"] and not record["warnings"]
    assert state["early_stopped"] is True and "finished" not in state
    assert state["best_epoch"] == record["best_epoch"] == state["early_stopping"]["best_epoch"]
    # The empirical Bayes prior (EM + validation line search) re-estimated every precision.
    l2_prior = _config(synth_dir).model.l2_prior
    assert all(0 < tau < 1e6 and tau != l2_prior
               for p in record["prior"].values() for tau in p.values())



def _old_layout_checkpoint(path):
    """A checkpoint as fm-keras wrote it before the per-id table: fm/linear, fm/embeddings."""
    import tensorflow as tf

    old = tf.train.Checkpoint(linear=tf.Variable(tf.zeros([4])),
                              embeddings=tf.Variable(tf.zeros([4, 2])))
    return tf.train.Checkpoint(fm=old).write(path)


def test_old_table_layout_checkpoints_fail_resume_in_one_line(small_synth, tmp_path):
    """Their optimizer slots cannot be read; their weights can (warm start, evaluate:
    tests/test_weights.py::test_read_weights_converts_the_two_table_layout)."""
    synth_dir, _ = small_synth
    run_dir = tmp_path / "run"
    _old_layout_checkpoint(str(run_dir / "checkpoints" / "last" / "ckpt-1"))
    (run_dir / "checkpoints" / "last" / "checkpoint").write_text(
        'model_checkpoint_path: "ckpt-1"\n')
    with pytest.raises(RunError, match=r"fm/linear, fm/embeddings: .*train a new run without "
                                       r"--resume$"):
        train(_config(synth_dir), str(run_dir), resume=True, verbose=0)


def test_trained_rows_cover_every_row_an_epoch_changes(small_synth, tmp_path, monkeypatch):
    """FTRL zeroes a row looked up with x = 0 (multi-hot padding) and weight decay shrinks
    it: those ids are trained rows too, not only the counted ones."""
    synth_dir, _ = small_synth
    seen = record_trained_rows(monkeypatch, training)
    train(_config(synth_dir, epochs=1, optimizer="ftrl", weight_decay=0.01),
          str(tmp_path / "run"), verbose=0)
    trained = seen["trained"]
    changed = changed_rows(*seen["epochs"], len(trained))
    assert seen["state"].best_weights.rows is not None  # the copy was partial
    assert changed.any() and not trained.all()
    assert not np.any(changed & ~trained)
    assert np.any(changed & ~(seen["counts"] > 0))  # the x = 0 ids count


def test_sampled_negatives_restore_the_best_epoch_from_a_partial_copy(tmp_path, monkeypatch):
    """Negatives drawn from the catalog train its items that no training row holds; the
    best epoch's weights come back exactly from the copy of the trained rows."""
    from retrieval_testlib import implicit_experiment, write_implicit

    from fm_keras.config import experiment_from_dict

    data = write_implicit(str(tmp_path / "data"))
    with_new_catalog_items(data)
    seen = record_trained_rows(monkeypatch, training)
    raw = implicit_experiment(data, task="binary", epochs=5, early_stopping_patience=2,
                              learning_rate=0.2, negatives={"per_positive": 2})
    record = train(experiment_from_dict(raw, base_dir=data), str(tmp_path / "run"), verbose=0)
    trained = seen["trained"]
    changed = changed_rows(seen["epochs"][0], seen["epochs"][1], len(trained))
    assert seen["state"].best_weights.rows is not None
    assert not np.any(changed & ~trained)
    assert np.any(changed & ~(seen["counts"] > 0))  # catalog items no training row holds
    final = [v.numpy() for v in load_run(str(tmp_path / "run")).model.fm.trainable_weights]
    assert record["best_epoch"] < len(seen["epochs"]) - 1  # a later epoch was undone
    for got, want in zip(final, seen["epochs"][record["best_epoch"]]):
        np.testing.assert_array_equal(got, want)


def test_compiled_steps_train_the_same_run_as_keras_steps(small_synth, tmp_path):
    synth_dir, _ = small_synth
    runs = {mode: train(_config(synth_dir, learning_rate=0.02, compiled_steps=mode),
                        str(tmp_path / mode), verbose=0)
            for mode in ("always", "never")}
    assert runs["always"]["compiled_steps"]["enabled"]
    assert runs["always"]["compiled_steps"]["reason"].startswith("8 steps per XLA call, at most")
    assert runs["never"]["compiled_steps"] == {"enabled": False,
                                               "reason": "training.compiled_steps: never"}
    for a, b in zip(runs["always"]["history"], runs["never"]["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["val_auc"] == pytest.approx(b["val_auc"], abs=1e-4)
    assert runs["always"]["metrics"]["test"]["auc"] == pytest.approx(
        runs["never"]["metrics"]["test"]["auc"], abs=1e-4)
