"""Epoch-end work that stays small next to an epoch when the tables hold millions of ids.

A training run checks its parameters and writes two checkpoints every epoch (`TrainingState`
in `fm_keras.training`). Done naively both cost O(table): at 5M ids and k = 10 the Adam state
is ~660 MB, and a synchronous write of it took seconds, more than the epoch's steps. Here:

- `parameters_finite` checks every element of small variables, and a fixed random sample of
  rows of large tables. A row only changes on a step that touches it, and a non-finite row
  makes the loss of the next batch that reads it non-finite (checked every step) and the
  validation metric non-finite; the full check runs once, on the final weights.
- `CheckpointWriter` writes asynchronously when the tables are large: the save copies the
  variables in memory and returns, the files are written by a background thread while the
  next epoch trains (`tf.train.CheckpointOptions(experimental_enable_async_checkpoint=True)`);
  `sync` waits for it. Small tables keep synchronous writes.
- The best-epoch checkpoint holds only the model weights (what `restore_best` reads), not
  the optimizer slots: a third of the bytes with Adam.
"""

from __future__ import annotations

from collections.abc import Sequence

from fm_keras._tf import tf

# Above this many elements in one variable (4M floats: ~400k ids at k = 10), checks are
# sampled and checkpoints are written asynchronously.
LARGE_VARIABLE_ELEMENTS = 1 << 22
SAMPLED_ROWS = 4096


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
