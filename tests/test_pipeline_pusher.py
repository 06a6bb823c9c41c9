"""Pusher: atomic versions, skip of a model that is a version already, a push killed midway
(the issue's must-show 4), and the ranking and recall pushes as a pair."""

import os
import subprocess
import sys

import pytest
from pipeline_testlib import write_pipeline_yaml
from fm_keras import fsutil
from fm_keras.errors import ExportError
from fm_keras.pipeline.pusher import (METADATA, TEMP_PREFIX, push, push_recall,
                                      pushed_version)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_export(path):
    os.makedirs(os.path.join(path, "variables"))
    os.makedirs(os.path.join(path, "assets.extra"))
    with open(os.path.join(path, "saved_model.pb"), "wb") as f:
        f.write(b"graph")
    with open(os.path.join(path, "variables", "variables.index"), "wb") as f:
        f.write(b"weights")
    fsutil.write_json(os.path.join(path, METADATA), {"name": "candidate", "version": 1})
    return str(path)


def test_push_writes_next_version_and_skips_a_model_pushed_already(tmp_path):
    export = _fake_export(tmp_path / "candidate" / "1")
    base = tmp_path / "saved_models"
    os.makedirs(base / "ctr" / "3")  # an older version not made by the pipeline
    os.makedirs(base / "ctr" / f"{TEMP_PREFIX}left-by-a-killed-push")
    first = push(export, "fp-a", str(base), "ctr", "run-1")
    assert first["pushed"] and first["version"] == 4
    assert first["removed_partial"] == [str(base / "ctr" / f"{TEMP_PREFIX}left-by-a-killed-push")]
    meta = fsutil.read_json(os.path.join(first["path"], METADATA))
    assert (meta["name"], meta["version"]) == ("ctr", 4)
    assert meta["pipeline"]["model_fingerprint"] == "fp-a"
    assert open(os.path.join(first["path"], "variables", "variables.index"), "rb").read() == b"weights"
    again = push(export, "fp-a", str(base), "ctr", "run-2")
    assert not again["pushed"] and again["version"] == 4 and "version 4 already" in again["reason"]
    other = push(export, "fp-b", str(base), "ctr", "run-3")
    assert other["pushed"] and other["version"] == 5
    assert pushed_version(str(base / "ctr"), "fp-b") == 5
    assert sorted(os.listdir(base / "ctr")) == ["3", "4", "5"]


def test_killed_push_leaves_no_partial_version_and_next_run_recovers(pipeline_first_run,
                                                                    pipeline_logs, tmp_path):
    from fm_keras.pipeline.config import load_pipeline
    from fm_keras.pipeline.metadata import MetadataStore
    from fm_keras.pipeline.runner import run_pipeline

    first_yaml, _ = pipeline_first_run
    first = load_pipeline(first_yaml)
    base = tmp_path / "saved_models"
    # Same pipeline root (metadata and cache) as the first run, another serving target: every
    # step up to the push is cached, so the kill lands in the push quickly.
    path = write_pipeline_yaml(tmp_path / "pipeline.yaml", pipeline_logs, first.root, base)
    proc = _run_killed(path, "1")
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert "pusher: running" in proc.stderr
    left = os.listdir(base / "ctr")
    assert not [d for d in left if d.isdigit()], left
    assert [d for d in left if d.startswith(TEMP_PREFIX)], left
    assert not os.path.exists(base / "models.config")  # serving was never pointed at it

    summary = run_pipeline(load_pipeline(path), span=1)
    assert summary["status"] == "pushed" and summary["pushed_version"] == 1
    assert sorted(os.listdir(base / "ctr")) == ["1"]
    assert sorted(os.listdir(base / "ctr_recall")) == ["1"]
    assert os.path.exists(base / "ctr" / "1" / "variables")
    store = MetadataStore(os.path.join(first.root, "metadata.sqlite"))
    try:
        statuses = [c["properties"]["status"] for c in store.contexts("run")]
    finally:
        store.close()
    assert "abandoned" in statuses and "running" not in statuses


def _run_killed(path, hook):
    env = {**os.environ, "FM_KERAS_PIPELINE_KILL_DURING_PUSH": hook,
           "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-m", "fm_keras.cli", "pipeline", "run", path,
                           "--span", "1"], env=env, capture_output=True, text=True, timeout=300)


def test_run_killed_between_ranking_and_recall_push_is_completed_and_reported_pushed(
        pipeline_first_run, pipeline_logs, tmp_path):
    """Regression: a kill after the ranking push left ctr vN beside ctr_recall vN-1, and the
    rerun that pushed the missing recall model reported ``unchanged``."""
    from fm_keras.pipeline.config import load_pipeline
    from fm_keras.pipeline.runner import run_pipeline
    from fm_keras.pipeline.serving_config import served_policy

    first = load_pipeline(pipeline_first_run[0])
    base = tmp_path / "saved_models"
    path = write_pipeline_yaml(tmp_path / "pipeline.yaml", pipeline_logs, first.root, base)
    proc = _run_killed(path, "recall")
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert proc.stderr.index("index_builder: ") < proc.stderr.index("pusher: running")
    assert sorted(os.listdir(base / "ctr")) == ["1"]
    assert not os.path.exists(base / "ctr_recall")

    config = load_pipeline(path)
    summary = run_pipeline(config, span=1)
    assert summary["status"] == "pushed" and summary["pushed_version"] == 1, summary
    assert sorted(os.listdir(base / "ctr")) == ["1"]
    assert sorted(os.listdir(base / "ctr_recall")) == ["1"]
    meta = fsutil.read_json(os.path.join(base, "ctr_recall", "1", METADATA))
    assert meta["ranking_model"] == os.path.abspath(base / "ctr" / "1")
    for name in ("ctr", "ctr_recall"):
        assert served_policy(config.pusher.model_config_file, name)["policy"] == "latest"
    again = run_pipeline(config, span=1)
    assert again["status"] == "unchanged" and again["pushed_version"] == 1


def test_push_removes_a_version_label_on_the_version_it_unloads_and_reports_it(
        pipeline_first_run, pipeline_logs, tmp_path):
    """Regression: after an A/B test's labels and a rollback to latest (treatment -> 2 left),
    a push of version 3 under `latest` unloaded 2 and left the label in models.config, which
    TF Serving rejects at every config poll; no warning anywhere."""
    from fm_keras.pipeline.config import load_pipeline
    from fm_keras.pipeline.runner import run_pipeline
    from fm_keras.pipeline.serving_config import served_versions
    from fm_keras.serving.config import load_model_server_config

    first = load_pipeline(pipeline_first_run[0])
    base = tmp_path / "saved_models"
    for name in ("ctr", "ctr_recall"):
        for v in (1, 2):
            os.makedirs(base / name / str(v))  # older versions; 2 serves under latest
    served = base / "models.config"
    served.write_text(
        f'model_config_list {{ config {{ name: "ctr" base_path: "{base / "ctr"}" '
        'model_platform: "tensorflow" model_version_policy { latest { num_versions: 1 } } '
        'version_labels { key: "treatment" value: 2 } } '
        f'config {{ name: "ctr_recall" base_path: "{base / "ctr_recall"}" '
        'model_platform: "tensorflow" model_version_policy { latest { num_versions: 1 } } } }\n')
    path = write_pipeline_yaml(tmp_path / "pipeline.yaml", pipeline_logs, first.root, base)
    summary = run_pipeline(load_pipeline(path), span=1)
    assert summary["status"] == "pushed" and summary["pushed_version"] == 3, summary
    assert served_versions(str(served), "ctr") == [3]
    ctr = load_model_server_config(str(served)).model_config_list.config[0]
    assert dict(ctr.version_labels) == {}  # every label names a served version (none is left)
    warning = (f"{served}: model 'ctr': version label 'treatment' removed: it named version 2, "
               "which its version policy no longer serves (it serves [3])")
    assert warning in summary["warnings"], summary["warnings"]


def test_push_recall_skips_an_existing_version_and_removes_partial_pushes(tmp_path):
    staged = _fake_export(tmp_path / "staging" / "ctr_recall" / "1")
    base = tmp_path / "saved_models"
    os.makedirs(base / "ctr_recall" / f"{TEMP_PREFIX}killed")
    first = push_recall(staged, str(base), "ctr_recall", 3, str(base / "ctr" / "3"), "run-1")
    assert first["pushed"] and first["path"] == str(base / "ctr_recall" / "3")
    assert first["removed_partial"] == [str(base / "ctr_recall" / f"{TEMP_PREFIX}killed")]
    meta = fsutil.read_json(os.path.join(first["path"], METADATA))
    assert (meta["name"], meta["version"], meta["ranking_version"]) == ("ctr_recall", 3, 3)
    stamp = os.stat(os.path.join(first["path"], "saved_model.pb")).st_mtime_ns
    again = push_recall(staged, str(base), "ctr_recall", 3, str(base / "ctr" / "3"), "run-2")
    assert not again["pushed"] and "version 3 exists already" in again["reason"]
    assert os.stat(os.path.join(first["path"], "saved_model.pb")).st_mtime_ns == stamp
    assert sorted(os.listdir(base / "ctr_recall")) == ["3"]


def test_pushed_version_finds_only_this_model(tmp_path):
    export = _fake_export(tmp_path / "candidate" / "1")
    push(export, "fp-x", str(tmp_path / "base"), "ctr", "run")
    assert pushed_version(str(tmp_path / "base" / "ctr"), "fp-x") == 1
    assert pushed_version(str(tmp_path / "base" / "ctr"), "fp-y") is None
    assert pushed_version(str(tmp_path / "missing"), "fp-x") is None


def test_zero_padded_version_directories_are_their_versions(tmp_path):
    """A version directory named ``00000003`` (as TF Serving names them; the server loads it
    as version 3) is found by `pushed_version` and is the version `push_recall` would write."""
    base = tmp_path / "saved_models"
    padded = _fake_export(base / "ctr" / "00000003")
    fsutil.write_json(os.path.join(padded, METADATA), {"pipeline": {"model_fingerprint": "fp"}})
    assert pushed_version(str(base / "ctr"), "fp") == 3
    os.makedirs(base / "ctr_recall" / "00000003")
    staged = _fake_export(tmp_path / "staging" / "ctr_recall" / "1")
    result = push_recall(staged, str(base), "ctr_recall", 3, padded, "run-1")
    assert not result["pushed"] and result["path"] == str(base / "ctr_recall" / "00000003")
    assert sorted(os.listdir(base / "ctr_recall")) == ["00000003"]


def test_push_refuses_a_newer_export_format(tmp_path):
    export = _fake_export(tmp_path / "candidate" / "1")
    fsutil.write_json(os.path.join(export, METADATA), {"format_version": 99,
                                                       "versions": {"fm_keras_export": "9.9.9"}})
    with pytest.raises(ExportError, match="format_version 99 .*newer than format_version 1"):
        push(export, "fp", str(tmp_path / "saved_models"), "ctr", "run")
    assert not os.path.exists(tmp_path / "saved_models" / "ctr" / "1")
