"""The two towers of the FM decomposition (DESIGN.md), as Keras models and as tensor math.

    user_vector = [1, S_Q]      user_offset = w0 + L_Q + P_Q      item_vector = [L_I + P_I, S_I]
    user_vector . item_vector + user_offset == the FM logit

`user_outputs` and `item_vector` compute them from one side's encoded slots; `UserTower` and
`ItemTower` wrap them as Keras models over raw features (TFRS's query and candidate models).
The ranking export's ``user_tower`` / ``item_tower`` signatures call the same functions.
`SavedModelOnly` gives them, and `FMModel`, Keras' ``save`` in the SavedModel format.
"""

from __future__ import annotations

import os
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


SAVE_INSTEAD = ("save it as a SavedModel (a path without .keras/.h5, or save_format='tf'), "
                "keep its run directory and load it with fm_keras.load_run, or export it for "
                "serving with `fm-keras export` (fm_keras.export.export_run)")


def keras_save_format(filepath, save_format: str | None = None) -> str:
    """The format Keras' ``save`` writes: ``keras``, ``h5`` or ``tf`` (SavedModel), from
    ``save_format`` if given, else from the path's suffix, as tf_keras decides it."""
    if save_format:
        return {"keras_v3": "keras", "hdf5": "h5", "tensorflow": "tf"}.get(save_format,
                                                                          save_format)
    if not isinstance(filepath, (str, os.PathLike)):
        return "h5"  # an open h5py.File
    path = os.fspath(filepath)
    return "keras" if path.endswith(".keras") else "h5" if path.endswith((".h5", ".hdf5")) \
        else "tf"


class SavedModelOnly:
    """Keras' ``save`` for models made of a fitted `FeatureEncoder` and the FM layer.

    Mixed in before `keras.Model`. The model's save spec is set when it is made (its raw
    inputs are the encoder's `input_signature`), so the SavedModel format works without a
    first call, and ``keras.models.load_model`` gives back a model that takes the same raw
    features. The ``.keras`` and ``.h5`` formats rebuild a model from its config, which these
    models do not have (they share the encoder and FM objects they are given): saving in them
    fails at once, saying what to use instead.
    """

    def _raw_input_signature(self) -> dict[str, tf.TensorSpec]:
        raise NotImplementedError

    def _set_raw_save_spec(self) -> None:
        self._set_save_spec(self._raw_input_signature())

    def save(self, filepath, overwrite: bool = True, save_format: str | None = None, **kwargs):
        """`keras.Model.save` in the SavedModel format.

        Raises:
            ValueError: the path or ``save_format`` asks for the ``.keras`` or ``.h5`` format.
        """
        fmt = keras_save_format(filepath, save_format)
        if fmt in ("keras", "h5"):
            raise ValueError(f"{type(self).__name__} cannot be saved in the {fmt} format "
                             f"(asked for by {filepath!r}): it has no Keras config; "
                             f"{SAVE_INSTEAD}")
        super().save(filepath, overwrite=overwrite, save_format=save_format, **kwargs)

    def get_config(self):
        """Raises NotImplementedError: see the class docstring (the SavedModel format does
        without a config; ``keras.models.save_model(model, "m.keras")`` fails with this)."""
        raise NotImplementedError(f"{type(self).__name__} has no Keras config, so it cannot "
                                  f"be saved in the .keras or .h5 format; {SAVE_INSTEAD}")


class _Tower(SavedModelOnly, keras.Model):
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
        self._set_raw_save_spec()

    def build(self, input_shape):
        if not self.fm.built:  # a tower called before its FM: the FM makes its tables
            self.fm.build(None)
        super().build(input_shape)

    def input_signature(self) -> dict[str, tf.TensorSpec]:
        """The raw inputs of this side: `tf.TensorSpec`s of shape [None] by feature name."""
        return self.encoder.input_signature(self.feature_names)

    _raw_input_signature = input_signature

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
