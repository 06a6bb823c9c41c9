"""The one place fm_keras imports TensorFlow and Keras 2 (tf-keras).

Every TensorFlow-using module does ``from fm_keras._tf import tf, keras`` so the Keras 2 check
runs once, before any layer is defined.
"""

from __future__ import annotations

import os

# tf.keras is resolved on first access from TF_USE_LEGACY_KERAS; once resolved to Keras 3
# (someone touched tf.keras, or imported keras, before fm_keras) it stays Keras 3.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import tensorflow as tf  # noqa: E402

try:
    import tf_keras as keras  # noqa: E402
except ImportError as err:  # pragma: no cover - tf-keras is a hard dependency
    raise ImportError(
        "fm_keras needs Keras 2 from the 'tf-keras' package: pip install 'tf-keras~=2.20.0'"
    ) from err

if not tf.keras.__name__.startswith("tf_keras"):
    raise ImportError(
        "fm_keras needs Keras 2, but TensorFlow was imported with Keras 3 "
        f"(tf.keras is {tf.keras.__name__!r}). TensorFlow Recommenders breaks on Keras 3 "
        "(tensorflow/recommenders#712). Fix: set TF_USE_LEGACY_KERAS=1 in the environment "
        "before the first 'import tensorflow', or import fm_keras before tensorflow."
    )

__all__ = ["tf", "keras"]
