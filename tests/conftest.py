"""Test setup: Keras 2 for TFRS must be selected before TensorFlow is imported."""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def small_synth(tmp_path_factory):
    """A small synthetic CTR set (shared by tests that only need some realistic data)."""
    from fm_keras.synth import generate

    out = tmp_path_factory.mktemp("synth")
    oracle = generate(str(out), rows=20_000, seed=3)
    return out, oracle
