"""CompiledSteps: the same training as Keras' step (padded batches, short executions, duplicate
ids, penalties, weights), when it applies, how `training.compiled_steps` chooses, and that its
scratch state stays out of checkpoints."""

import numpy as np
import pytest

from fm_keras._tf import keras, tf
from fm_keras.batches import batched_dataset
from fm_keras.compiled_steps import (AUTO_MIN_BATCH, AUTO_MIN_STEPS, CompiledSteps, choose,
                                     execution_steps, unsupported)
from fm_keras.config import FeatureConfig, ModelConfig, TrainingConfig
from fm_keras.data import Split
from fm_keras.errors import ConfigError
from fm_keras.features import fit_features
from fm_keras.model import build_model, make_optimizer

CONFIGS = [FeatureConfig("user", "categorical", "user"),
           FeatureConfig("item", "categorical", "item"),
           FeatureConfig("tags", "multi_hot", "item", max_len=3),
           FeatureConfig("price", "numeric", "item")]


def _columns(rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    # Few users and items: every batch repeats ids (the duplicate summing is exercised).
    tags = ["|".join(f"t{t}" for t in rng.choice(6, rng.integers(0, 4), replace=False))
            for _ in range(rows)]
    return {"user": rng.integers(0, 9, rows).astype(str).astype(object),
            "item": rng.integers(0, 5, rows).astype(str).astype(object),
            "tags": np.array(tags, object),
            "price": rng.gamma(2.0, 3.0, rows).astype(np.float32)}, \
        (rng.random(rows) < 0.3).astype(np.float32)


def _trained(compiled: bool, optimizer: str, rows: int = 203, batch: int = 16,
             steps_per_execution: int = 5, epochs: int = 2, model_config=None,
             weighted: bool = True):
    """A model trained `epochs` epochs on `rows` rows (the last batch short: 203 = 12 x 16 + 11;
    13 batches per epoch: the last execution of an epoch is cut to 3 steps). Not `weighted`:
    batches ``(x, y)``, no weights."""
    columns, labels = _columns(rows)
    features = fit_features(CONFIGS, Split(columns, labels, rows))
    training = TrainingConfig(optimizer=optimizer, learning_rate=0.05, batch_size=batch,
                              weight_decay=0.01)
    keras.utils.set_random_seed(3)
    model = build_model(features, model_config or ModelConfig(
        l2_embeddings=0.01, l2_linear=0.002, init_stddev=0.1), training)
    model.compile(optimizer=make_optimizer(training), weighted_metrics=[],
                  steps_per_execution=steps_per_execution)
    assert model.use_compiled_steps(batch if compiled else None) == (
        None if compiled else "its batches vary in size (sampled negatives)")
    ids, values = model.encoder.encode_numpy(columns)
    weights = np.where(labels > 0, 2.5, 1.0).astype(np.float32)
    data = batched_dataset(ids, values, labels, weights, batch, shuffle_seed=1)
    if not weighted:
        data = data.map(lambda x, y, w: (x, y))
    history = model.fit(data, epochs=epochs, verbose=0).history
    return model, history


@pytest.mark.parametrize("optimizer", ["adam", "adagrad", "ftrl"])
def test_equals_keras_step(optimizer):
    ours, ours_history = _trained(True, optimizer)
    keras_model, keras_history = _trained(False, optimizer)
    assert ours.uses_compiled_steps and not keras_model.uses_compiled_steps
    np.testing.assert_allclose(ours.fm.table.numpy(), keras_model.fm.table.numpy(), atol=2e-6)
    np.testing.assert_allclose(ours.fm.bias.numpy(), keras_model.fm.bias.numpy(), atol=2e-6)
    for a, b in zip(ours.optimizer.variables, keras_model.optimizer.variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=2e-6)
    assert int(ours.optimizer.iterations) == int(keras_model.optimizer.iterations) == 26
    assert int(ours._train_counter) == int(keras_model._train_counter)
    for key in ("loss", "regularization_loss", "total_loss"):
        np.testing.assert_allclose(ours_history[key], keras_history[key], rtol=1e-5)


def test_equals_keras_step_on_batches_without_weights():
    # (x, y) batches (issue 19.2): the padding rows of a short batch must still weigh 0.
    ours, ours_history = _trained(True, "adagrad", weighted=False, epochs=1)
    theirs, theirs_history = _trained(False, "adagrad", weighted=False, epochs=1)
    np.testing.assert_allclose(ours.fm.table.numpy(), theirs.fm.table.numpy(), atol=2e-6)
    np.testing.assert_allclose(ours.fm.bias.numpy(), theirs.fm.bias.numpy(), atol=2e-6)
    np.testing.assert_allclose(ours_history["loss"], theirs_history["loss"], rtol=1e-5)


def test_equals_keras_step_with_the_empirical_prior():
    config = ModelConfig(l2_prior=2.0, init_stddev=0.1)
    ours, _ = _trained(True, "adam", model_config=config, epochs=1)
    theirs, _ = _trained(False, "adam", model_config=config, epochs=1)
    np.testing.assert_allclose(ours.fm.table.numpy(), theirs.fm.table.numpy(), atol=2e-6)


def test_a_short_execution_reuses_the_compiled_loop():
    # The step count is an input of the XLA computation, not a constant of it: an epoch's
    # short last execution (3 of 5 steps here) ran a second compilation, ~1.1 s per run.
    model, _ = _trained(True, "adam", epochs=1)
    loop, steps = model.train_function._loop, model.train_function.max_steps
    columns, labels = _columns(16)
    ids, values = model.encoder.encode_numpy(columns)
    batch = next(iter(batched_dataset(ids, values, labels, np.ones(16, np.float32), 16)))
    stacked = tf.nest.map_structure(lambda t: tf.stack([t] * steps), batch)
    rows = tf.fill([steps], 16)
    hlo = [loop.experimental_get_compiler_ir(stacked, rows, tf.constant(n))(stage="hlo")
           for n in (steps, 3)]
    assert hlo[0] == hlo[1]


def test_a_batch_larger_than_batch_rows_is_an_error():
    columns, labels = _columns(64)
    features = fit_features(CONFIGS, Split(columns, labels, 64))
    model = build_model(features, ModelConfig())
    model.compile(optimizer=make_optimizer(TrainingConfig()), steps_per_execution=2)
    model.use_compiled_steps(8)
    ids, values = model.encoder.encode_numpy(columns)
    ds = batched_dataset(ids, values, labels, np.ones(64, np.float32), 16)
    with pytest.raises(tf.errors.InvalidArgumentError, match="more rows than"):
        model.fit(ds, epochs=1, verbose=0)


def _compiled_model(optimizer="adam", **compile_kwargs):
    columns, labels = _columns(32)
    features = fit_features(CONFIGS, Split(columns, labels, 32))
    model = build_model(features, ModelConfig())
    model.compile(optimizer=make_optimizer(TrainingConfig(optimizer=optimizer)), **compile_kwargs)
    return model


def test_unsupported_says_why():
    assert unsupported(_compiled_model(), 16) is None
    assert unsupported(_compiled_model(), None) == "its batches vary in size (sampled negatives)"
    assert "SGD is not row-wise" in unsupported(_compiled_model("sgd"), 16)
    assert unsupported(_compiled_model(run_eagerly=True), 16) == "the model runs eagerly"


def test_choose_by_mode_run_length_and_batch_size():
    model = _compiled_model()
    long_run = AUTO_MIN_STEPS * 256  # rows: one step per 256 rows in one epoch
    training = TrainingConfig(batch_size=256, epochs=1)
    assert choose(model, training, long_run, fixed_batches=True) == \
        "32 steps per XLA call, at most 1,000 in the run"
    assert model.uses_compiled_steps
    assert "fewer than the 1,000" in choose(model, training, long_run - 256, fixed_batches=True)
    assert not model.uses_compiled_steps
    small = TrainingConfig(batch_size=AUTO_MIN_BATCH - 1, epochs=1)
    assert choose(model, small, 10 ** 6, fixed_batches=True) == \
        "batches of 255 rows, fewer than the 256 where a compiled step saves time"
    assert not model.uses_compiled_steps
    always = TrainingConfig(batch_size=64, epochs=3, compiled_steps="always")
    assert choose(model, always, 64, fixed_batches=True) == \
        "1 step per XLA call, at most 3 in the run"
    with pytest.raises(ConfigError, match="compiled_steps: always: cannot apply: its batches "
                                          "vary in size"):
        choose(model, always, 64, fixed_batches=False)
    never = TrainingConfig(compiled_steps="never")
    assert choose(model, never, long_run, fixed_batches=True) == "training.compiled_steps: never"
    assert not model.uses_compiled_steps
    with pytest.raises(ConfigError, match="compiled_steps"):
        TrainingConfig(compiled_steps="on")


def test_a_call_stacks_at_most_one_epoch_of_batches():
    # A new user's trial: steps_per_execution 10,000 at batch 4,096 stacked 10,000 batches
    # (4.9 GB) for 17-batch epochs.
    training = TrainingConfig(batch_size=4096, steps_per_execution=10_000)
    assert execution_steps(training, 67_967) == 17
    assert execution_steps(TrainingConfig(batch_size=100), 10 ** 6) == 32
    assert execution_steps(TrainingConfig(batch_size=100), 0) == 1


def test_scratch_state_is_not_checkpointed(tmp_path):
    model, _ = _trained(True, "adam", epochs=1)
    assert isinstance(model.train_function, CompiledSteps)
    names = {v.name for v in model.variables}
    assert len(model.variables) == len(names)
    path = tf.train.Checkpoint(fm=model.fm, optimizer=model.optimizer).write(
        str(tmp_path / "ckpt"))
    stored = [n for n, _ in tf.train.list_variables(path)]
    assert not [n for n in stored if "position" in n.lower()]
    # The positions table has one int32 per id and is outside the model's variables.
    scratch = list(model.train_function._positions.values())
    assert [v.shape.as_list() for v in scratch] == [[model.fm.num_ids]]
    assert not any(v is s for v in model.variables for s in scratch)


@pytest.mark.parametrize("training, against", [
    ({"optimizer": "sgd"}, "training: optimizer: sgd"),
    ({"negatives": {"per_positive": 2}}, "training: negatives: per_positive"),
    ({"distribute": {"strategy": "multi_worker_mirrored"}}, "training: distribute: strategy"),
])
def test_always_where_it_cannot_apply_is_a_config_error(training, against):
    from fm_keras.config import DistributeConfig, NegativesConfig

    kinds = {"negatives": NegativesConfig, "distribute": DistributeConfig}
    kwargs = {k: kinds[k](**v) if k in kinds else v for k, v in training.items()}
    with pytest.raises(ConfigError, match=f"compiled_steps: always cannot apply with {against}"):
        TrainingConfig(compiled_steps="always", **kwargs)
    TrainingConfig(compiled_steps="auto", **kwargs)  # auto falls back to Keras' step
