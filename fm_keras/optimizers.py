"""Optimizers whose step costs O(rows touched), not O(table), on the FM's sparse gradients.

The linear and factor tables get their gradients from `tf.nn.embedding_lookup`, as
`tf.IndexedSlices` over the rows a batch touched (deduplicated by the base optimizer before
`update_step`). tf_keras' Adam decays both moments and rewrites the whole variable every step,
and its FTRL combines the sparse gradient with full-size tensors, so a step costs O(ids * k):
at 5M ids that is hundreds of times the FM's own work. The classes here keep tf_keras' math
for dense gradients (the bias) and update only the touched rows of sparse ones:

- `LazyAdam`: Adam (Kingma & Ba 2015, Algorithm 1) where the moments and the variable of a row
  move only on the steps that touch it - the "lazy" Adam of TensorFlow Addons'
  ``LazyAdam``. A row's moments are not decayed on steps that miss it, so on sparse data it
  differs from dense Adam (by design: that decay is what costs O(table)).
- `SparseAdagrad`: Adagrad (Duchi, Hazan & Singer 2011); tf_keras' sparse path is already
  row-wise, this class adds the row-wise weight decay below.
- `SparseFtrl`: FTRL-Proximal (McMahan et al. 2013, "Ad Click Prediction: a View from the
  Trenches", Algorithm 1) on the touched rows only. FTRL's per-coordinate state does not
  change on a step whose gradient is zero, so this equals dense FTRL except that a row keeps
  its initial value until first touched (dense FTRL recomputes every row from its state at
  the first step).

Decoupled weight decay (``weight_decay``, Loshchilov & Hutter 2019) is applied with the update
to the same rows: the touched rows of a sparse gradient (as Addons' decoupled weight decay
does on sparse updates), every element of a dense one. tf_keras applies it to the whole table
every step instead.

Each sparse update reads the touched rows of the variable once (`tf.gather`) and writes them
once (``scatter_update`` of the new rows; the base optimizer has summed duplicate indices, so
the rows are distinct). TensorFlow's ``scatter_update`` copies whole rows, while its
``scatter_sub``/``scatter_add`` apply an elementwise expression row by row: on 8k rows of a
5M-row table a ``scatter_sub`` cost 1.6-2.9x a gather plus a ``scatter_update``
(benchmarks/row_writes.py, BENCHMARKS.md "Row writes").

All three work under `tf.distribute` (each replica's update runs through the strategy's
``extended.update``, with the variable's local copy) and checkpoint their slot variables
like the classes they extend.
"""

from __future__ import annotations

from fm_keras._tf import keras, tf


class _RowwiseUpdates:
    """Dispatch of `update_step`: sparse gradients to `_sparse_update`, dense ones to tf_keras.

    Mixed in before a tf_keras optimizer class. Weight decay moves from `apply_gradients`
    (which decays whole tables) into `update_step`, where the touched rows are known.
    """

    def _apply_weight_decay(self, variables):
        # Applied per variable in `update_step`, only to the rows the gradient touches.
        return

    def update_step(self, gradient, variable):
        decay = self.weight_decay is not None and self._use_weight_decay(variable)
        if isinstance(gradient, tf.IndexedSlices):
            indices = gradient.indices
            rows = tf.gather(variable, indices)
            if decay:
                rows = rows * (1.0 - self._decay_rate(variable))
            variable.scatter_update(tf.IndexedSlices(
                self._sparse_update(gradient.values, indices, variable, rows), indices))
            return
        if decay:
            variable.assign_sub(variable * self._decay_rate(variable))
        super().update_step(gradient, variable)

    def _decay_rate(self, variable):
        return (tf.cast(self.learning_rate, variable.dtype)
                * tf.cast(self.weight_decay, variable.dtype))

    def _slot(self, slots, variable):
        return slots[self._index_dict[self._var_key(variable)]]

    def _sparse_update(self, values, indices, variable, rows):
        """Updates the slots of the touched rows; returns the rows' new values.

        Args:
            values: the summed gradient rows, [touched, ...] (the variable's row shape).
            indices: the distinct touched rows, int [touched].
            variable: the variable (its slots are looked up by it; it is written by the
                caller).
            rows: the variable's current values of those rows, weight decay applied.

        Returns:
            The new values of the rows, shaped like `rows`.
        """
        raise NotImplementedError


@keras.utils.register_keras_serializable(package="fm_keras")
class LazyAdam(_RowwiseUpdates, keras.optimizers.Adam):
    """Adam whose sparse updates touch only the gradient's rows.

    For the rows ``r`` of an `tf.IndexedSlices` gradient ``g`` at step ``t`` (1-based)::

        m[r] = beta_1 * m[r] + (1 - beta_1) * g
        v[r] = beta_2 * v[r] + (1 - beta_2) * g**2
        var[r] -= lr * sqrt(1 - beta_2**t) / (1 - beta_1**t) * m[r] / (sqrt(v[r]) + epsilon)

    Other rows, their moments included, are left as they are. Dense gradients follow
    `tf_keras.optimizers.Adam` exactly. Arguments are Adam's; ``amsgrad`` is not supported.

    Raises:
        ValueError: ``amsgrad=True`` (its running maximum would need a third dense slot).
    """

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7,
                 name="LazyAdam", **kwargs):
        if kwargs.get("amsgrad"):
            raise ValueError("LazyAdam does not support amsgrad=True; use "
                             "tf_keras.optimizers.Adam for AMSGrad")
        super().__init__(learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2,
                         epsilon=epsilon, name=name, **kwargs)

    def _sparse_update(self, values, indices, variable, rows):
        dtype = variable.dtype
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        beta_1_power, beta_2_power = tf.pow(beta_1, step), tf.pow(beta_2, step)
        alpha = (tf.cast(self.learning_rate, dtype) * tf.sqrt(1 - beta_2_power)
                 / (1 - beta_1_power))
        epsilon = self.epsilon * tf.sqrt(1 - beta_2_power) if self.adaptive_epsilon \
            else self.epsilon
        m, v = self._slot(self._momentums, variable), self._slot(self._velocities, variable)
        m_rows = beta_1 * tf.gather(m, indices) + (1 - beta_1) * values
        v_rows = beta_2 * tf.gather(v, indices) + (1 - beta_2) * tf.square(values)
        m.scatter_update(tf.IndexedSlices(m_rows, indices))
        v.scatter_update(tf.IndexedSlices(v_rows, indices))
        return rows - alpha * m_rows / (tf.sqrt(v_rows) + epsilon)


@keras.utils.register_keras_serializable(package="fm_keras")
class SparseAdagrad(_RowwiseUpdates, keras.optimizers.Adagrad):
    """Adagrad with row-wise weight decay; for the rows ``r`` of a sparse gradient ``g``::

        acc[r] += g**2
        var[r] -= lr * g / sqrt(acc[r] + epsilon)

    Arguments are `tf_keras.optimizers.Adagrad`'s; dense gradients follow it exactly.
    """

    def __init__(self, learning_rate=0.001, initial_accumulator_value=0.1, epsilon=1e-7,
                 name="SparseAdagrad", **kwargs):
        super().__init__(learning_rate=learning_rate,
                         initial_accumulator_value=initial_accumulator_value,
                         epsilon=epsilon, name=name, **kwargs)

    def _sparse_update(self, values, indices, variable, rows):
        acc = self._slot(self._accumulators, variable)
        acc_rows = tf.gather(acc, indices) + tf.square(values)
        acc.scatter_update(tf.IndexedSlices(acc_rows, indices))
        lr = tf.cast(self.learning_rate, variable.dtype)
        return rows - lr * values / tf.sqrt(acc_rows + self.epsilon)


@keras.utils.register_keras_serializable(package="fm_keras")
class SparseFtrl(_RowwiseUpdates, keras.optimizers.Ftrl):
    """FTRL-Proximal on the touched rows; for the rows ``r`` of a sparse gradient ``g``
    (``p = -learning_rate_power``, ``l2' = l2 + beta / (2 lr)``)::

        g_s = g + 2 * l2_shrinkage * var[r]
        n_new = n[r] + g**2
        z[r] += g_s - (n_new**p - n[r]**p) / lr * var[r]
        var[r] = (clip(z[r], -l1, l1) - z[r]) / (n_new**p / lr + 2 * l2')
        n[r] = n_new

    which is tf_keras' dense FTRL restricted to those rows. Arguments are
    `tf_keras.optimizers.Ftrl`'s.
    """

    def __init__(self, learning_rate=0.001, name="SparseFtrl", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)

    def _sparse_update(self, values, indices, variable, rows):
        dtype = variable.dtype
        lr = tf.cast(self.learning_rate, dtype)
        power = -self.learning_rate_power
        l2 = self.l2_regularization_strength + self.beta / (2.0 * lr)
        n, z = self._slot(self._accumulators, variable), self._slot(self._linears, variable)
        var_rows, n_rows = rows, tf.gather(n, indices)
        shrunk = values + 2 * self.l2_shrinkage_regularization_strength * var_rows
        n_new = n_rows + tf.square(values)
        z_rows = tf.gather(z, indices) + shrunk - (
            tf.pow(n_new, power) - tf.pow(n_rows, power)) / lr * var_rows
        l1 = self.l1_regularization_strength
        quadratic = tf.pow(n_new, power) / lr + 2 * l2
        z.scatter_update(tf.IndexedSlices(z_rows, indices))
        n.scatter_update(tf.IndexedSlices(n_new, indices))
        return (tf.clip_by_value(z_rows, -l1, l1) - z_rows) / quadratic
