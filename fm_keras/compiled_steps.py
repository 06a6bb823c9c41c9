"""Many FM training steps per XLA call: the train function `FMModel` gives Keras' `fit`.

Keras' `fit` runs ``steps_per_execution`` steps per graph call, but each step is still ~150
TensorFlow ops, or, with ``jit_compile``, one XLA call per step: about 1 ms of launch and
Keras work around a step whose arithmetic costs less (BENCHMARKS.md, "Many steps per XLA
call"). `CompiledSteps` instead pulls an execution's batches from the iterator, stacks them,
and runs all the steps in one XLA computation (a while loop over the stack).

What XLA needs, and how it is met:

- Static shapes. Batches are padded to ``batch_rows`` rows by repeating the batch's first row
  with x = 0 and weight 0: the padding touches no new table row and adds no gradient, and the
  loss and regularization are divided by the real row count, so a padded step equals the
  unpadded one. The stack is padded to ``steps_per_execution`` batches; a shorter execution
  (the end of an epoch) loops over its own count. One compilation per run.
- No `tf.unique`. The optimizer's base class sums the gradients of duplicate ids with it (a
  dynamic shape). Here every slot writes its position into a persistent int32 [ids] table at
  its id and reads back one representative per distinct id; gradients are summed per
  representative, and duplicate ids then compute and write the same new row. That is
  exact for the row-wise optimizers (`fm_keras.optimizers`), whose sparse update is a gather,
  arithmetic and a ``scatter_update`` of whole rows.

Used when it applies (`unsupported` says why not): one device (no `tf.distribute` strategy),
a row-wise optimizer with a constant learning rate and no gradient clipping, and batches of
at most ``batch_rows`` rows (the sampled-negatives dataset appends negatives to each batch,
so it trains with Keras' own step). Equal to Keras' step up to float rounding
(tests/test_compiled_steps.py). It reads and advances the variables through which tf_keras
2.20's `fit` counts steps (``Model._steps_per_execution``, ``Model._train_counter``), as Keras'
own train function does; the tests pin that contract with the pinned tf_keras.
"""

from __future__ import annotations

import math

from fm_keras._tf import keras, tf, without_xla_notice
from fm_keras.config import TrainingConfig
from fm_keras.errors import ConfigError
from fm_keras.optimizers import is_rowwise

# `training.compiled_steps: auto` compiles runs of at least this many steps (epochs x batches):
# compiling costs ~1 s more than tracing Keras' step, repaid by 0.7 ms saved per step at batch
# 1024 (BENCHMARKS.md, "Many steps per XLA call"; more at larger batches). Below
# AUTO_MIN_BATCH rows a step saves too little (0.08 ms at 64 rows: a new user's trial).
AUTO_MIN_STEPS = 1000
AUTO_MIN_BATCH = 256


def execution_steps(training: TrainingConfig, rows: int) -> int:
    """Steps per graph call for `rows` training rows: ``training.steps_per_execution``, at
    most one epoch's batches (`CompiledSteps` stacks that many batches per call, so a larger
    value would only hold memory: 10,000 x 4,096 rows took 4.9 GB for 17-batch epochs)."""
    return max(1, min(training.steps_per_execution, math.ceil(rows / training.batch_size)))


def choose(model, training: TrainingConfig, rows: int, fixed_batches: bool) -> str:
    """Turns `CompiledSteps` on for a compiled `FMModel` as ``training.compiled_steps``
    says; returns the reason, for the log.

    Args:
        model: the compiled `fm_keras.model.FMModel`.
        training: its training config (``compiled_steps``, ``batch_size``, ``epochs``).
        rows: training rows per epoch.
        fixed_batches: whether every batch holds at most ``training.batch_size`` rows (False
            for sampled negatives, which are appended to each batch).

    Raises:
        ConfigError: ``compiled_steps: always`` where they do not apply (the reason named).
    """
    mode = training.compiled_steps
    steps = training.epochs * math.ceil(rows / training.batch_size)
    if mode == "never":
        model.use_compiled_steps(None)
        return "training.compiled_steps: never"
    if mode == "auto" and steps < AUTO_MIN_STEPS:
        model.use_compiled_steps(None)
        return f"at most {steps:,} steps, fewer than the {AUTO_MIN_STEPS:,} that repay compiling"
    if mode == "auto" and training.batch_size < AUTO_MIN_BATCH:
        model.use_compiled_steps(None)
        return (f"batches of {training.batch_size} rows, fewer than the {AUTO_MIN_BATCH} where "
                "a compiled step saves time")
    why = model.use_compiled_steps(training.batch_size if fixed_batches else None)
    if why and mode == "always":
        raise ConfigError(f"training: compiled_steps: always: cannot apply: {why}; set it to "
                          "auto or never")
    per_call = execution_steps(training, rows)
    return why or (f"{per_call} step{'s' if per_call > 1 else ''} per XLA call, "
                   f"at most {steps:,} in the run")


def unsupported(model, batch_rows: int | None) -> str | None:
    """Why `model` (compiled, an `FMModel`) cannot train with `CompiledSteps`, or None."""
    optimizer = model.optimizer
    if batch_rows is None:
        return "its batches vary in size (sampled negatives)"
    if tf.distribute.has_strategy() or model.distribute_strategy.num_replicas_in_sync > 1 \
            or model._cluster_coordinator is not None:
        return "it trains under a tf.distribute strategy"
    if not is_rowwise(optimizer):
        return f"optimizer {type(optimizer).__name__} is not row-wise (fm_keras.optimizers)"
    if isinstance(optimizer._learning_rate, keras.optimizers.schedules.LearningRateSchedule):
        return "its learning rate is a schedule"
    if optimizer.clipnorm or optimizer.clipvalue or optimizer.global_clipnorm \
            or optimizer.use_ema:
        return "its optimizer clips gradients or keeps an EMA"
    if model.run_eagerly:
        return "the model runs eagerly"
    return None


class CompiledSteps:
    """The train function of `model` that runs each execution's steps in one XLA call.

    Args:
        model: a compiled `fm_keras.model.FMModel` (its `compute_loss` inputs are
            ``({"ids", "values"}, labels)`` or ``({"ids", "values"}, labels, weights)``,
            ids int [rows, slots]) for which `unsupported` is None.
        batch_rows: the most rows a batch holds (``training.batch_size``).

    Calling it with a `tf.data` iterator runs ``model._steps_per_execution`` steps and returns
    the last step's ``{"loss", "regularization_loss", "total_loss"}`` (float32 scalars), as
    `FMModel.train_step` does.

    Raises:
        tf.errors.InvalidArgumentError: a batch holds more than `batch_rows` rows.
    """

    def __init__(self, model, batch_rows: int):
        self.model = model
        self.batch_rows = int(batch_rows)
        self.max_steps = int(model._steps_per_execution.numpy())
        self.variables = model.trainable_variables
        model.optimizer.build(self.variables)
        # Deduplication scratch, [ids] int32, not a weight: kept off the model so that no
        # checkpoint or export sees it.
        self._positions = {v.ref(): tf.Variable(tf.zeros([v.shape[0]], tf.int32),
                                                trainable=False)
                           for v in self.variables if v.shape.rank}
        self._loop = tf.function(self._steps, jit_compile=True, reduce_retracing=True)
        self._function = tf.function(self._execution, reduce_retracing=True)
        self._compiled = False

    def __call__(self, iterator):
        if self._compiled:
            return self._function(iterator)
        self._compiled = True
        with without_xla_notice():  # the first call compiles
            return self._function(iterator)

    def _execution(self, iterator):
        model = self.model
        steps = tf.cast(model._steps_per_execution, tf.int32)
        spec = tf.nest.flatten(iterator.element_spec)
        arrays = [tf.TensorArray(s.dtype, size=self.max_steps) for s in spec]
        rows = tf.TensorArray(tf.int32, size=self.max_steps)
        for i in tf.range(steps):
            batch = tf.nest.flatten(next(iterator))
            n = tf.shape(batch[0])[0]
            tf.debugging.assert_less_equal(
                n, self.batch_rows, message="a training batch holds more rows than "
                "training.batch_size")
            padded = _padded(batch, spec, self.batch_rows - n)
            arrays = [a.write(i, t) for a, t in zip(arrays, padded)]
            rows = rows.write(i, n)
        for i in tf.range(steps, self.max_steps):  # a short execution: the stack's shape
            arrays = [a.write(i, a.read(0)) for a in arrays]  # stays (never read)
            rows = rows.write(i, 0)
        stacks = [a.stack() for a in arrays]
        logs = self._loop(tf.nest.pack_sequence_as(iterator.element_spec, stacks),
                          rows.stack(), steps)
        model._train_counter.assign_add(tf.cast(steps, model._train_counter.dtype))
        return logs

    def _steps(self, stacked, rows, steps):
        """Runs `steps` steps over the stacked batches [steps, batch_rows, ...] in order.

        A `tf.while_loop` on ``i < steps``, not a ``for`` over ``tf.range(steps)``: AutoGraph
        gives such a loop ``maximum_iterations=steps``, which XLA needs as a constant, so an
        epoch's short last execution compiled the loop again (~1.1 s per run)."""
        zero = tf.constant(0.0)
        logs = {"loss": zero, "regularization_loss": zero, "total_loss": zero}

        def step(i, logs):
            return i + 1, self._step(tf.nest.map_structure(lambda t: t[i], stacked), rows[i])

        return tf.while_loop(lambda i, _: i < steps, step, (tf.constant(0), logs))[1]

    def _step(self, batch, rows):
        """One step on a batch padded to `batch_rows` rows, of which the first `rows` are
        real; the same update as `FMModel.train_step` on those rows."""
        model, optimizer = self.model, self.model.optimizer
        encoded, labels, weights = keras.utils.unpack_x_y_sample_weight(batch)
        if weights is None:  # the padding rows weigh 0, the real ones 1
            weights = tf.cast(tf.range(self.batch_rows) < rows, tf.float32)
        real = tf.cast(rows, tf.float32)
        with tf.GradientTape() as tape:
            logits = model.fm((encoded["ids"], encoded["values"]))
            per_row = model.task(labels=tf.reshape(labels, [-1, 1]), predictions=logits,
                                 sample_weight=tf.reshape(weights, [-1, 1]),
                                 compute_metrics=False)
            loss = tf.reduce_sum(per_row) / real
            # The layer's penalties are means over the padded batch: rescaled to the real rows.
            regularization = tf.reduce_sum([tf.reduce_sum(x) for x in model.losses]) \
                * (self.batch_rows / real)
            total = loss + regularization
        gradients = tape.gradient(total, self.variables)
        for gradient, variable in zip(gradients, self.variables):
            if isinstance(gradient, tf.IndexedSlices):
                gradient = self._summed_duplicates(gradient, variable)
            optimizer.update_step(gradient, variable)
        optimizer.iterations.assign_add(1)
        return {"loss": loss, "regularization_loss": regularization, "total_loss": total}

    def _summed_duplicates(self, gradient, variable):
        """A sparse gradient with every slot's value replaced by the sum over its id's slots
        (static shapes; see the module docstring)."""
        ids = tf.reshape(gradient.indices, [-1])
        values = tf.reshape(gradient.values, [-1, *gradient.values.shape[1:]])
        n = tf.shape(ids)[0]
        positions = self._positions[variable.ref()]
        positions.scatter_nd_update(ids[:, None], tf.range(n))
        first = tf.gather(positions, ids)  # one slot position per distinct id
        summed = tf.gather(tf.math.unsorted_segment_sum(values, first, n), first)
        return tf.IndexedSlices(summed, ids, gradient.dense_shape)


def _padded(batch, spec, missing):
    """The flat batch tensors with `missing` rows appended that copy row 0 with every float
    feature (x values), label and weight 0: no new id, no gradient."""
    out = []
    for tensor, s in zip(batch, spec):
        filler = tf.repeat(tensor[:1], missing, axis=0)
        if s.dtype.is_floating:
            filler = tf.zeros_like(filler)
        out.append(tf.concat([tensor, filler], axis=0))
    return out
