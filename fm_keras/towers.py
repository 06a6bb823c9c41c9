"""The two towers of the FM decomposition (DESIGN.md), as Keras models and as tensor math.

    user_vector = [1, S_Q]      user_offset = w0 + L_Q + P_Q      item_vector = [L_I + P_I, S_I]
    user_vector . item_vector + user_offset == the FM logit

`user_outputs` and `item_vector` compute them from one side's encoded slots; `UserTower` and
`ItemTower` wrap them as Keras models over raw features (TFRS's query and candidate models).
The ranking export's ``user_tower`` / ``item_tower`` signatures call the same functions.
"""

from __future__ import annotations

from collections.abc import Sequence

from fm_keras._tf import keras, tf
from fm_keras.features import FeatureEncoder
from fm_keras.layers import FactorizationMachine


def user_outputs(fm: FactorizationMachine, ids, values) -> dict:
    """Query-side slots -> ``user_vector`` float32 [batch, k + 1] and ``user_offset`` [batch].

    Args:
        fm: the FM layer.
        ids, values: the query side's slots, int32 / float32 [batch, query slots].
    """
    linear, pairs, summed = fm.side_terms(ids, values, tf.ones_like(values, tf.bool))
    ones = tf.ones_like(linear)[:, None]
    return {"user_vector": tf.concat([ones, summed], axis=1),
            "user_offset": fm.bias + linear + pairs}


def item_vector(fm: FactorizationMachine, ids, values):
    """Item-side slots -> ``item_vector`` float32 [batch, k + 1] = [L_I + P_I, S_I]."""
    linear, pairs, summed = fm.side_terms(ids, values, tf.ones_like(values, tf.bool))
    return tf.concat([(linear + pairs)[:, None], summed], axis=1)


class _Tower(keras.Model):
    """Raw features of one side (dict of [batch] tensors) -> that side's vectors.

    Subclasses say which side (`query_side`) and which function of the slots (`outputs`).
    """

    query_side: bool
    tower_name: str

    def __init__(self, encoder: FeatureEncoder, fm: FactorizationMachine, **kwargs):
        super().__init__(name=self.tower_name, **kwargs)
        self.encoder = encoder
        self.fm = fm
        self.feature_names = encoder.side_names(query_side=self.query_side)
        if not self.feature_names:
            side = "query-side (user/context)" if self.query_side else "item"
            raise ValueError(f"the model has no {side} features, so it has no {self.name}")

    def build(self, input_shape):
        if not self.fm.built:  # a tower called before its FM: the FM makes its tables
            self.fm.build(None)
        super().build(input_shape)

    def input_signature(self) -> dict[str, tf.TensorSpec]:
        return self.encoder.input_signature(self.feature_names)

    def call(self, features):
        return type(self).outputs(self.fm, *self.encoder.encode(features, self.feature_names))


class UserTower(_Tower):
    """TFRS query model: user + context features -> ``{"user_vector", "user_offset"}``.

    Args:
        encoder, fm: the FMModel's encoder and FM layer (shared, not copied).
    """

    query_side, tower_name = True, "user_tower"
    outputs = staticmethod(user_outputs)


class ItemTower(_Tower):
    """TFRS candidate model: item features -> ``item_vector`` float32 [batch, k + 1].

    Args:
        encoder, fm: the FMModel's encoder and FM layer (shared, not copied).
    """

    query_side, tower_name = False, "item_tower"
    outputs = staticmethod(item_vector)


def side_slot_order(query_side: Sequence[bool]):
    """Int32 [slots]: gathers ``concat([query slots, item slots], 1)`` back into spec order.

    The FM is a sum over slots, but per-slot L2 lists follow the spec order, so rows put
    together from a query and a catalog item are put back in that order.
    """
    import numpy as np

    query_side = np.asarray(query_side, bool)
    positions = np.concatenate([np.flatnonzero(query_side), np.flatnonzero(~query_side)])
    return tf.constant(np.argsort(positions), tf.int32)
