"""The ModelServerConfig file: entries added once, pinned and unpinned, written atomically."""

import os

import pytest

from fm_keras.errors import ConfigError
from fm_keras.pipeline.serving_config import (ensure_models, pinned_elsewhere, served_policy,
                                              set_version)
from fm_keras.serving.config import load_model_server_config


def test_ensure_pin_and_unpin(tmp_path):
    path = str(tmp_path / "models.config")
    (tmp_path / "other.txt").write_text("")
    with open(path, "w") as f:  # an entry someone else owns is kept as it is
        f.write('model_config_list { config { name: "other" base_path: "/srv/other" '
                'model_platform: "tensorflow" } }\n')
    ensure_models(path, str(tmp_path), ["ctr", "ctr_recall"])
    ensure_models(path, str(tmp_path), ["ctr"])  # no duplicate
    config = load_model_server_config(path)  # what the server parses
    assert [m.name for m in config.model_config_list.config] == ["other", "ctr", "ctr_recall"]
    assert served_policy(path, "ctr") == {"policy": "latest", "versions": [],
                                          "base_path": str(tmp_path / "ctr")}
    set_version(path, ["ctr", "ctr_recall"], 3)
    assert served_policy(path, "ctr")["policy"] == "specific"
    assert served_policy(path, "ctr_recall")["versions"] == [3]
    set_version(path, ["ctr"], None)
    assert served_policy(path, "ctr")["policy"] == "latest"
    assert served_policy(path, "other")["base_path"] == "/srv/other"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_pinning_an_unknown_model_is_an_error(tmp_path):
    path = str(tmp_path / "models.config")
    ensure_models(path, str(tmp_path), ["ctr"])
    with pytest.raises(ConfigError, match="lists no model 'ranker'"):
        set_version(path, ["ranker"], 1)
    assert served_policy(str(tmp_path / "missing.config"), "ctr") is None


def test_a_push_to_a_pinned_model_is_told_it_will_not_serve(tmp_path):
    path = str(tmp_path / "models.config")
    ensure_models(path, str(tmp_path), ["ctr"])
    assert pinned_elsewhere(path, "ctr", 3) is None  # latest: it serves
    set_version(path, ["ctr"], 1)
    assert pinned_elsewhere(path, "ctr", 1) is None
    assert pinned_elsewhere(path, "ctr", 3) == (
        f"ctr is pinned to versions [1] in {path}: version 3 is on disk but does not serve "
        "until 'fm-keras pipeline rollback --to latest'")
    assert pinned_elsewhere(str(tmp_path / "missing.config"), "ctr", 3) is None
