"""In-memory batches: every row once per epoch, a new permutation every epoch, reproducible."""

import numpy as np

from fm_keras.batches import batched_dataset


def test_shuffle_is_a_new_permutation_every_epoch():
    """Regression: a seeded tf.random.shuffle inside map repeated one order every epoch."""
    n = 50
    ds = batched_dataset(np.arange(n, dtype=np.int32)[:, None], np.ones((n, 1), np.float32),
                         np.zeros(n, np.float32), np.ones(n, np.float32), 20, shuffle_seed=42)
    epochs = [np.concatenate([f["ids"].numpy().ravel() for f, _, _ in ds]) for _ in range(3)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(n))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    again = batched_dataset(np.arange(n, dtype=np.int32)[:, None], np.ones((n, 1), np.float32),
                            np.zeros(n, np.float32), np.ones(n, np.float32), 20, shuffle_seed=42)
    np.testing.assert_array_equal(
        np.concatenate([f["ids"].numpy().ravel() for f, _, _ in again]), epochs[0])


def test_training_batches_run_without_the_tf_data_autotuner():
    # With it, `fit` sometimes waited 0.3-0.6 s for the autotuner when deleting its iterator.
    n = 10
    ds = batched_dataset(np.arange(n, dtype=np.int32)[:, None], np.ones((n, 1), np.float32),
                         np.zeros(n, np.float32), np.ones(n, np.float32), 4, shuffle_seed=1)
    assert ds.options().autotune.enabled is False
    assert [len(y) for _, y, _ in ds] == [4, 4, 2]
