"""Feature preprocessing: fitted once on training data, then run inside the model graph.

`fit_features` learns vocabularies, statistics and bucket boundaries from a training `Split`
(or its blocks, in one streaming pass: `fm_keras.fitting`).
`FeatureEncoder` is the Keras layer that turns raw values into FM inputs: for every row a fixed
number of *slots*, each an (id, x) pair in one global id space. A categorical or numeric
feature has one slot, a multi-hot feature `max_len` slots (unused ones have x = 0, which adds
nothing to the FM). Because the encoder is part of the model, a saved model takes raw values.

Global id layout (per feature, in spec order): [oov buckets | vocabulary], or [hash buckets],
or [bucket ids], or a single id for a numeric value.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fm_keras._tf import keras, tf
from fm_keras.config import FeatureConfig
from fm_keras.data import Split
from fm_keras.fitting import FeatureFitter, weighted_token_pattern

@dataclass(frozen=True)
class FittedFeature:
    """A feature config plus what was learned from training data.

    Attributes:
        config: the feature's configuration.
        vocabulary: kept values, most frequent first (categorical/multi_hot without hashing).
        max_len: slots per row (multi_hot), else 1.
        center, scale: x = (transform(v) - center) / scale for a numeric value.
        clip_min, clip_max: raw numeric values are clipped to the range seen in training.
        fill: raw value used for a missing numeric cell.
        boundaries: bucket boundaries of a bucketized numeric feature.
    """

    config: FeatureConfig
    vocabulary: tuple[str, ...] = ()
    max_len: int = 1
    center: float = 0.0
    scale: float = 1.0
    clip_min: float = -math.inf
    clip_max: float = math.inf
    fill: float = 0.0
    boundaries: tuple[float, ...] = ()

    @property
    def size(self) -> int:
        """How many ids this feature occupies in the global id space."""
        c = self.config
        if c.kind == "numeric":
            return len(self.boundaries) + 1 if c.buckets is not None else 1
        if c.hash_buckets is not None:
            return c.hash_buckets
        return c.oov_buckets + len(self.vocabulary)

    @property
    def slots(self) -> int:
        return self.max_len if self.config.kind == "multi_hot" else 1

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["vocabulary"] = list(self.vocabulary)
        d["boundaries"] = list(self.boundaries)
        for key in ("clip_min", "clip_max"):  # strict JSON has no Infinity: no clip is null
            if not math.isfinite(d[key]):
                d[key] = None
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> FittedFeature:
        d = dict(d)
        d["config"] = FeatureConfig(**d["config"])
        d["vocabulary"] = tuple(d.get("vocabulary", ()))
        d["boundaries"] = tuple(d.get("boundaries", ()))
        if d.get("clip_min") is None:
            d["clip_min"] = -math.inf
        if d.get("clip_max") is None:
            d["clip_max"] = math.inf
        return cls(**d)


def fit_features(configs: Sequence[FeatureConfig],
                 train: Split | Iterable[Split]) -> tuple[FittedFeature, ...]:
    """Learns vocabularies, statistics and boundaries from the training rows.

    Args:
        configs: the feature spec.
        train: the training split, or its blocks (`fm_keras.data.iter_blocks`): both give
            the same fitted features exactly (`fm_keras.fitting.FeatureFitter`).
    """
    fitter = FeatureFitter(configs)
    for block in [train] if isinstance(train, Split) else train:
        fitter.update(block.features)
    return tuple(FittedFeature(c, **fields) for c, fields in zip(configs, fitter.finish()))


def _lookup(feature: FittedFeature) -> keras.layers.StringLookup:
    """The StringLookup of a categorical or multi-hot feature's vocabulary.

    StringLookup keeps its vocabulary as a Python list, which Keras wraps and tracks: every
    walk of the model's layers (`trainable_variables`, several per `fit` call) then visits each
    string, 0.44 s per walk at 23k ids (BENCHMARKS.md, "Many steps per XLA call"). The list is
    kept untracked instead; the lookup's table holds the vocabulary either way.
    """
    lookup = keras.layers.StringLookup(
        vocabulary=list(feature.vocabulary), num_oov_indices=feature.config.oov_buckets,
        output_mode="int", name=f"lookup_{feature.config.name}")
    vocabulary = list(lookup.input_vocabulary)
    del lookup.input_vocabulary  # drops the tracked wrapper
    _set_untracked(lookup, "input_vocabulary", vocabulary)
    return lookup


@tf.__internal__.tracking.no_automatic_dependency_tracking
def _set_untracked(layer, name: str, value) -> None:
    setattr(layer, name, value)


@keras.utils.register_keras_serializable(package="fm_keras")
class FeatureEncoder(keras.layers.Layer):
    """Raw feature values -> FM slots ``(ids, values)``.

    Args:
        features: fitted features, or their dicts (as `get_config` stores them).

    Call args:
        inputs: dict of raw tensors of shape [batch]: strings for categorical and multi-hot
            features (multi-hot as ``"a|b"`` or ``"a:0.5|b:2"``), numbers for numeric ones.

    Returns:
        ``(ids, values)``: int32 and float32 tensors of shape [batch, num_slots].
    """

    def __init__(self, features: Sequence[FittedFeature | Mapping], **kwargs):
        super().__init__(**kwargs)
        self.features = tuple(f if isinstance(f, FittedFeature) else FittedFeature.from_dict(f)
                              for f in features)
        if not self.features:
            raise ValueError("FeatureEncoder needs at least one feature, got none")
        sizes = [f.size for f in self.features]
        self.offsets = tuple(int(o) for o in np.cumsum([0, *sizes[:-1]]))
        self.num_ids = int(sum(sizes))
        self._lookups = {
            f.config.name: _lookup(f) for f in self.features
            if f.config.kind != "numeric" and f.config.hash_buckets is None and f.vocabulary
        }
        # No weights of its own (the lookups' tables come from the vocabularies above), so the
        # layer is built here: the export calls `encode`, not the layer, and an unbuilt layer
        # is saved with a "Skipping full serialization" warning per export.
        self.built = True

    @property
    def num_slots(self) -> int:
        return sum(f.slots for f in self.features)

    @property
    def slot_query_side(self) -> np.ndarray:
        """bool [num_slots]: True where the slot belongs to the query (user+context) side."""
        return np.concatenate([[f.config.query_side] * f.slots for f in self.features])

    @property
    def input_names(self) -> list[str]:
        return [f.config.name for f in self.features]

    def call(self, inputs):
        return self.encode(inputs)

    def encode(self, inputs, names: Sequence[str] | None = None):
        """Encodes the named features (default: all) into ``(ids, values)`` [batch, slots].

        With `names`, only those features' slots are produced, in spec order: the user and
        item towers encode one side of the model each.
        """
        wanted = set(self.input_names if names is None else names)
        ids, values = [], []
        for feature, offset in zip(self.features, self.offsets):
            name = feature.config.name
            if name not in wanted:
                continue
            if name not in inputs:
                raise ValueError(f"missing input feature {name!r}; the model expects "
                                 f"{sorted(wanted)}")
            i, v = self._encode(feature, inputs[name])
            ids.append(i + offset)
            values.append(v)
        return tf.concat(ids, axis=1), tf.concat(values, axis=1)

    def side_names(self, query_side: bool) -> list[str]:
        """Names of the query-side (user + context) or item-side features, in spec order."""
        return [f.config.name for f in self.features if f.config.query_side == query_side]

    def query_key_names(self) -> list[str]:
        """Names whose values identify a query (whose items are relevant or seen): the user
        tower's features. Context features (time, device, page...) change from one request
        to the next and are not part of who asks; with no user-tower feature every
        query-side feature is."""
        users = [f.config.name for f in self.features if f.config.tower == "user"]
        return users or self.side_names(query_side=True)

    def input_signature(self, names: Sequence[str] | None = None) -> dict[str, tf.TensorSpec]:
        """The raw inputs as `tf.TensorSpec`s of shape [None], named after the features."""
        return {f.config.name: tf.TensorSpec([None], tf.float32 if f.config.kind == "numeric"
                                             else tf.string, name=f.config.name)
                for f in self.features if names is None or f.config.name in names}

    def _encode(self, f: FittedFeature, raw):
        c = f.config
        if c.kind == "numeric":
            x = tf.reshape(tf.cast(raw, tf.float32), [-1])
            x = tf.where(tf.math.is_nan(x), tf.constant(f.fill, tf.float32), x)
            if c.buckets is not None:
                ids = tf.raw_ops.Bucketize(input=x, boundaries=list(f.boundaries))
                return ids[:, None], tf.ones_like(x)[:, None]
            x = tf.clip_by_value(x, f.clip_min, f.clip_max) if math.isfinite(f.clip_min) else x
            if c.normalization == "log":
                x = tf.math.log1p(tf.maximum(x, 0.0))
            # Times the float32 reciprocal, not divided by the scale: Grappler rewrites the
            # division so in a graph (the export), and eager encoding (`encode_numpy`) must
            # give the same bits.
            x = (x - f.center) * (np.float32(1) / np.float32(f.scale))
            return tf.zeros_like(x, tf.int32)[:, None], x[:, None]
        raw = tf.reshape(tf.strings.as_string(raw) if raw.dtype != tf.string else raw, [-1])
        if c.kind == "categorical":
            return self._lookup(f, raw)[:, None], tf.ones_like(raw, tf.float32)[:, None]
        tokens = tf.strings.split(raw, c.separator)
        tokens = tf.ragged.boolean_mask(tokens, tf.strings.length(tokens) > 0)[:, : f.max_len]
        # "name<sep>number" has a weight; any other token is a value of weight 1, whole.
        flat = tokens.flat_values
        pattern = weighted_token_pattern(c.weight_separator)
        # The name and weight are cut out of the weighted tokens only (most lists have none:
        # two replacements over every token were half of the encoding's time).
        at = tf.where(tf.strings.regex_full_match(flat, pattern))
        weighted = tf.gather_nd(flat, at)
        names = tf.tensor_scatter_nd_update(flat, at,
                                            tf.strings.regex_replace(weighted, pattern, r"\1"))
        given = tf.tensor_scatter_nd_update(tf.fill(tf.shape(flat), "1"), at,
                                            tf.strings.regex_replace(weighted, pattern, r"\2"))
        weight = tf.strings.to_number(given, tf.float32)
        weight = tf.where(tf.math.is_finite(weight), weight, 1.0)
        if c.combiner in ("mean", "sqrtn"):
            # Each row's sum (or norm) over its tokens, as a ragged reduce_sum adds them, but
            # on the flat values: the ragged division broadcasting it cost 0.2 s per 500k
            # tokens, more than the rest of the feature's encoding.
            rows = tokens.value_rowids()
            total = tf.math.unsorted_segment_sum(
                weight if c.combiner == "mean" else tf.square(weight), rows, tokens.nrows())
            total = total if c.combiner == "mean" else tf.sqrt(total)
            weight = weight / tf.gather(tf.maximum(total, 1e-12), rows)
        weights = tokens.with_flat_values(weight)
        ids = tokens.with_flat_values(self._lookup(f, names))
        return (ids.to_tensor(0, shape=[None, f.max_len]),
                weights.to_tensor(0.0, shape=[None, f.max_len]))

    def _lookup(self, f: FittedFeature, values):
        if f.config.hash_buckets is not None:
            return tf.cast(tf.strings.to_hash_bucket_fast(values, f.config.hash_buckets), tf.int32)
        if not f.vocabulary:
            # No value was kept (e.g. the column is empty in the training rows): every value
            # is out of vocabulary, hashed into the oov buckets exactly as StringLookup does.
            return tf.cast(tf.strings.to_hash_bucket_fast(values, f.config.oov_buckets), tf.int32)
        return tf.cast(self._lookups[f.config.name](values), tf.int32)

    def encode_numpy(self, columns: Mapping[str, np.ndarray], batch_size: int = 65_536,
                     names: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Encodes in-memory columns once (training data is encoded once, not per epoch).

        Runs eagerly, `batch_size` rows per call: the kernels are the graph's, and tracing a
        graph per encoder and input shape cost more than it saved (0.2 s eager vs 3.2 s
        traced at 3.8k rows, 2.5 vs 3.3 s at 340k; BENCHMARKS.md, "Session 14"). The result
        equals the exported graph's bit for bit (tests/test_features.py).

        With `names`, only those features (one side of the model), as `encode` does.
        """
        names = tuple(self.input_names if names is None else names)
        n = len(columns[names[0]])
        ids, values = [], []
        for start in range(0, n, batch_size):
            chunk = {k: tf.constant(columns[k][start:start + batch_size]) for k in names}
            i, v = self.encode(chunk, names)
            ids.append(i.numpy())
            values.append(v.numpy())
        return np.concatenate(ids), np.concatenate(values)

    def get_config(self):
        return {**super().get_config(), "features": [f.to_dict() for f in self.features]}
