"""fm-keras: Factorization Machines for CTR ranking and vector recall in TensorFlow/Keras.

TensorFlow Recommenders needs Keras 2, so ``TF_USE_LEGACY_KERAS=1`` must be in the environment
before TensorFlow is first imported. Importing ``fm_keras`` first sets it; importing TensorFlow
first (without the variable) makes the first TensorFlow-using fm_keras module fail with an
ImportError that says how to fix it (see ``fm_keras._tf``).

Heavy modules are imported lazily so that ``fm-keras synth`` and ``--help`` stay fast.
"""

from __future__ import annotations

import importlib
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

__version__ = "0.1.0"

_LAZY = {
    "FactorizationMachine": "fm_keras.layers",
    "FeatureEncoder": "fm_keras.features",
    "FMModel": "fm_keras.model",
    "ExperimentConfig": "fm_keras.config",
    "FeatureConfig": "fm_keras.config",
    "load_experiment": "fm_keras.config",
    "train": "fm_keras.training",
    "load_run": "fm_keras.runs",
    "evaluate_run": "fm_keras.evaluation",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fm_keras' has no attribute {name!r}")
