"""The ModelServerConfig file: entries added once, pinned and unpinned, written atomically."""

import os

import pytest

from fm_keras.errors import ConfigError
from fm_keras.pipeline.serving_config import (drop_stale_labels, ensure_models,
                                              pinned_elsewhere, served_policy, set_version)
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


def labelled(tmp_path, versions=(1, 2, 3)):
    """ctr/1..3 on disk, ctr pinned to 1 and 3 with labels control -> 1, treatment -> 3 (an A/B
    test's hand edit); returns the config path."""
    for v in versions:
        os.makedirs(tmp_path / "ctr" / str(v))
    path = str(tmp_path / "models.config")
    with open(path, "w") as f:
        f.write(f'model_config_list {{ config {{ name: "ctr" base_path: "{tmp_path / "ctr"}" '
                'model_platform: "tensorflow" '
                'model_version_policy { specific { versions: 1 versions: 3 } } '
                'version_labels { key: "control" value: 1 } '
                'version_labels { key: "treatment" value: 3 } } }\n')
    return path


def labels(path, name="ctr"):
    config = load_model_server_config(path)
    return dict(next(m for m in config.model_config_list.config
                     if m.name == name).version_labels)


def test_back_to_latest_drops_the_labels_of_versions_it_unloads(tmp_path):
    # A label must name an available version (TF Serving): a stale one failed every config poll.
    path = labelled(tmp_path)
    warnings = set_version(path, ["ctr"], None)  # latest: version 3 serves, 1 unloads
    assert labels(path) == {"treatment": 3}
    assert warnings == [f"{path}: model 'ctr': version label 'control' removed: it named "
                        "version 1, which its version policy no longer serves (it serves [3])"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_pinning_keeps_the_label_of_the_pinned_version_only(tmp_path):
    path = labelled(tmp_path)
    warnings = set_version(path, ["ctr"], 1)
    assert labels(path) == {"control": 1}
    assert len(warnings) == 1 and "label 'treatment' removed: it named version 3" in warnings[0]
    assert set_version(path, ["ctr"], 1) == []  # nothing stale: no warning, labels kept
    assert labels(path) == {"control": 1}


def test_labels_are_left_alone_when_the_base_path_cannot_be_listed(tmp_path):
    path = labelled(tmp_path, versions=())  # no ctr/ directory at all: unknown, not empty
    warnings = set_version(path, ["ctr"], None)
    assert labels(path) == {"control": 1, "treatment": 3}
    assert len(warnings) == 1 and "version labels not checked: cannot list" in warnings[0]


def test_a_new_version_under_latest_drops_the_label_of_the_version_it_unloads(tmp_path):
    # The pusher's case: the policy stays, a new version on disk makes a label stale.
    path = labelled(tmp_path, versions=(1, 2, 3))
    set_version(path, ["ctr"], None)  # serves 3: control -> 1 removed, treatment -> 3 kept
    assert labels(path) == {"treatment": 3}
    stamp = os.stat(path).st_mtime_ns
    assert drop_stale_labels(path, ["ctr", "ctr_recall"]) == []  # nothing stale: not rewritten
    assert os.stat(path).st_mtime_ns == stamp
    os.makedirs(tmp_path / "ctr" / "4")  # a push: 4 serves, 3 unloads
    warnings = drop_stale_labels(path, ["ctr"])
    assert labels(path) == {}
    assert warnings == [f"{path}: model 'ctr': version label 'treatment' removed: it named "
                        "version 3, which its version policy no longer serves (it serves [4])"]
    assert drop_stale_labels(str(tmp_path / "missing.config"), ["ctr"]) == []
