"""The one place fm_keras imports TensorFlow and Keras 2 (tf-keras).

Every TensorFlow-using module does ``from fm_keras._tf import tf, keras`` so the Keras 2 check
runs once, before any layer is defined.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile

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

# XLA's first compilation in a process logs these two lines through absl, which
# TF_CPP_MIN_LOG_LEVEL does not govern (TF 2.20): "WARNING: All log messages before
# absl::InitializeLog() ..." and "I0000 ... Compiled cluster using XLA! ...".
_XLA_NOTICE = (b"All log messages before absl::InitializeLog() is called",
               b"Compiled cluster using XLA!")
_xla_notice_seen = False


@contextlib.contextmanager
def without_xla_notice():
    """Runs the block with file descriptor 2 on a temporary file, then writes what it got to
    stderr, less XLA's one-time notice (`_XLA_NOTICE`). Wrap a call that may be the process's
    first XLA compilation in it; once the notice was seen (it is logged once per process),
    blocks run as they are. Every other line written during the block (C++ or Python)
    reaches stderr after the block, in order."""
    global _xla_notice_seen
    if _xla_notice_seen:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable stderr: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            lines = caught.read().splitlines(keepends=True)
            kept = [line for line in lines if not any(n in line for n in _XLA_NOTICE)]
            _xla_notice_seen = _xla_notice_seen or len(kept) < len(lines)
            if kept:
                os.write(2, b"".join(kept))


__all__ = ["tf", "keras", "without_xla_notice"]
