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
        "version label 'control' removed: it named version 2, which its version policy no "
        "longer serves (it serves [3])"]
    assert dict(load_model_server_config(served).model_config_list.config[0].version_labels) \
        == {"treatment": 3}


def test_rollback_finds_zero_padded_version_directories(tmp_path):
    """As the server loads them (TF Serving's rule): ``00000002`` is version 2, for the ranking
    model and its recall model alike."""
    for name in ("ctr", "ctr_recall"):
        for directory in ("1", "00000002"):
            os.makedirs(tmp_path / name / directory)
    path = str(tmp_path / "models.config")
    ensure_models(path, str(tmp_path), ["ctr", "ctr_recall"])
    assert rollback(path, "ctr", "2")["models"] == ["ctr", "ctr_recall"]
    assert served_policy(path, "ctr_recall")["versions"] == [2]


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


def test_run_summary_carries_the_trainers_and_examplegens_warnings():
    """Regression (trials): "still improving at the last epoch" and the empty part files
    ExampleGen skipped were in the log only, never in the summary."""
    from fm_keras.pipeline.status import run_summary

    cap = "still improving at the last epoch (3); raise training.epochs (now 3)"

    class Store:
        def executions(self, context_id):
            return [{"type": "examplegen", "state": "COMPLETE",
                     "properties": {"empty_files_skipped": ["/l/span-1/p-1.csv",
                                                            "/l/span-1/p-2.csv"]}},
                    {"type": "trainer", "state": "COMPLETE",
                     "properties": {"seconds": 1.0, "warnings": [cap]}},
                    {"type": "trainer", "state": "FAILED",
                     "properties": {"warnings": ["not this one"]}}]

    summary = run_summary(Store(), {"id": 1, "name": "r", "properties": {"span": 1}})
    assert summary["warnings"] == [
        "examplegen: skipped 2 empty file(s) (0 bytes, or a header and no rows) that a pattern "
        "matches: /l/span-1/p-1.csv (and 1 more)", f"trainer: {cap}"]


def test_rollback_refuses_a_ranking_version_without_its_recall_version(served):
    """Regression: a run killed between the two pushes left ctr/2 without ctr_recall/2, and
    'rollback --name ctr --to 2' pinned ctr to 2 with ctr_recall on latest (3), no warning."""
    before = open(served).read()
    with pytest.raises(ConfigError, match=r"^--to 2: ctr_recall/2 does not exist \(.*\), so ctr "
                       r"2 would serve beside another recall version; roll back to a version "
                       r"both have \(\[1, 3\]\), or pass --force to pin ctr alone$"):
        rollback(served, "ctr", "2")
    assert open(served).read() == before
    result = rollback(served, "ctr", "2", force=True)
    assert result["models"] == ["ctr"]
    assert result["warnings"] == ["--force: ctr pinned to version 2, ctr_recall left as it is: "
                                  "ctr_recall/2 does not exist"]
    assert served_policy(served, "ctr")["versions"] == [2]
    assert served_policy(served, "ctr_recall")["policy"] == "latest"


def test_rolling_back_the_recall_model_alone_to_another_version_warns(served):
    result = rollback(served, "ctr_recall", "1")  # ctr serves 3 (latest)
    assert result["models"] == ["ctr_recall"]
    assert result["warnings"] == [
        "ctr serves version(s) [3] but ctr_recall serves [1]: candidates and scores come from "
        "different model versions; 'fm-keras pipeline rollback --name ctr --to V' pins both "
        "to one version"]
    assert rollback(served, "ctr_recall", "3")["warnings"] == []


def test_forward_to_latest_warns_when_the_newest_versions_differ(served, tmp_path):
    os.makedirs(tmp_path / "ctr" / "4")  # pushed; killed before ctr_recall/4
    rollback(served, "ctr", "3")
    (warning,) = rollback(served, "ctr", "latest")["warnings"]
    assert warning.startswith("ctr serves version(s) [4] but ctr_recall serves [3]")


def test_status_shows_the_served_version_and_flags_a_missing_recall_version(served, tmp_path):
    """Regression: with the latest policy status showed "versions": [], and a ranking version
    without its recall version went unnoticed."""
    from types import SimpleNamespace

    config = SimpleNamespace(root=str(tmp_path / "root"), name="ctr", recall_name="ctr_recall",
                             pusher=SimpleNamespace(model_config_file=served))
    result = status(config)
    assert result["serving"]["ctr"]["policy"] == "latest"
    assert result["serving"]["ctr"]["versions"] == [3]
    assert result["serving"]["ctr_recall"]["versions"] == [3]
    assert result["serving"]["ctr"]["missing_recall"] == [2]
    assert result["warnings"] == ["ctr version 2 has no ctr_recall/2: a rollback to 2 is "
                                  "refused (or pins ctr alone with --force)"]
    rollback(served, "ctr", "1")
    assert status(config)["serving"]["ctr"]["versions"] == [1]


@pytest.mark.parametrize("owner,shown", [("gone", "abandoned?"), ("alive", "running"),
                                         ("other host", "running"), ("unrecorded", "running")])
def test_status_shows_a_running_run_whose_process_is_gone_as_abandoned(tmp_path, owner, shown):
    """Regression: a SIGKILLed run showed 'running' until the next run marked it abandoned."""
    import socket
    import subprocess
    import sys

    from pipeline_testlib import window_pipeline

    from fm_keras.pipeline.config import load_pipeline
    from fm_keras.pipeline.metadata import MetadataStore
    from fm_keras.pipeline.runner import run_pipeline

    config = load_pipeline(window_pipeline(tmp_path, (1,), window=1))
    run_pipeline(config, run_id="killed", steps=("examplegen",), report=False)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    pid, host = {"gone": (gone.pid, socket.gethostname()),
                 "alive": (os.getpid(), socket.gethostname()),
                 "other host": (gone.pid, "elsewhere"), "unrecorded": (None, None)}[owner]
    store = MetadataStore(os.path.join(config.root, "metadata.sqlite"))
    try:  # what `kill -9` of the run's process leaves: status running, its pid
        store.update_context(store.context("killed")["id"], status="running", pid=pid,
                             host=host)
    finally:
        store.close()
    (run,) = status(config)["runs"]
    assert run["status"] == shown
