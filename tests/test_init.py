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


def test_xla_notice_is_dropped_and_the_rest_of_stderr_kept():
    """XLA's first compilation logs two absl lines ("WARNING: All log messages before
    absl::InitializeLog() ..." and "Compiled cluster using XLA!") that TF_CPP_MIN_LOG_LEVEL
    does not silence; `without_xla_notice` drops them and passes every other line through."""
    proc = _python("\n".join([
        "import os, sys",
        "import fm_keras._tf as t",
        "f = t.tf.function(lambda x: x * 2, jit_compile=True)",
        "with t.without_xla_notice():",
        "    print('python line', file=sys.stderr)",
        "    f(t.tf.ones(3))",
        "    os.write(2, b'c line\\n')",
        "print('seen', t._xla_notice_seen)",  # the notice came, inside the block
        "print('after', file=sys.stderr)"]))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "seen True"
    assert "Compiled cluster using XLA" not in proc.stderr
    assert "absl::InitializeLog" not in proc.stderr
    assert [line for line in proc.stderr.splitlines()
            if line in ("python line", "c line", "after")] == ["python line", "c line", "after"]
