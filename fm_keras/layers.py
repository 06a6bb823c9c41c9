"""The Factorization Machine layer (Rendle 2010) over sparse slots.

    y(x) = w0 + sum_i w_i x_i + 1/2 sum_f [(sum_i v_if x_i)^2 - sum_i v_if^2 x_i^2]

Inputs are `(ids, values)` of shape [batch, slots] (or ragged [batch, (slots)]): the non-zero
features of each row as ids in one global id space and their x values. Only those rows of the
tables are gathered, so a forward pass costs O(k * slots) per row, never O(n^2) or O(n). A slot
with x = 0 (padding) contributes nothing, but its id is still looked up: pad with an id in
[0, num_ids), e.g. 0. Each non-zero id should appear once per row (the encoder gives every
feature its own id range); an id listed twice acts as two features whose pair interacts.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence

import numpy as np

from fm_keras._tf import keras, tf


@keras.utils.register_keras_serializable(package="fm_keras")
class FactorizationMachine(keras.layers.Layer):
    """Second-order FM: bias, linear weights and k-dimensional factors.

    Args:
        num_ids: size of the global id space (rows of the linear and factor tables); any
            integral value >= 1 (int, NumPy integer), stored as an int.
        embedding_dim: k, the factor dimension (default 10), an integral value >= 1.
        l2_embeddings: L2 penalty on the factor rows a batch touches, per occurrence; it costs
            O(k * slots) rather than O(n * k) for the whole table. A float, or one value per
            slot (so that, e.g., id features are regularized harder than shared attributes).
            The penalty is computed in float32 even under a float16 policy (where the squares
            of small weights times a small L2 would underflow to 0).
        l2_linear: the same for the linear weights.
        embeddings_initializer: initializer of the factor table.
        l2_prior: precision tau of a Gaussian prior N(0, 1/tau) on every id's factors and
            linear weight, for training on N rows: an id seen n times gets L2 tau / (2 n) per
            occurrence, so each step adds tau / (2 N) * ||theta||^2 per id in expectation (the
            MAP objective divided by N). Rare ids are held back most, frequent ones barely (cf.
            the frequency-aware "mini-batch aware regularization" of Zhou et al., Deep Interest
            Network, KDD 2018). Off (0) by default; the counts come from `set_prior`, and ids
            without a count are not penalized by it. `fm_keras.prior` re-estimates tau per
            feature during training.

    Weights: ``bias`` []; ``table`` [num_ids, 1 + k], id i's row ``[w_i, v_i1 .. v_ik]`` (one
    row per id, so that a step reads and writes each touched id once, not once per table;
    `linear` and `embeddings` read its columns); with `l2_prior`, ``prior`` [num_ids, 2], id
    i's L2 per occurrence ``[linear, factors]`` (not trained, kept in float32). They exist once
    the layer is built (called on inputs, or `build()`).

    Call args:
        inputs: ``(ids, values)`` (a tuple or list) or ``{"ids": ids, "values": values}``:
            ids, an int tensor [batch, slots]; values, a float tensor [batch, slots], the x of
            each slot. Both may instead be ragged [batch, (slots)] with the same row lengths (a
            row of m slots is the same as the row zero-padded to more slots). Every id must be
            in [0, num_ids), padding slots (x = 0) included: pad with id 0.

    Returns:
        The FM score (logit for CTR), shape [batch, 1], in the layer's compute dtype: float32,
        or float16 under a ``mixed_float16`` policy (as for any Keras layer). With mixed
        precision, end the model with a float32 layer, e.g.
        ``keras.layers.Activation("sigmoid", dtype="float32")``, as the Keras mixed-precision
        guide advises.

    Raises:
        ValueError: inputs of another rank or shape (e.g. [batch, slots, 1]), ids and values of
            different shapes, or per-slot ``l2_*`` lists whose length is not the number of
            slots (ragged inputs: shorter than the longest row; checked when the batch runs).
        TypeError: inputs that are not an (ids, values) pair or an {ids, values} dict.
    """

    def __init__(self, num_ids: int, embedding_dim: int = 10,
                 l2_embeddings: float | Sequence[float] = 0.0,
                 l2_linear: float | Sequence[float] = 0.0,
                 embeddings_initializer="random_normal", l2_prior: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.num_ids = _positive_int(num_ids, "num_ids")
        self.embedding_dim = _positive_int(embedding_dim, "embedding_dim")
        self.l2_embeddings = _l2_value(l2_embeddings, "l2_embeddings")
        self.l2_linear = _l2_value(l2_linear, "l2_linear")
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        self.l2_prior = _l2_value(l2_prior, "l2_prior")
        if isinstance(self.l2_prior, list):
            raise ValueError(f"l2_prior must be one float, got {l2_prior!r}")

    def build(self, input_shape):
        shapes = _input_shapes(input_shape)
        if shapes is not None:  # build(None), as towers do, leaves the checks to call
            self._check_shapes(*shapes)
        self.bias = self.add_weight(name="bias", shape=[], initializer="zeros")
        # One row per id, [w_i, v_i1 .. v_ik]: a step reads and writes each touched id's
        # parameters as one row of one table (one lookup, one optimizer gather and scatter)
        # instead of a row of each of two tables.
        self.table = self.add_weight(name="table", shape=[self.num_ids, 1 + self.embedding_dim],
                                     initializer=_TableInitializer(self.embeddings_initializer))
        if self.l2_prior:
            # Per-id L2 per occurrence, tau / (2 n), 0 until set: [linear, factors] per id,
            # saved with the weights so that a resumed run keeps the same prior. Read in
            # float32 under mixed precision: tau / (2 n) is below float16's normal range.
            self.prior = self.add_weight(name="prior", shape=[self.num_ids, 2],
                                         initializer="zeros", trainable=False, autocast=False)
        super().build(input_shape)

    @property
    def linear(self):
        """The linear weights w, float32 [num_ids] (column 0 of `table`; read-only).

        Raises:
            ValueError: the layer is not built yet.
        """
        self._require_built("linear")
        return tf.convert_to_tensor(self.table)[:, 0]

    @property
    def embeddings(self):
        """The factors V, float32 [num_ids, k] (columns 1.. of `table`; read-only).

        Raises:
            ValueError: the layer is not built yet.
        """
        self._require_built("embeddings")
        return tf.convert_to_tensor(self.table)[:, 1:]

    def assign_parameters(self, linear=None, embeddings=None) -> None:
        """Writes the linear weights [num_ids] and/or the factors [num_ids, k] into `table`.

        Raises:
            ValueError: an array has the wrong shape, or the layer is not built yet.
        """
        self._require_built("assign_parameters")
        table = np.array(tf.convert_to_tensor(self.table))  # also a table sharded over ps
        columns = (("linear", linear, 0), ("embeddings", embeddings, slice(1, None)))
        for name, value, cols in columns:
            if value is None:
                continue
            value = np.asarray(value, np.float32)
            if value.shape != table[:, cols].shape:
                raise ValueError(f"{name} must have shape {list(table[:, cols].shape)}, "
                                 f"got {list(value.shape)}")
            table[:, cols] = value
        self.table.assign(table)

    def set_prior(self, counts, tau_embeddings=None, tau_linear=None) -> None:
        """Sets the `l2_prior` penalty of every id from its training count.

        Args:
            counts: int array [num_ids], how many training rows hold each id (x != 0).
            tau_embeddings, tau_linear: prior precisions of the factors and of the linear
                weights, a float or one per id [num_ids]; default `l2_prior`.

        Raises:
            ValueError: `l2_prior` is off, the layer is not built yet, or an array has the
                wrong shape.
        """
        if not self.l2_prior:
            raise ValueError("set_prior needs l2_prior > 0")
        self._require_built("set_prior")
        counts = np.asarray(counts, dtype=np.float64)
        if counts.shape != (self.num_ids,):
            raise ValueError(f"counts must have shape [{self.num_ids}], got {counts.shape}")
        columns = [np.broadcast_to(self.l2_prior if tau is None else np.asarray(tau, np.float64),
                                   counts.shape) for tau in (tau_linear, tau_embeddings)]
        tau = np.stack(columns, axis=1)
        self.prior.assign(np.where(counts[:, None] > 0,
                                   0.5 * tau / np.maximum(counts, 1.0)[:, None], 0.0)
                          .astype(np.float32))

    def call(self, inputs):
        ids, values = _ids_and_values(inputs)
        self._check_shapes(ids.shape, values.shape, _raggedness(ids, values))
        if isinstance(values, tf.RaggedTensor):  # one row_splits dtype for ids, values, rows
            values = values.with_row_splits_dtype(ids.row_splits.dtype)
        linear, pairs, _ = self._terms(ids, tf.cast(values, self.compute_dtype), regularize=True)
        return (self.bias + linear + pairs)[:, None]

    def side_terms(self, ids, values, mask):
        """FM terms restricted to the slots where `mask` is True (one side of the model).

        Args:
            ids, values: int and float tensors [batch, slots].
            mask: bool [slots] (or [batch, slots]).

        Returns ``(linear, pairs, summed)``: the side's linear term [batch], its pairwise
        term [batch] and its factor sum S = sum_i v_i x_i [batch, k]. The full FM is
        ``bias + (L_Q + L_I) + (P_Q + P_I) + <S_Q, S_I>``.
        """
        # One side's slots (fewer than a per-slot L2 list has), and never regularized.
        self._check_shapes(ids.shape, values.shape, _raggedness(ids, values), slot_l2=False)
        values = tf.cast(values, self.compute_dtype) * tf.cast(mask, self.compute_dtype)
        return self._terms(ids, values, regularize=False)

    def _terms(self, ids, values, regularize: bool):
        # embedding_lookup, not gather: it also reads tables sharded over parameter servers.
        rows = tf.nn.embedding_lookup(self.table, ids)               # [b, s, 1 + k]: w, v
        # Sums over the slots first: only [b, 1 + k] results are sliced into w and v (the
        # gradient of a slice of the [b, s, 1 + k] rows would be a dense copy of them).
        scaled = rows * values[..., None]                             # [w x, v x]
        sums = tf.reduce_sum(scaled, axis=1)                          # [b, 1 + k]
        squares = tf.reduce_sum(tf.square(scaled), axis=1)
        linear, summed = sums[:, 0], sums[:, 1:]                      # [b], S = [b, k]
        pairs = 0.5 * tf.reduce_sum(tf.square(summed) - squares[:, 1:], 1)
        if regularize and (_any(self.l2_embeddings) or _any(self.l2_linear) or self.l2_prior):
            self.add_loss(self._penalty(rows, ids, values))
        return linear, pairs, summed

    def _penalty(self, rows, ids, values):
        """The L2 penalty of the rows this batch touched (x != 0), averaged over the batch:
        per slot, l2_w w^2 + l2_v ||v||^2, the two norms as one product with `_norms`."""
        # float16 squares of small weights (times a small L2) underflow to 0: sum in float32.
        dtype = tf.float32 if rows.dtype.size < 4 else rows.dtype
        row_lengths = slots = None
        if isinstance(values, tf.RaggedTensor):  # the occurrences, flat [n], and their slots
            row_lengths, batch = values.row_lengths(), values.nrows()
            slots = tf.ragged.range(row_lengths).flat_values
            rows, ids, values = rows.flat_values, ids.flat_values, values.flat_values
        rows = tf.cast(rows, dtype)                                   # no-op in float32
        norms = tf.linalg.matmul(tf.reshape(tf.square(rows), [-1, 1 + self.embedding_dim]),
                                 _norms(self.embedding_dim, dtype))
        l2 = tf.stack([self._slot_l2(name, values, dtype, row_lengths, slots)
                       for name in ("l2_linear", "l2_embeddings")], axis=-1)  # [b, s, 2]/[n, 2]
        if self.l2_prior:
            l2 = l2 + tf.cast(tf.nn.embedding_lookup(self.prior, ids), dtype)
        touched = tf.cast(tf.not_equal(values, 0.0), dtype)
        per_slot = tf.reduce_sum(tf.reshape(norms, tf.shape(l2)) * l2, -1) * touched
        if slots is not None:
            return tf.reduce_sum(per_slot) / tf.cast(batch, dtype)
        return tf.reduce_mean(tf.reduce_sum(per_slot, 1))

    def _slot_l2(self, name: str, values, dtype, row_lengths=None, slots=None):
        """The L2 `name` of each slot, shaped as `values`: dense [b, s], or the flat [n] of
        ragged rows whose slots are `slots`. A per-slot list is checked here against the slot
        count that was not known when the layer was traced (`_check_shapes` did the rest)."""
        value = getattr(self, name)
        if not isinstance(value, list):
            return tf.broadcast_to(tf.constant(value, dtype), tf.shape(values))
        if slots is not None:
            check = tf.debugging.assert_less_equal(
                tf.reduce_max(row_lengths), tf.constant(len(value), row_lengths.dtype),
                message=_slot_count_message(name, value, "up to") + " (the longest row)")
            with tf.control_dependencies([check]):
                return tf.gather(tf.constant(value, dtype), slots)
        checks = []
        if values.shape[1] is None:
            checks.append(tf.debugging.assert_equal(tf.shape(values)[1], len(value),
                                                    message=_slot_count_message(name, value, "")))
        with tf.control_dependencies(checks):
            return tf.broadcast_to(tf.constant(value, dtype), tf.shape(values))

    def _check_shapes(self, ids_shape, values_shape, ragged: bool | None = None,
                      slot_l2: bool = True) -> None:
        """Static checks of the input shapes (no per-step work): rank 2 each, the same shape,
        and (`slot_l2`: inputs the penalty reads) per-slot L2 lists as long as the slots are,
        when that is known."""
        ids_shape, values_shape = tf.TensorShape(ids_shape), tf.TensorShape(values_shape)
        if ids_shape.rank is None or values_shape.rank is None:
            return
        if ids_shape.rank != 2 or values_shape.rank != 2:
            hint = (" (drop the last axis of size 1, e.g. tf.squeeze(x, -1))"
                    if ids_shape.rank == 3 and ids_shape[-1] == 1 else "")
            raise ValueError(
                f"{self.name}: FactorizationMachine takes ids and values of shape "
                f"[batch, slots] (or ragged [batch, (slots)]), got ids of shape "
                f"{ids_shape.as_list()} and values of shape {values_shape.as_list()}{hint}")
        if not ids_shape.is_compatible_with(values_shape):
            raise ValueError(
                f"{self.name}: ids and values must have the same shape [batch, slots], got ids "
                f"of shape {ids_shape.as_list()} and values of shape {values_shape.as_list()}")
        slots = ids_shape[1] if ids_shape[1] is not None else values_shape[1]
        if ragged or slots is None or not slot_l2:
            return
        for name, value in (("l2_embeddings", self.l2_embeddings), ("l2_linear", self.l2_linear)):
            if isinstance(value, list) and len(value) != slots:
                raise ValueError(f"{self.name}: " + _slot_count_message(name, value, "")
                                 + f"; got inputs with {slots} slots")

    def _require_built(self, what: str) -> None:
        if getattr(self, "table", None) is None:
            raise ValueError(f"{self.name}: {what} needs the layer's weights, which it makes "
                             "when built: call the layer on inputs or build() it first")

    def get_config(self):
        return {
            **super().get_config(),
            "num_ids": self.num_ids,
            "embedding_dim": self.embedding_dim,
            "l2_embeddings": self.l2_embeddings,
            "l2_linear": self.l2_linear,
            "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer),
            "l2_prior": self.l2_prior,
        }


class _TableInitializer:
    """`table`'s initial value: linear weights 0, factors from the factor initializer."""

    def __init__(self, embeddings_initializer):
        self.embeddings_initializer = embeddings_initializer

    def __call__(self, shape, dtype=None, **kwargs):
        # A table sharded over parameter servers is initialized shard by shard: the shard's
        # shape comes as `partition_shape` (its offset, passed on, varies the random draws).
        rows, cols = kwargs.pop("partition_shape", shape)
        factors = self.embeddings_initializer([rows, cols - 1], dtype=dtype, **kwargs)
        return tf.concat([tf.zeros([rows, 1], factors.dtype), factors], axis=1)


def _norms(k: int, dtype):
    """[1 + k, 2]: a table row's squares times it give (w^2, ||v||^2)."""
    return tf.constant([[1.0, 0.0]] + [[0.0, 1.0]] * k, dtype)


def _l2_value(value, name: str) -> float | list[float]:
    """A non-negative float, or a list of them (one per slot)."""
    many = isinstance(value, (list, tuple))
    values = [float(x) for x in value] if many else [float(value)]
    if (many and not values) or any(not x >= 0 for x in values):
        raise ValueError(f"{name} must be >= 0 (a float or one value per slot), got {value!r}")
    return values if many else values[0]


def _any(l2) -> bool:
    return any(l2) if isinstance(l2, list) else bool(l2)


def _positive_int(value, name: str) -> int:
    """An integral value >= 1 (int, NumPy integer) as a plain int; bools and floats refused."""
    try:
        number = None if isinstance(value, (bool, np.bool_)) else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(number)


def _ids_and_values(inputs):
    """The layer's inputs as (ids, values): a pair, or a dict with exactly those two keys."""
    if isinstance(inputs, Mapping):
        if set(inputs) != {"ids", "values"}:
            raise TypeError("FactorizationMachine takes (ids, values) or a dict with exactly "
                            f"the keys 'ids' and 'values', got a dict with keys {sorted(inputs)}")
        return inputs["ids"], inputs["values"]
    if isinstance(inputs, Sequence) and not isinstance(inputs, str) and len(inputs) == 2:
        return tuple(inputs)
    raise TypeError("FactorizationMachine takes a tuple (ids, values) (or a dict with the keys "
                    f"'ids' and 'values'), got {type(inputs).__name__}: {inputs!r:.200}")


def _input_shapes(input_shape):
    """(ids shape, values shape) from `build`'s `input_shape`, or None where it does not name
    them (``build(None)``)."""
    if isinstance(input_shape, Mapping) and set(input_shape) == {"ids", "values"}:
        return input_shape["ids"], input_shape["values"]
    if (isinstance(input_shape, Sequence) and len(input_shape) == 2
            and all(isinstance(s, (tf.TensorShape, list, tuple)) for s in input_shape)):
        return tuple(input_shape)
    return None


def _raggedness(ids, values) -> bool:
    """Whether ids and values are ragged; a ValueError if one is and the other is not."""
    ragged = [isinstance(x, tf.RaggedTensor) for x in (ids, values)]
    if ragged[0] != ragged[1]:
        raise ValueError("ids and values must both be dense [batch, slots] or both ragged "
                         f"[batch, (slots)], got ragged ids: {ragged[0]}, ragged values: "
                         f"{ragged[1]}")
    return ragged[0]


def _slot_count_message(name: str, value: list, relation: str) -> str:
    return (f"{name} has {len(value)} values, one per slot, so the inputs must have "
            f"{relation + ' ' if relation else ''}{len(value)} slots")
