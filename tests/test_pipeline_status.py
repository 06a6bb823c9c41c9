"""Rollback checks the version exists and moves the recall model along; status lists runs."""

import os

import pytest

from fm_keras.errors import ConfigError
from fm_keras.pipeline.serving_config import ensure_models, served_policy, write_config
from fm_keras.pipeline.status import rollback, status


@pytest.fixture
def served(tmp_path):
    for name, versions in (("ctr", (1, 2, 3)), ("ctr_recall", (1, 3))):
        for v in versions:
            os.makedirs(tmp_path / name / str(v))
    path = str(tmp_path / "models.config")
    ensure_models(path, str(tmp_path), ["ctr", "ctr_recall"])
    return path


def test_rollback_pins_both_models_and_forward_unpins(served):
    assert rollback(served, "ctr", "1")["models"] == ["ctr", "ctr_recall"]
    assert served_policy(served, "ctr")["versions"] == [1]
    assert served_policy(served, "ctr_recall")["versions"] == [1]
    result = rollback(served, "ctr", "2")  # no recall version 2: the recall model stays
    assert result["models"] == ["ctr"]
    assert served_policy(served, "ctr_recall")["versions"] == [1]
    rollback(served, "ctr", "latest")
    assert served_policy(served, "ctr")["policy"] == "latest"
    assert served_policy(served, "ctr_recall")["policy"] == "latest"


def test_rollback_removes_labels_of_versions_that_no_longer_serve(served):
    from fm_keras.serving.config import load_model_server_config

    config = load_model_server_config(served)
    ctr = config.model_config_list.config[0]
    ctr.model_version_policy.specific.versions.extend([2, 3])  # an A/B test's hand edit
    ctr.version_labels["control"], ctr.version_labels["treatment"] = 2, 3
    write_config(served, config)
    result = rollback(served, "ctr", "latest")
    assert [w.split(": ", 2)[2] for w in result["warnings"]] == [
        "version label 'control' removed: it named version 2, which the new version policy "
        "does not serve (it serves [3])"]
    assert dict(load_model_server_config(served).model_config_list.config[0].version_labels) \
        == {"treatment": 3}


@pytest.mark.parametrize("name,to,message", [
    ("ctr", "7", "--to 7: .* does not exist; versions on disk: \\[1, 2, 3\\]"),
    ("ctr", "last", "--to must be a version number or 'latest'"),
    ("ranker", "1", "lists no model 'ranker'"),
])
def test_bad_rollback(served, name, to, message):
    with pytest.raises(ConfigError, match=message):
        rollback(served, name, to)


def test_status_lists_runs_and_serving(pipeline_first_run):
    from fm_keras.pipeline.config import load_pipeline

    path, summary = pipeline_first_run
    result = status(load_pipeline(path))
    first = next(r for r in result["runs"] if r["run_id"] == summary["run_id"])
    assert first["status"] == "pushed" and first["pushed_version"] == 1 and first["blessed"]
    assert 1 in result["serving"]["ctr"]["on_disk"]
    assert result["serving"]["ctr_recall"]["policy"] in ("latest", "specific")


def test_status_shows_the_rolling_window_of_spans(tmp_path):
    from pipeline_testlib import window_pipeline

    from fm_keras.pipeline.config import load_pipeline
    from fm_keras.pipeline.runner import run_pipeline

    config = load_pipeline(window_pipeline(tmp_path, (2, 3, 5), window=3))
    run_pipeline(config, steps=("examplegen",), report=False)
    (run,) = status(config)["runs"]
    assert run["span"] == 5
    assert (run["window"]["first"], run["window"]["last"]) == (3, 5)
    assert run["window"]["spans"] == [3, 5] and run["window"]["missing"] == [4]
    assert run["window"]["text"] == "spans 3-5 (span 4 missing)"


def test_run_summary_of_a_run_recorded_before_windows():
    from fm_keras.pipeline.status import run_summary

    class Store:  # a run context written before data.spans: no "window" property
        def executions(self, context_id):
            return []

    summary = run_summary(Store(), {"id": 1, "name": "r", "properties": {"span": 7}})
    assert summary["window"] == {"first": 7, "last": 7, "spans": [7], "missing": [],
                                 "text": "span 7"}
    assert summary["warnings"] == []


def test_run_summary_carries_the_trainers_warnings():
    """Regression (trial): "still improving at the last epoch" never reached the summary."""
    from fm_keras.pipeline.status import run_summary

    cap = "still improving at the last epoch (3); raise training.epochs (now 3)"

    class Store:
        def executions(self, context_id):
            return [{"type": "trainer", "state": "COMPLETE",
                     "properties": {"seconds": 1.0, "warnings": [cap]}},
                    {"type": "trainer", "state": "FAILED",
                     "properties": {"warnings": ["not this one"]}}]

    summary = run_summary(Store(), {"id": 1, "name": "r", "properties": {"span": 1}})
    assert summary["warnings"] == [f"trainer: {cap}"]
