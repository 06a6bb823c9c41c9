"""Fingerprints and cache keys change exactly when a step's inputs do."""

from fm_keras.pipeline.cache import cache_key, fingerprint_files
from fm_keras.pipeline.metadata import Artifact


def test_fingerprint_follows_content_and_names(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("one")
    first = fingerprint_files([str(tmp_path / "d")])
    assert fingerprint_files([str(tmp_path / "d")]) == first
    (tmp_path / "d" / "a.txt").write_text("two")
    assert fingerprint_files([str(tmp_path / "d")]) != first
    (tmp_path / "d" / "a.txt").write_text("one")
    assert fingerprint_files([str(tmp_path / "d")]) == first
    (tmp_path / "d" / "a.txt").rename(tmp_path / "d" / "b.txt")
    assert fingerprint_files([str(tmp_path / "d")]) != first


def test_cache_key_depends_on_params_and_input_fingerprints():
    a = Artifact(1, "Examples", "/x", "fp-a", {})
    b = Artifact(2, "Examples", "/y", "fp-a", {})  # same content elsewhere: same key
    c = Artifact(3, "Examples", "/x", "fp-c", {})
    key = cache_key("trainer", {"epochs": 3}, {"examples": a})
    assert cache_key("trainer", {"epochs": 3}, {"examples": b}) == key
    assert cache_key("trainer", {"epochs": 3}, {"examples": c}) != key
    assert cache_key("trainer", {"epochs": 4}, {"examples": a}) != key
    assert cache_key("evaluator", {"epochs": 3}, {"examples": a}) != key
    assert cache_key("trainer", {"epochs": 3}, {"examples": a, "base_model": None}) != key
