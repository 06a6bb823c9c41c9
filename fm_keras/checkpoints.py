"""Epoch-end work that stays small next to an epoch when the tables hold millions of ids.

A training run checks its parameters, keeps the best epoch's weights and checkpoints itself
(`TrainingState` in `fm_keras.runs`). Done naively each costs O(table) in I/O every
epoch: at 5M ids and k = 10 the Adam state is ~660 MB, and writing it took seconds, more than
the epoch's steps. Here:

- `parameters_finite` checks every element of small variables, and a fixed random sample of
  rows of large tables. A row only changes on a step that touches it, and a non-finite row
  makes the loss of the next batch that reads it non-finite (checked every step) and the
  validation metric non-finite; the full check runs once, on the final weights.
- `BestWeights` keeps the best epoch's weights as an in-memory copy (one memory copy of the
  model weights per improving epoch, no I/O; Keras' ``EarlyStopping(restore_best_weights)``
  keeps a NumPy copy the same way). The copy is part of the run's checkpoint, so a resumed
  run restores the best weights it had. Of a large id table it copies only the rows an epoch
  can change (`trained_rows`: the ids the training rows and the negative sampler hold; the
  row-wise optimizers, L2 and weight decay touch no other row), e.g. 27% of a 5M-id table
  trained on 200k rows.
- `checkpoint_due`: small tables are checkpointed every epoch; large ones every
  `LARGE_CHECKPOINT_SECONDS` of training (tf.estimator's ``save_checkpoints_secs`` default)
  and at the last epoch, so a checkpoint's cost is spread over many epochs. The checkpoint
  holds the run state (epoch, early stopping, history) too, so `--resume` continues from the
  epoch the checkpoint holds, whatever ``state.json`` says.
- `CheckpointWriter` writes asynchronously when the tables are large: the save copies the
  variables in memory and returns, the files are written by a background thread while the
  next epoch trains (`tf.train.CheckpointOptions(experimental_enable_async_checkpoint=True)`);
  `sync` waits for it. Small tables keep synchronous writes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np

from fm_keras._tf import tf, without_xla_notice

# Above this many elements in one variable (4M floats: ~400k ids at k = 10), checks are
# sampled and checkpoints are written asynchronously.
LARGE_VARIABLE_ELEMENTS = 1 << 22
SAMPLED_ROWS = 4096
# Large tables are checkpointed at most this often (seconds of training), and at the end.
LARGE_CHECKPOINT_SECONDS = 600.0
# BestWeights copies only the trained rows of a table with more elements than this, when they
# are at most this share of its rows (a gather of half the rows costs about a whole copy).
PARTIAL_COPY_MIN_ELEMENTS = LARGE_VARIABLE_ELEMENTS
PARTIAL_COPY_MAX_SHARE = 0.5


def is_large(variables: Sequence[tf.Variable]) -> bool:
    """True when one of `variables` has more than `LARGE_VARIABLE_ELEMENTS` elements."""
    return any(int(v.shape.num_elements()) > LARGE_VARIABLE_ELEMENTS for v in variables)


def parameters_finite(variables: Sequence[tf.Variable], sampled: bool = True,
                      seed: int = 0) -> bool:
    """Whether `variables` hold only finite values.

    Args:
        variables: model variables (tables [rows, ...] and small dense ones).
        sampled: check only `SAMPLED_ROWS` random rows of each variable larger than
            `LARGE_VARIABLE_ELEMENTS`, so the check costs O(1) in the table size; False
            checks every element (O(table)).
        seed: seed of the sampled rows (a different seed per epoch covers different rows).

    Returns:
        False if a checked element is NaN or infinite.
    """
    checks = []
    for v in variables:
        if sampled and int(v.shape.num_elements()) > LARGE_VARIABLE_ELEMENTS:
            rows = tf.random.stateless_uniform([SAMPLED_ROWS], [seed, 0], 0, int(v.shape[0]),
                                               dtype=tf.int64)
            checks.append(tf.reduce_all(tf.math.is_finite(tf.gather(v, rows))))
        else:
            checks.append(tf.reduce_all(tf.math.is_finite(v)))
    return bool(tf.reduce_all(checks))


class CheckpointWriter:
    """A `tf.train.CheckpointManager` keeping one checkpoint, saved synchronously or not.

    Args:
        checkpoint: what to save.
        directory: where the checkpoint files go.
        asynchronous: return from `save` once the variables are copied in memory and write
            the files on a background thread (costs one extra copy of the variables in RAM).
    """

    def __init__(self, checkpoint: tf.train.Checkpoint, directory: str, asynchronous: bool):
        self.checkpoint = checkpoint
        self.asynchronous = asynchronous
        self.manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=1)
        self.options = tf.train.CheckpointOptions(
            experimental_enable_async_checkpoint=asynchronous)

    @property
    def latest_checkpoint(self) -> str | None:
        """Path prefix of the newest checkpoint (wait with `sync` before reading it)."""
        return self.manager.latest_checkpoint

    def save(self) -> str:
        return self.manager.save(options=self.options)

    def sync(self) -> None:
        """Waits until an asynchronous save is on disk."""
        if self.asynchronous:
            self.checkpoint.sync()


def checkpoint_due(large: bool, last_epoch: bool, seconds_since_checkpoint: float,
                   every_seconds: float | None = None) -> bool:
    """Whether this epoch end writes the run's checkpoint.

    Args:
        large: the model has a large table (`is_large`).
        last_epoch: no epoch follows (the epoch cap, or early stopping).
        seconds_since_checkpoint: training time since the last checkpoint (or the start).
        every_seconds: the interval for large tables; default `LARGE_CHECKPOINT_SECONDS`.

    Returns:
        True for every epoch of a small model; for a large one at the last epoch and once
        `every_seconds` have passed.
    """
    every = LARGE_CHECKPOINT_SECONDS if every_seconds is None else every_seconds
    return not large or last_epoch or seconds_since_checkpoint >= every


def trained_rows(num_ids: int, *ids: np.ndarray, counts: np.ndarray | None = None
                 ) -> np.ndarray:
    """The rows of the id tables that training can change: a mask for `BestWeights`.

    An epoch passes over every training row, and fm_keras' optimizers (`fm_keras.optimizers`),
    the L2 penalties and their weight decay change only the rows a batch looks up: the ids in
    the training rows, plus those a negative sampler draws. A slot with x = 0 (padding, a
    zero-weight token) is looked up too: its gradient is 0, but FTRL's projection and weight
    decay still move the row, so those ids count.

    Args:
        num_ids: rows of the id tables.
        *ids: int id arrays of any shape: the training rows' ids (or with `counts` only those
            of slots with x = 0), catalog ids a sampler draws.
        counts: optional training rows per id [num_ids] over the slots with x != 0 (the
            `l2_prior` counts, reused rather than counted again): ids with a count are in.

    Returns:
        bool [num_ids]: True for every id in `ids` or with a count.
    """
    mask = np.zeros(num_ids, bool) if counts is None else np.asarray(counts) > 0
    for more in ids:
        mask[np.asarray(more).ravel()] = True
    return mask


def saved_trained_rows(path: str, num_ids: int, name: str = "best") -> np.ndarray | None:
    """The `trained` mask of the `BestWeights` saved under `name` in the checkpoint `path`.

    A resumed run builds its copy from it rather than from its data: the saved copy only fits
    the rows it was taken of (and a checkpoint without rows holds whole copies).

    Returns:
        bool [num_ids], or None when the saved copies are whole.
    """
    key = f"{name}/rows/.ATTRIBUTES/VARIABLE_VALUE"
    reader = tf.train.load_checkpoint(path)
    if not reader.has_tensor(key):
        return None
    mask = np.zeros(num_ids, bool)
    mask[reader.get_tensor(key)] = True
    return mask


class BestWeights:
    """An in-memory copy of the best epoch's weights, saved with the run's checkpoint.

    Args:
        variables: the model weights to copy (e.g. ``model.fm.trainable_weights``).
        trained: optional bool [num_ids], the rows of the id tables that training can change
            (`trained_rows`). Of a variable of shape [num_ids, ...] with more than
            `PARTIAL_COPY_MIN_ELEMENTS` elements only these rows are copied and restored
            (when they are at most `PARTIAL_COPY_MAX_SHARE` of the rows): exact as long as no
            other row changes between `save` and `restore`. None copies every variable whole.

    Raises:
        ValueError: `variables` is empty (a model not built yet).

    Attributes:
        trackable: the copies as a `tf.train.Checkpoint` node: give it to the run's checkpoint
            (``tf.train.Checkpoint(..., best=best.trackable)``) to save and restore them.
        rows: int64 variable [n], the rows the partial copies hold (saved with them, so a
            checkpoint restores into the rows it copied), or None (every copy whole).
        large: per variable, whether it has more than `PARTIAL_COPY_MIN_ELEMENTS` elements
            (then copied and restored by XLA, see `_copy`).

    The copies are non-trainable variables: one more copy of the weights (of the trained rows
    of large tables) in memory.
    """

    def __init__(self, variables: Sequence[tf.Variable], trained: np.ndarray | None = None):
        self.live = list(variables)
        if not self.live:
            raise ValueError("BestWeights got no variables: build the model before training "
                             "starts (call it once), then create the callback")
        self.rows, self.partial = None, [False] * len(self.live)
        if trained is not None and np.mean(trained) <= PARTIAL_COPY_MAX_SHARE:
            self.partial = [v.shape.rank >= 1 and v.shape[0] == len(trained)
                            and int(v.shape.num_elements()) > PARTIAL_COPY_MIN_ELEMENTS
                            for v in self.live]
            if any(self.partial):
                self.rows = tf.Variable(np.flatnonzero(trained).astype(np.int64),
                                        trainable=False)
        # Zeros, not the live values: a variable made from another's value shares its buffer
        # until the next update copies it (copy-on-write), one more copy inside a train step.
        n = None if self.rows is None else int(self.rows.shape[0])
        self.copies = [tf.Variable(tf.zeros([n, *v.shape[1:]] if part else v.shape, v.dtype),
                                   trainable=False)
                       for v, part in zip(self.live, self.partial)]
        self.large = [int(v.shape.num_elements()) > PARTIAL_COPY_MIN_ELEMENTS
                      for v in self.live]
        self._save_large = tf.function(lambda: self._copy(restore=False, large=True),
                                       jit_compile=True)
        self._restore_large = tf.function(lambda: self._copy(restore=True, large=True),
                                          jit_compile=True)
        with without_xla_notice() if any(self.large) else contextlib.nullcontext():
            self.save()  # once now, before training (a large table's first copy compiles)
        tracked = {f"w{i}": c for i, c in enumerate(self.copies)}
        if self.rows is not None:
            tracked["rows"] = self.rows
        self.trackable = tf.train.Checkpoint(**tracked)

    def save(self) -> None:
        """Copies the current weights in: O(weights copied) memory traffic."""
        self._copy(restore=False, large=False)
        if any(self.large):
            self._save_large()

    def restore(self) -> None:
        """Puts the copied weights back into the model (in place; a partial copy's rows with
        one ``scatter_update``)."""
        self._copy(restore=True, large=False)
        if any(self.large):
            self._restore_large()

    def _copy(self, restore: bool, large: bool) -> None:
        """Copies the variables whose `large` flag is `large` in (or, with `restore`, back).

        ``[...].assign`` writes into the destination's own buffer; ``copy.assign(live)``
        outside XLA would share the live buffer and move the copy into the next train step
        (copy-on-write). A partial copy is a gather of the rows, restored by a scatter.

        The large variables run compiled by XLA (`_save_large`, `_restore_large`): outside
        XLA a dense read of an id table copies it first (the sparse ops of training put the
        variable in TensorFlow's copy-on-read mode), and the strided assign of a whole copy is
        slow: 400-500 ms for a 5M x 11 table, 58-75 ms for a gather of 27% of its rows. XLA
        reads the buffer and writes into the copy's: 32-40 ms and 27-39 ms (BENCHMARKS.md,
        "Session 13").
        """
        for copy, live, part, big in zip(self.copies, self.live, self.partial, self.large):
            if big != large:
                continue
            if part and restore:
                live.scatter_update(tf.IndexedSlices(copy, self.rows))
            elif part:
                copy.assign(tf.gather(live, self.rows))
            elif restore:
                live[...].assign(copy)
            else:
                copy[...].assign(live)
