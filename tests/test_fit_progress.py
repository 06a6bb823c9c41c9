"""fit_progress: lines within a training epoch when Keras prints one line per epoch."""

import numpy as np

from fm_keras import fit_progress
from fm_keras._tf import keras
from fm_keras.fit_progress import StepProgress


def test_a_line_at_most_every_interval_within_an_epoch(capsys, monkeypatch):
    clock = iter([0.0, 10.0, 31.0, 40.0, 70.0, 100.0, 101.0])
    monkeypatch.setattr(fit_progress.time, "monotonic", lambda: next(clock))
    progress = StepProgress(batch_size=1000)
    progress.set_params({"steps": 500, "epochs": 2})
    progress.on_epoch_begin(1)              # t = 0
    for batch in (31, 63, 95, 127):         # t = 10, 31, 40, 70
        progress.on_train_batch_end(batch)
    progress.on_epoch_begin(2)              # t = 100: a new epoch restarts the clock
    progress.on_train_batch_end(31)         # t = 101
    assert capsys.readouterr().err.splitlines() == [
        "fm-keras: epoch 2: step 64/500 (2,065 samples/s)",      # 64,000 rows in 31 s
        "fm-keras: epoch 2: step 128/500 (1,829 samples/s)"]     # 128,000 rows in 70 s


def test_verbosity_by_terminal_unless_given(monkeypatch):
    for tty, default in ((True, 1), (False, 2)):
        monkeypatch.setattr(fit_progress.sys.stderr, "isatty", lambda tty=tty: tty)
        assert fit_progress.fit_verbosity(None) == default
        assert fit_progress.fit_verbosity(0) == 0


def test_only_the_line_per_epoch_mode_gets_it():
    assert [type(c) for c in fit_progress.fit_progress(2, 1024)] == [StepProgress]
    assert fit_progress.fit_progress(1, 1024) == fit_progress.fit_progress(0, 1024) == []


def test_runs_inside_keras_fit(capsys):
    model = keras.Sequential([keras.layers.Dense(1)])
    model.compile("sgd", "mse", steps_per_execution=4)
    x = np.zeros((64, 2), np.float32)
    model.fit(x, x[:, :1], batch_size=8, epochs=1, verbose=0,
              callbacks=[StepProgress(batch_size=8, interval=0.0)])
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("fm-keras: epoch 1: step 4/8 (") and len(lines) == 2
