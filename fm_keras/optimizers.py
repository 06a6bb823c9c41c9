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
  Trenches", Algorithm 1) on the touched rows only. It equals tf_keras' dense FTRL only when
  the initial values are zero and ``l2_shrinkage_regularization_strength`` is 0 (see its
  docstring for how it differs otherwise).

Decoupled weight decay (``weight_decay``, Loshchilov & Hutter 2019) is applied with the update
to the same rows: the touched rows of a sparse gradient (as Addons' decoupled weight decay
does on sparse updates), every element of a dense one. tf_keras applies it to the whole table
every step instead.

Every per-element state of a variable (Adam's m and v, FTRL's n and z, Adagrad's accumulator)
lives side by side in one slot, ``state``: [rows, S, cols] for a [rows, cols] table (S states),
[S] for a scalar. A sparse update reads the touched rows of the variable and of its state once
each (`tf.gather`) and writes them once each (``scatter_update`` of the new rows; the base
optimizer has summed duplicate indices, so the rows are distinct): two random reads and two
random writes per touched id, whatever the number of states. On a 5M-row table those rows miss
the CPU caches, and each separate slot cost one more gather and scatter (BENCHMARKS.md
"Fused per-id rows"). TensorFlow's ``scatter_update`` copies whole rows, while its
``scatter_sub``/``scatter_add`` apply an elementwise expression row by row: on 8k rows of a
5M-row table a ``scatter_sub`` cost 1.6-2.9x a gather plus a ``scatter_update``
(benchmarks/row_writes.py, BENCHMARKS.md "Row writes"). A dense gradient runs the same
arithmetic on the whole variable and state.

All three work under `tf.distribute` (each replica's update runs through the strategy's
``extended.update``, with the variable's local copy; a table sharded over parameter servers
gets one state slot per shard, beside it) and checkpoint their ``state`` slots.
"""

from __future__ import annotations

from fm_keras._tf import keras, tf


class _RowwiseUpdates:
    """One ``state`` slot per variable and the update's reads and writes; subclasses give the
    arithmetic (`_update`) and the states' names and initial values.

    Mixed in before a tf_keras optimizer class, whose ``build`` (one slot per state) it
    replaces. Weight decay moves from `apply_gradients` (which decays whole tables) into
    `update_step`, where the touched rows are known.
    """

    STATES: tuple[str, ...] = ()  # names of the per-element states, in slot order

    def _initial_states(self) -> tuple[float, ...]:
        return (0.0,) * len(self.STATES)

    def build(self, var_list):
        if getattr(self, "_built", False):
            return
        keras.optimizers.Optimizer.build(self, var_list)  # the variable index
        self._built = True
        self._state_slots = [self.add_variable_from_reference(
            var, "state", initial_value=self._initial_state(var)) for var in var_list]

    def _initial_state(self, variable):
        # [rows, S, ...] for a variable [rows, ...]; [S] for a scalar.
        parts = [tf.fill(variable.shape, tf.cast(value, variable.dtype))
                 for value in self._initial_states()]
        return tf.stack(parts, axis=_axis(variable))

    def states(self, variable) -> dict[str, tf.Tensor]:
        """The current per-element states of `variable` by name (``m``, ``v``, ...), each
        shaped like the variable."""
        return dict(zip(self.STATES, tf.unstack(tf.convert_to_tensor(self._state(variable)),
                                                len(self.STATES), axis=_axis(variable))))

    def _state(self, variable):
        return self._state_slots[self._index_dict[self._var_key(variable)]]

    def _apply_weight_decay(self, variables):
        # Applied per variable in `update_step`, only to the rows the gradient touches.
        return

    def update_step(self, gradient, variable):
        state = self._state(variable)
        sparse = isinstance(gradient, tf.IndexedSlices)
        if sparse:
            rows, states = tf.gather(variable, gradient.indices), \
                tf.gather(state, gradient.indices)
            values = gradient.values
        else:
            rows, states = tf.convert_to_tensor(variable), tf.convert_to_tensor(state)
            values = gradient
        if self.weight_decay is not None and self._use_weight_decay(variable):
            rows = rows * (1.0 - self._decay_rate(variable))
        rows, states = self._update(values, rows, states, _axis(variable), variable.dtype)
        if sparse:
            state.scatter_update(tf.IndexedSlices(states, gradient.indices))
            variable.scatter_update(tf.IndexedSlices(rows, gradient.indices))
        else:
            state.assign(states)
            variable.assign(rows)

    def _decay_rate(self, variable):
        return (tf.cast(self.learning_rate, variable.dtype)
                * tf.cast(self.weight_decay, variable.dtype))

    def _update(self, gradient, rows, states, axis, dtype):
        """The new values of some rows of a variable and of their states.

        Args:
            gradient: the summed gradient of the rows, [touched, ...] (the variable's row
                shape), or the whole dense gradient.
            rows: the variable's current values of those rows, weight decay applied.
            states: their states, the `STATES` stacked on `axis`: [touched, S, ...] (a
                scalar variable's: [S]).
            axis: 1, or 0 for a scalar variable.
            dtype: the variable's dtype.

        Returns:
            ``(rows, states)``: the new values, shaped like the arguments.
        """
        raise NotImplementedError


def is_rowwise(optimizer) -> bool:
    """Whether `optimizer` is one of this module's (its sparse update of a row depends only on
    that row's summed gradient, variable and state, and writes the row whole)."""
    return isinstance(optimizer, _RowwiseUpdates)


def _axis(variable) -> int:
    """The axis of a state slot that holds the states: 1 ([rows, S, ...]), a scalar's 0."""
    return 0 if variable.shape.rank == 0 else 1


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

    STATES = ("m", "v")

    def _update(self, gradient, rows, states, axis, dtype):
        step = tf.cast(self.iterations + 1, dtype)
        beta_1_power = tf.pow(tf.cast(self.beta_1, dtype), step)
        beta_2_power = tf.pow(tf.cast(self.beta_2, dtype), step)
        alpha = (tf.cast(self.learning_rate, dtype) * tf.sqrt(1 - beta_2_power)
                 / (1 - beta_1_power))
        epsilon = self.epsilon * tf.sqrt(1 - beta_2_power) if self.adaptive_epsilon \
            else self.epsilon
        # m += (g - m)(1 - beta_1), v += (g^2 - v)(1 - beta_2) on the stacked [m, v], with
        # tf_keras' expressions (the same float32 rounding as its dense Adam).
        shape = [2] + [1] * (states.shape.rank - axis - 1)
        rates = tf.constant([1 - self.beta_1, 1 - self.beta_2], dtype, shape)
        states = states + (tf.stack([gradient, tf.square(gradient)], axis) - states) * rates
        m, v = tf.unstack(states, 2, axis=axis)
        return rows - m * alpha / (tf.sqrt(v) + epsilon), states


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

    STATES = ("accumulator",)

    def _initial_states(self):
        return (self.initial_accumulator_value,)

    def _update(self, gradient, rows, states, axis, dtype):
        acc = tf.squeeze(states, axis) + tf.square(gradient)
        lr = tf.cast(self.learning_rate, dtype)
        return rows - lr * gradient / tf.sqrt(acc + self.epsilon), tf.expand_dims(acc, axis)


@keras.utils.register_keras_serializable(package="fm_keras")
class SparseFtrl(_RowwiseUpdates, keras.optimizers.Ftrl):
    """FTRL-Proximal on the touched rows; for the rows ``r`` of a sparse gradient ``g``
    (``p = -learning_rate_power``, ``l2' = l2 + beta / (2 lr)``)::

        g_s = g + 2 * l2_shrinkage * var[r]
        n_new = n[r] + g**2
        z[r] += g_s - (n_new**p - n[r]**p) / lr * var[r]
        var[r] = (clip(z[r], -l1, l1) - z[r]) / (n_new**p / lr + 2 * l2')
        n[r] = n_new

    which is tf_keras' FTRL update restricted to those rows; other rows and their states are
    left as they are. Dense gradients follow `tf_keras.optimizers.Ftrl` exactly. Arguments
    are `tf_keras.optimizers.Ftrl`'s.

    On sparse gradients the result equals tf_keras' dense FTRL (fed the same gradients with
    zeros in the untouched rows) if the variable starts at zero and ``l2_shrinkage`` is 0;
    otherwise it differs, for good, in two ways:

    - Dense FTRL recomputes every row from its ``z`` and ``n`` at every step, so at step 1 a
      row with g = 0 becomes the proximal solution of ``z = 0``: 0. Here that row keeps its
      initial value ``w0`` until its first touch, where ``w0`` enters ``z`` through the
      ``(n_new**p - n**p) / lr * var`` term; dense FTRL's ``z`` gets 0 there. Rows touched at
      step 1 are unaffected. (Measured over 16 steps of 6 rows, lr 0.1: 0 with zero
      initial values, up to 0.01 with N(0, 0.01) ones, up to 1.3 with N(0, 1).)
    - With ``l2_shrinkage`` > 0 dense FTRL adds ``2 * l2_shrinkage * var`` to ``z`` on every
      step, also those that miss the row; here only on the steps that touch it, so rows
      differ even from zero initial values once they are nonzero.
    """

    def __init__(self, learning_rate=0.001, name="SparseFtrl", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)

    STATES = ("accumulator", "linear")  # n and z

    def _initial_states(self):
        return (self.initial_accumulator_value, 0.0)

    def _update(self, gradient, rows, states, axis, dtype):
        lr = tf.cast(self.learning_rate, dtype)
        power = -self.learning_rate_power
        l2 = self.l2_regularization_strength + self.beta / (2.0 * lr)
        n, z = tf.unstack(states, 2, axis=axis)
        shrunk = gradient + 2 * self.l2_shrinkage_regularization_strength * rows
        n_new = n + tf.square(gradient)
        n_new_power = tf.pow(n_new, power)
        z = z + shrunk - (n_new_power - tf.pow(n, power)) / lr * rows
        l1 = self.l1_regularization_strength
        quadratic = n_new_power / lr + 2 * l2
        return (tf.clip_by_value(z, -l1, l1) - z) / quadratic, tf.stack([n_new, z], axis)
