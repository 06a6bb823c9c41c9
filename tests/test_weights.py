"""Reading a run's FM weights: this layout, and the two-table layout of older runs."""

import numpy as np
import pytest

from fm_keras._tf import tf
from fm_keras.layers import FactorizationMachine
from fm_keras.weights import read_weights


@pytest.mark.parametrize("l2_prior", [0.0, 3.0])
def test_read_weights_converts_the_two_table_layout(tmp_path, l2_prior):
    """A run written before the per-id table kept bias, linear [ids], embeddings [ids, k] and
    the prior's two [ids] tables as the layer's variables (checkpoint keys fm/<name>)."""
    rng = np.random.default_rng(3)
    old = tf.Module()
    old.bias = tf.Variable(0.25)
    old.linear = tf.Variable(rng.normal(size=6).astype(np.float32))
    old.embeddings = tf.Variable(rng.normal(size=(6, 4)).astype(np.float32))
    if l2_prior:
        old.prior_embeddings = tf.Variable(rng.random(6).astype(np.float32))
        old.prior_linear = tf.Variable(rng.random(6).astype(np.float32))
    path = tf.train.Checkpoint(fm=old).write(str(tmp_path / "old" / "weights"))
    fm = FactorizationMachine(6, 4, l2_prior=l2_prior)
    fm.build([None, 3])
    read_weights(fm, path)
    np.testing.assert_array_equal(fm.bias.numpy(), 0.25)
    np.testing.assert_array_equal(fm.linear.numpy(), old.linear.numpy())
    np.testing.assert_array_equal(fm.embeddings.numpy(), old.embeddings.numpy())
    if l2_prior:
        np.testing.assert_array_equal(fm.prior.numpy(), np.stack(
            [old.prior_linear.numpy(), old.prior_embeddings.numpy()], axis=1))
    # and this layout reads back as itself
    again = FactorizationMachine(6, 4, l2_prior=l2_prior)
    again.build([None, 3])
    read_weights(again, tf.train.Checkpoint(fm=fm).write(str(tmp_path / "new" / "weights")))
    np.testing.assert_array_equal(again.table.numpy(), fm.table.numpy())
