"""A run's FM weights checkpoint (``model/weights``) read into a `FactorizationMachine`, in the
layer's layout (one ``table`` row per id) or in the two-table layout of runs written before it,
and the check that refuses the older layout where it cannot be converted (``--resume``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fm_keras._tf import tf
from fm_keras.errors import RunError

if TYPE_CHECKING:
    from fm_keras.layers import FactorizationMachine

_LAYER_VARIABLE = "fm/{}/.ATTRIBUTES/VARIABLE_VALUE"  # a checkpoint key of the layer's weight


def _two_table_layout(names) -> bool:
    """Whether checkpoint keys `names` hold the FM as ``fm/linear`` and ``fm/embeddings``, as
    fm-keras wrote it before each id's weights became one row of ``fm/table``."""
    return (_LAYER_VARIABLE.format("embeddings") in names
            and _LAYER_VARIABLE.format("table") not in names)


def require_table_layout(checkpoint: str, use: str) -> None:
    """Raises `RunError` if `checkpoint` holds the FM (and the optimizer slots of each
    table) in the two-table layout: such a checkpoint cannot be resumed into this layer
    (its weights alone can be read, `read_weights`).

    Args:
        checkpoint: a TensorFlow checkpoint path (prefix).
        use: what reads it, for the message (``--resume``).
    """
    try:
        names = {name for name, _ in tf.train.list_variables(checkpoint)}
    except (tf.errors.NotFoundError, ValueError):
        return  # no checkpoint there: the reader reports that in its own terms
    if _two_table_layout(names):
        raise RunError(f"{checkpoint}: fm/linear, fm/embeddings: written by an older fm-keras "
                       "whose FM kept linear weights and factors in two tables (now one, "
                       f"fm/table); {use} cannot read it: train a new run without {use}")


def read_weights(fm: FactorizationMachine, checkpoint: str, partial: bool = False) -> None:
    """Reads a run's weights checkpoint (``model/weights``, ``tf.train.Checkpoint(fm=...)``)
    into `fm`, in this layout or in the two-table layout of runs written before the per-id
    ``table`` (``fm/linear`` [ids], ``fm/embeddings`` [ids, k] and, with ``l2_prior``,
    ``fm/prior_linear`` / ``fm/prior_embeddings`` [ids]), which it converts: old finished
    runs still evaluate, export and warm-start. (Their optimizer slots are another layout
    too; `require_table_layout` refuses them for ``--resume``.)

    Args:
        fm: a built layer of the checkpoint's shapes.
        checkpoint: the checkpoint path (prefix).
        partial: allow `fm` variables the checkpoint lacks (a warm start); else every one of
            them must be there.

    Raises:
        tf.errors.NotFoundError: no checkpoint at `checkpoint`.
        ValueError: a shape differs from `fm`'s, or (not `partial`) a variable is missing.
    """
    names = {name for name, _ in tf.train.list_variables(checkpoint)}
    if not _two_table_layout(names):
        status = tf.train.Checkpoint(fm=fm).read(checkpoint)
        status.expect_partial() if partial else status.assert_existing_objects_matched()
        return

    def old(name):
        return tf.train.load_variable(checkpoint, _LAYER_VARIABLE.format(name))

    fm.bias.assign(old("bias"))
    fm.assign_parameters(linear=old("linear"), embeddings=old("embeddings"))
    if fm.l2_prior:
        if _LAYER_VARIABLE.format("prior_linear") in names:
            fm.prior.assign(np.stack([old("prior_linear"), old("prior_embeddings")], axis=1))
        elif not partial:
            raise ValueError(f"{checkpoint}: holds no fm/prior_linear, fm/prior_embeddings for "
                             "this model's l2_prior")
