"""Progress within a training epoch, for logs: Keras' ``verbose=2`` prints a line per epoch
only, so a long epoch written to a log file (a batch job, a pipeline) was silence."""

from __future__ import annotations

import sys
import time

from fm_keras._tf import keras
from fm_keras.progress import log


class StepProgress(keras.callbacks.Callback):
    """Logs ``epoch E: step S/N (R samples/s)`` at most every `interval` seconds of an epoch
    (the first after `interval`; with ``steps_per_execution`` the step is that of the last
    call, so lines come at most once per call).

    Args:
        batch_size: rows per step, for samples/s.
        interval: seconds between lines (30, as the out-of-core passes and `fm-keras score`).
    """

    def __init__(self, batch_size: int, interval: float = 30.0):
        super().__init__()
        self.batch_size, self.interval = batch_size, interval
        self.epoch, self.started, self._last = 0, 0.0, 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self.started = self._last = time.monotonic()

    def on_train_batch_end(self, batch, logs=None):
        now = time.monotonic()
        if now - self._last < self.interval:
            return
        self._last = now
        steps = (self.params or {}).get("steps")
        log(f"epoch {self.epoch + 1}: step {batch + 1:,}" + (f"/{steps:,}" if steps else "")
            + f" ({(batch + 1) * self.batch_size / max(now - self.started, 1e-9):,.0f} "
              "samples/s)")


def fit_verbosity(verbose: int | None) -> int:
    """Keras' `verbose` for `fit`: as given, else the bar (1) on a terminal and a line per
    epoch (2) in a log file or pipe."""
    return (1 if sys.stderr.isatty() else 2) if verbose is None else verbose


def fit_progress(verbose: int, batch_size: int) -> list[keras.callbacks.Callback]:
    """The callbacks that add progress within epochs to Keras' `verbose` mode: `StepProgress`
    for ``verbose=2`` (a line per epoch, as in a log file); none for the bar (1) or silence
    (0)."""
    return [StepProgress(batch_size)] if verbose == 2 else []
