"""The Keras 2 guard: clear failure when TensorFlow was imported with Keras 3."""

import os
import subprocess
import sys


def _python(code, **env):
    full = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    full.update(env, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True,
                          text=True, timeout=120)


def test_keras_3_already_resolved_fails_clearly():
    proc = _python("import tensorflow as tf\ntf.keras.layers\nimport fm_keras.layers")
    assert proc.returncode != 0
    assert "set TF_USE_LEGACY_KERAS=1" in proc.stderr


def test_importing_fm_keras_first_selects_keras_2():
    proc = _python("import fm_keras.layers, tensorflow as tf; print(tf.keras.__name__)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("tf_keras")
