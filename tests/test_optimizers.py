"""Row-wise optimizers: NumPy references on touched rows, untouched rows unchanged, dense path
equal to tf_keras, weight decay, tf.distribute, checkpoints, the FM's gradients stay sparse."""

import numpy as np
import pytest

from fm_keras._tf import keras, tf
from fm_keras.config import FeatureConfig, ModelConfig, TrainingConfig
from fm_keras.data import Split
from fm_keras.features import fit_features
from fm_keras.model import build_model, make_optimizer
from fm_keras.optimizers import LazyAdam, SparseAdagrad, SparseFtrl

ROWS, K = 7, 3
# Step 1 touches rows 1, 4 (row 1 twice: the gradient rows are summed); step 2 rows 4, 6.
STEPS = [([1, 4, 1], [[0.5, -1.0, 2.0], [0.1, 0.2, -0.3], [1.0, 0.0, -1.0]], 0.7),
         ([6, 4], [[-2.0, 0.5, 0.25], [0.3, -0.6, 0.9]], -0.2)]


def _summed(indices, values):
    dense = np.zeros((ROWS, K))
    np.add.at(dense, indices, np.asarray(values))
    return sorted(set(indices)), dense


def _ref_adam(table, bias, lr, b1=0.9, b2=0.999, eps=1e-7, wd=0.0):
    m, v = np.zeros_like(table), np.zeros_like(table)
    mb = vb = 0.0
    for t, (indices, values, gb) in enumerate(STEPS, start=1):
        rows, g = _summed(indices, values)
        alpha = lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        table[rows] *= 1 - lr * wd
        m[rows] = b1 * m[rows] + (1 - b1) * g[rows]
        v[rows] = b2 * v[rows] + (1 - b2) * g[rows] ** 2
        table[rows] -= alpha * m[rows] / (np.sqrt(v[rows]) + eps)
        bias *= 1 - lr * wd
        mb, vb = mb + (gb - mb) * (1 - b1), vb + (gb ** 2 - vb) * (1 - b2)
        bias -= alpha * mb / (np.sqrt(vb) + eps)
    return table, bias


def _ref_adagrad(table, bias, lr, init=0.1, eps=1e-7, wd=0.0):
    acc, accb = np.full_like(table, init), init
    for indices, values, gb in STEPS:
        rows, g = _summed(indices, values)
        table[rows] *= 1 - lr * wd
        acc[rows] += g[rows] ** 2
        table[rows] -= lr * g[rows] / np.sqrt(acc[rows] + eps)
        bias *= 1 - lr * wd
        accb += gb ** 2
        bias -= lr * gb / np.sqrt(accb + eps)
    return table, bias


def _ftrl_coordinate(w, n, z, g, lr, power, l1, l2, shrink):
    n_new = n + g ** 2
    z = z + g + 2 * shrink * w - (n_new ** power - n ** power) / lr * w
    w = (np.clip(z, -l1, l1) - z) / (n_new ** power / lr + 2 * l2)
    return w, n_new, z


def _ref_ftrl(table, bias, lr, l1=0.01, l2=0.02, shrink=0.03, init=0.1, power=0.5):
    n, z = np.full_like(table, init), np.zeros_like(table)
    nb, zb = init, 0.0
    for indices, values, gb in STEPS:
        rows, g = _summed(indices, values)
        table[rows], n[rows], z[rows] = _ftrl_coordinate(
            table[rows], n[rows], z[rows], g[rows], lr, power, l1, l2, shrink)
        bias, nb, zb = _ftrl_coordinate(bias, nb, zb, gb, lr, power, l1, l2, shrink)
    return table, bias


CASES = {
    "lazy_adam": (lambda: LazyAdam(0.05), lambda t, b: _ref_adam(t, b, 0.05)),
    "lazy_adam_wd": (lambda: LazyAdam(0.05, weight_decay=0.5),
                     lambda t, b: _ref_adam(t, b, 0.05, wd=0.5)),
    "adagrad": (lambda: SparseAdagrad(0.1), lambda t, b: _ref_adagrad(t, b, 0.1)),
    "adagrad_wd": (lambda: SparseAdagrad(0.1, weight_decay=0.3),
                   lambda t, b: _ref_adagrad(t, b, 0.1, wd=0.3)),
    "ftrl": (lambda: SparseFtrl(0.2, l1_regularization_strength=0.01,
                                l2_regularization_strength=0.02,
                                l2_shrinkage_regularization_strength=0.03),
             lambda t, b: _ref_ftrl(t, b, 0.2)),
}


def _variables(seed=0):
    rng = np.random.default_rng(seed)
    table0, bias0 = rng.normal(size=(ROWS, K)), 0.4
    return (table0, bias0, tf.Variable(table0.astype(np.float32)),
            tf.Variable(np.float32(bias0)))


def _apply_steps(optimizer, table, bias):
    for indices, values, gb in STEPS:
        sparse = tf.IndexedSlices(tf.constant(values, tf.float32), tf.constant(indices),
                                  tf.constant([ROWS, K]))
        optimizer.apply_gradients([(sparse, table), (tf.constant(gb, tf.float32), bias)])


@pytest.mark.parametrize("case", sorted(CASES))
def test_sparse_steps_match_numpy_reference(case):
    make, reference = CASES[case]
    table0, bias0, table, bias = _variables()
    _apply_steps(make(), table, bias)
    want_table, want_bias = reference(table0.copy(), bias0)
    np.testing.assert_allclose(table.numpy(), want_table, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bias.numpy(), want_bias, rtol=1e-5, atol=1e-6)
    untouched = [r for r in range(ROWS) if r not in (1, 4, 6)]
    np.testing.assert_array_equal(table.numpy()[untouched], table0.astype(np.float32)[untouched])


@pytest.mark.parametrize("case", sorted(CASES))
def test_sparse_step_writes_rows_with_one_scatter_update_per_table(case):
    # scatter_sub/scatter_add apply an elementwise expression row by row and cost 6-11x a
    # scatter_update of the new rows on a 5M-row table, and every gather or scatter of a table
    # costs its cache misses: the variable and its state slot (all of the optimizer's states
    # side by side) are each read by one gather and written by one ResourceScatterUpdate.
    make, _ = CASES[case]
    _, _, table, bias = _variables()
    optimizer = make()
    optimizer.build([table, bias])
    sparse = tf.IndexedSlices(tf.constant(STEPS[0][1], tf.float32), tf.constant(STEPS[0][0]),
                              tf.constant([ROWS, K]))
    graph = tf.function(lambda: optimizer.apply_gradients([(sparse, table)])
                        ).get_concrete_function().graph
    ops = [op.type for op in graph.get_operations()]
    assert not [op for op in ops if op.startswith("ResourceScatter") and
                op != "ResourceScatterUpdate"]
    assert ops.count("ResourceScatterUpdate") == 2 and ops.count("ResourceGather") == 2


def test_lazy_adam_leaves_untouched_moments_alone():
    _, _, table, bias = _variables()
    optimizer = LazyAdam(0.05)
    _apply_steps(optimizer, table, bias)
    states = optimizer.states(table)
    for m in (states["m"].numpy(), states["v"].numpy()):
        assert np.all(m[[0, 2, 3, 5]] == 0) and np.all(m[[1, 4, 6]] != 0)


@pytest.mark.parametrize("ours, theirs", [
    (lambda: LazyAdam(0.05), lambda: keras.optimizers.Adam(0.05)),
    (lambda: SparseAdagrad(0.1), lambda: keras.optimizers.Adagrad(0.1)),
    (lambda: SparseFtrl(0.2, l1_regularization_strength=0.01),
     lambda: keras.optimizers.Ftrl(0.2, l1_regularization_strength=0.01)),
])
def test_dense_gradients_follow_tf_keras(ours, theirs):
    grads = [tf.constant(np.random.default_rng(s).normal(size=(ROWS, K)), tf.float32)
             for s in range(2)]
    results = []
    for make in (ours, theirs):
        table = tf.Variable(_variables()[0].astype(np.float32))
        optimizer = make()
        for g in grads:
            optimizer.apply_gradients([(g, table)])
        results.append(table.numpy())
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6, atol=1e-7)



def _ftrl_tables(init, **kwargs):
    """`STEPS` run by SparseFtrl (sparse gradients) and by tf_keras' Ftrl (the same gradients,
    dense with zero rows): the two final tables."""
    results = []
    for make, sparse in ((SparseFtrl, True), (keras.optimizers.Ftrl, False)):
        table, optimizer = tf.Variable(init.astype(np.float32)), make(0.2, **kwargs)
        for indices, values, _ in STEPS:
            if sparse:
                gradient = tf.IndexedSlices(tf.constant(values, tf.float32),
                                            tf.constant(indices), tf.constant([ROWS, K]))
            else:
                gradient = tf.constant(_summed(indices, values)[1], tf.float32)
            optimizer.apply_gradients([(gradient, table)])
        results.append(table.numpy())
    return results


def test_sparse_ftrl_equals_dense_ftrl_only_from_zero_initial_values():
    # Pins the relation SparseFtrl's docstring states (the docstring once claimed equality
    # up to "a row keeps its initial value until first touched", which is wrong for good).
    sparse, dense = _ftrl_tables(np.zeros((ROWS, K)), l1_regularization_strength=0.01)
    np.testing.assert_allclose(sparse, dense, rtol=1e-6, atol=1e-7)
    init = _variables()[0]
    sparse, dense = _ftrl_tables(init, l1_regularization_strength=0.01)
    np.testing.assert_allclose(sparse[[1, 4]], dense[[1, 4]], rtol=1e-6, atol=1e-7)  # step 1's
    assert np.abs(sparse[6] - dense[6]).min() > 1e-3      # first touched at step 2: differs
    untouched = [0, 2, 3, 5]                              # dense: the proximal solution of z = 0
    np.testing.assert_array_equal(dense[untouched], 0.0)
    np.testing.assert_array_equal(sparse[untouched], init.astype(np.float32)[untouched])
    # l2 shrinkage moves dense FTRL's z on steps that miss a row: row 1 (missed at step 2).
    sparse, dense = _ftrl_tables(np.zeros((ROWS, K)), l2_shrinkage_regularization_strength=0.1)
    np.testing.assert_allclose(sparse[[4, 6]], dense[[4, 6]], rtol=1e-6, atol=1e-7)
    assert np.abs(sparse[1] - dense[1]).max() > 1e-4

def test_sparse_adagrad_equals_tf_keras_sparse_path():
    results = []
    for make in (lambda: SparseAdagrad(0.1), lambda: keras.optimizers.Adagrad(0.1)):
        _, _, table, bias = _variables()
        _apply_steps(make(), table, bias)
        results.append(table.numpy())
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6)


def test_lazy_adam_rejects_amsgrad():
    with pytest.raises(ValueError, match="amsgrad"):
        LazyAdam(amsgrad=True)


@pytest.mark.parametrize("cls", [LazyAdam, SparseAdagrad, SparseFtrl])
def test_config_round_trip(cls):
    optimizer = cls(0.03, weight_decay=0.1)
    again = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(again) is cls
    assert again.get_config() == optimizer.get_config()


# ---------------------------------------------------------------------------------------------
# Inside the FM model

CONFIGS = [FeatureConfig("user", "categorical", "user"),
           FeatureConfig("tags", "multi_hot", "item", max_len=2)]
COLUMNS = {"user": np.array(["a", "b", "c", "a"], object),
           "tags": np.array(["x|y", "y", "", "z"], object)}
LABELS = np.array([1.0, 0.0, 1.0, 0.0], np.float32)


def _fm_model(optimizer="adam", strategy=None):
    features = fit_features(CONFIGS, Split(dict(COLUMNS), None, 4))
    training = TrainingConfig(optimizer=optimizer, learning_rate=0.05)
    with (strategy.scope() if strategy else _null()):
        model = build_model(features, ModelConfig(l2_embeddings=0.1, l2_linear=0.1,
                                                  init_stddev=0.3), training)
        model.compile(optimizer=make_optimizer(training), weighted_metrics=[])
    return model


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _batch(model, rows):
    ids, values = model.encoder({k: tf.constant(v[rows]) for k, v in COLUMNS.items()})
    return {"ids": ids, "values": values}, tf.constant(LABELS[rows]), tf.ones([len(rows)])


@pytest.mark.parametrize("name, cls", [("adam", LazyAdam), ("adagrad", SparseAdagrad),
                                       ("ftrl", SparseFtrl)])
def test_make_optimizer_gives_the_rowwise_classes(name, cls):
    assert type(make_optimizer(TrainingConfig(optimizer=name))) is cls


def test_fm_table_gradients_stay_sparse_with_l2():
    model = _fm_model()
    with tf.GradientTape() as tape:
        loss = model.compute_loss(_batch(model, [0, 1]), training=True) + tf.add_n(model.losses)
    grads = dict(zip([v.name for v in model.trainable_variables],
                     tape.gradient(loss, model.trainable_variables)))
    assert {n for n, g in grads.items() if isinstance(g, tf.IndexedSlices)} == {
        model.fm.table.name}
    assert not isinstance(grads[model.fm.bias.name], tf.IndexedSlices)


def _ids(model, rows):
    """(ids with x != 0, every id in the batch: padding slots have x = 0 and a zero gradient)."""
    ids, values = (t.numpy() for t in _batch(model, rows)[0].values())
    return sorted(set(ids[values != 0].tolist())), set(ids.ravel().tolist())


@pytest.mark.parametrize("optimizer", ["adam", "adagrad", "ftrl"])
def test_train_step_updates_only_touched_rows_under_mirrored_strategy(optimizer):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    model = _fm_model(optimizer, strategy)
    before = model.fm.table.numpy().copy(), float(model.fm.bias.numpy())
    data = tf.data.Dataset.from_tensors(_batch(model, [0, 1]))
    model.fit(data, epochs=2, verbose=0)
    touched, present = _ids(model, [0, 1])
    untouched = sorted(set(range(model.fm.num_ids)) - present)
    assert untouched
    after = model.fm.table.numpy()
    np.testing.assert_array_equal(after[untouched], before[0][untouched])
    assert np.all(np.any(after[touched] != before[0][touched], axis=1))
    assert float(model.fm.bias.numpy()) != before[1]


def test_checkpoint_saves_and_restores_slots(tmp_path):
    model = _fm_model("adam")
    model.fit(tf.data.Dataset.from_tensors(_batch(model, [0, 1, 3])), epochs=3, verbose=0)
    path = tf.train.Checkpoint(fm=model.fm, optimizer=model.optimizer).write(
        str(tmp_path / "ckpt"))
    again = _fm_model("adam")
    again.optimizer.build(again.trainable_variables)
    tf.train.Checkpoint(fm=again.fm, optimizer=again.optimizer).read(
        path).assert_existing_objects_matched()
    for a, b in zip(model.optimizer.variables, again.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert int(again.optimizer.iterations.numpy()) == 3
    # Resumed training takes the same step as the original would.
    batch = tf.data.Dataset.from_tensors(_batch(model, [2]))
    model.fit(batch, verbose=0)
    again.fit(batch, verbose=0)
    np.testing.assert_allclose(again.fm.embeddings.numpy(), model.fm.embeddings.numpy(),
                               rtol=1e-6)
