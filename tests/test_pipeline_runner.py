"""The pipeline end to end against a running ``fm-keras serve`` (the issue's must-shows 1, 2, 3,
5, 6).

The tests of this module run in order on one pipeline: span 1 (fixture) pushes version 1,
span 2 pushes 2 while traffic flows, rollback and forward, a cached rerun, a span with
shuffled labels and a span with a breaking schema change.
"""

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from fm_keras.cli import main
from fm_keras.pipeline.config import load_pipeline
from fm_keras.pipeline.runner import run_pipeline

ROW = {"user_id": ["u1", "u2"], "user_segment": ["s1", "s2"], "item_id": ["i1", "i2"],
       "item_category": ["c1", "c2"], "item_tags": ["t1|t2", "t3"],
       "item_price": np.array([3.0, 10.0], np.float32), "device": ["ios", "web"],
       "hour": ["1", "2"]}


class Traffic(threading.Thread):
    """Sends Predict requests without retries until stopped; records versions and failures."""

    def __init__(self, target):
        super().__init__(daemon=True)
        from fm_keras.serving.client import GrpcClient

        self.client = GrpcClient(target, timeout=10.0, retries=0)
        self.versions, self.failures = [], []
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            try:
                response = self.client.predict_response("ctr", ROW)
                self.versions.append(response.model_spec.version.value)
            except Exception as err:  # noqa: BLE001 - every failure counts
                self.failures.append(repr(err))
            time.sleep(0.02)

    def stop(self):
        self.halt.set()
        self.join(timeout=30)
        self.client.close()


@pytest.fixture(scope="module")
def setup(pipeline_logs, tmp_path_factory):
    """A pipeline of its own run on span 1 (this module pushes spans 2-4 into it), ``fm-keras
    serve`` in its own process on its models.config (polled every second), and a client
    thread sending requests to it."""
    from pipeline_testlib import first_pipeline_run

    from fm_keras.loopback import free_ports
    from fm_keras.pipeline.infra_validator import child_env

    path, first = first_pipeline_run(pipeline_logs, tmp_path_factory.mktemp("pipeline_run"))
    config = load_pipeline(path)
    port = free_ports(1)[0]
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "w+")
    server = subprocess.Popen(
        [sys.executable, "-m", "fm_keras.cli", "serve", f"--port={port}", "--host=127.0.0.1",
         f"--model_config_file={config.pusher.model_config_file}",
         "--model_config_file_poll_wait_seconds=1", "--file_system_poll_wait_seconds=1",
         "--max_num_load_retries=0"], stdout=log, stderr=subprocess.STDOUT, env=child_env())
    target = f"127.0.0.1:{port}"
    try:
        assert _wait_for(lambda: _available(target) == [1], timeout=120), _tail(log)
    except BaseException:
        server.kill()
        raise
    traffic = Traffic(target)
    traffic.start()
    yield {"path": path, "config": config, "first": first, "server": server, "traffic": traffic,
           "target": target, "times": {}, "log": log}
    traffic.stop()
    server.terminate()
    server.wait(timeout=30)
    log.close()


def _tail(log) -> str:
    log.seek(0)
    return "".join(log.readlines()[-10:])


def _available(target, name="ctr"):
    from fm_keras.pipeline.status import server_status

    status = server_status(target, name)
    if isinstance(status, str):  # not up yet, or the model is unknown
        return []
    return [s["version"] for s in status if s["state"] == "AVAILABLE"]


def _wait_for(predicate, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_first_span_pushes_version_1(setup):
    first = setup["first"]
    assert first["status"] == "pushed" and first["pushed_version"] == 1
    assert first["blessed"] is True
    assert _available(setup["target"]) == [1]
    assert _available(setup["target"], "ctr_recall") == [1]


def test_second_span_moves_server_to_2_without_failed_request(setup):
    traffic = setup["traffic"]
    assert _wait_for(lambda: len(traffic.versions) > 5)
    started = time.time()
    summary = run_pipeline(setup["config"], span=2)
    setup["times"]["span2"] = time.time() - started  # with the report, as the rerun below
    assert summary["status"] == "pushed" and summary["pushed_version"] == 2, summary
    from fm_keras.pipeline.metadata import MetadataStore

    store = MetadataStore(os.path.join(setup["config"].root, "metadata.sqlite"))
    try:
        trainer = next(x for x in store.executions(store.context(summary["run_id"])["id"])
                       if x["type"] == "trainer")
    finally:
        store.close()
    assert trainer["properties"]["warm_start"]  # from version 1's model (trainer: warm_start)
    assert _wait_for(lambda: traffic.versions[-1:] == [2])
    assert _wait_for(lambda: _available(setup["target"]) == [2])
    assert traffic.failures == []
    seen = traffic.versions
    assert set(seen) == {1, 2} and seen[0] == 1
    assert seen.index(2) > 0 and 1 not in seen[seen.index(2) + 5:]  # moved once, for good


def test_rollback_to_1_then_forward_to_2(setup, capsys):
    traffic, target = setup["traffic"], setup["target"]
    assert main(["pipeline", "rollback", "--pipeline", setup["path"], "--name", "ctr",
                 "--to", "1"]) == 0
    assert _wait_for(lambda: _available(target) == [1] and _available(target, "ctr_recall") == [1])
    assert _wait_for(lambda: traffic.versions[-1:] == [1])
    assert main(["pipeline", "status", setup["path"], "--server", target]) == 0
    assert '"policy": "specific"' in capsys.readouterr().out
    assert main(["pipeline", "rollback", "--pipeline", setup["path"], "--name", "ctr",
                 "--to", "latest"]) == 0
    assert _wait_for(lambda: _available(target) == [2])
    assert _wait_for(lambda: traffic.versions[-1:] == [2])
    assert traffic.failures == []


def test_rerun_with_unchanged_inputs_reuses_cached_steps(setup):
    started = time.time()
    summary = run_pipeline(setup["config"], span=2)
    seconds = time.time() - started
    assert summary["status"] == "unchanged" and summary["pushed_version"] == 2
    cached = [s["step"] for s in summary["steps"] if s["cached"]]
    assert cached == ["examplegen", "statistics", "validator", "trainer", "evaluator",
                      "infra_validator", "index_builder"]  # the recall model built and checked
    assert [s["step"] for s in summary["steps"]][-1] == "pusher"
    assert seconds < 0.25 * setup["times"]["span2"], (seconds, setup["times"])
    print(f"span 2: first run {setup['times']['span2']:.1f}s, cached rerun {seconds:.1f}s")


def test_shuffled_labels_are_not_blessed_and_not_pushed(setup):
    summary = run_pipeline(setup["config"], span=3)
    assert summary["status"] == "not_blessed" and summary["blessed"] is False
    assert any(r.startswith("min_auc") for r in summary["not_blessed_reasons"])
    assert summary["pushed_version"] is None
    assert [s["step"] for s in summary["steps"]][-1] == "evaluator"
    assert sorted(os.listdir(os.path.join(setup["config"].pusher.base, "ctr"))) == ["1", "2"]
    assert _available(setup["target"]) == [2]
    report = open(summary["report"], encoding="utf-8").read()
    assert "not blessed: min_auc" in report and "The served model is unchanged" in report
    assert setup["traffic"].failures == []


def test_breaking_schema_change_fails_validation_before_training(setup, capsys):
    summary = run_pipeline(setup["config"], span=4)
    assert summary["status"] == "invalid_data"
    # why, in the summary (stdout's JSON) and on stderr, not only in the report
    assert ("missing_column", "item_id", "fail") in [
        (a["kind"], a["column"], a["severity"]) for a in summary["anomalies"]]
    assert "validator: fail: missing_column (item_id): column 'item_id'" in \
        capsys.readouterr().err
    steps = [s["step"] for s in summary["steps"]]
    assert steps == ["examplegen", "statistics", "validator"]
    report = open(summary["report"], encoding="utf-8").read()
    assert "missing_column on item_id" in report
    assert _available(setup["target"]) == [2]


def test_one_run_at_a_time(setup):
    from fm_keras.errors import ConfigError
    from fm_keras.pipeline.runner import pipeline_lock

    with pipeline_lock(setup["config"].root):
        with pytest.raises(ConfigError, match="another pipeline run holds the lock"):
            run_pipeline(setup["config"], span=2)


def test_rolling_window_of_spans_in_the_run_and_its_cache_key(tmp_path, capsys):
    """data.spans: 3 on spans 1 and 3 (2 missing): ExampleGen reads both, the summary and the
    log say span 2 is missing; a rerun is cached, a late span 2 or a new span 4 is not."""
    import json

    from pipeline_testlib import window_pipeline, write_small_span

    config = load_pipeline(window_pipeline(tmp_path, (1, 3), window=3))
    logs = tmp_path / "logs"

    def examplegen(span=None):
        summary = run_pipeline(config, span=span, steps=("examplegen",), report=False)
        cached = summary["steps"][0]["cached"]
        counts = None if cached else json.load(open(os.path.join(
            config.root, "runs", summary["run_id"], "examplegen", "counts.json")))
        return summary, cached, counts

    summary, cached, counts = examplegen()
    assert summary["span"] == 3 and not cached
    assert summary["window"] == {"first": 1, "last": 3, "spans": [1, 3], "missing": [2],
                                 "text": "spans 1-3 (span 2 missing)"}
    assert summary["warnings"] == ["rolling window of spans 1-3 (span 2 missing): reading "
                                   "spans 1, 3"]
    assert "on spans 1-3 (span 2 missing)" in capsys.readouterr().err
    assert counts["rows_read"] == 80 and len(counts["files"]) == 2
    run = json.load(open(os.path.join(config.root, "runs", summary["run_id"], "run.json")))
    assert run["window"]["missing"] == [2]
    assert examplegen()[1]  # same window, same files: cached
    write_small_span(logs, 2)  # span 2 arrives late
    summary, cached, counts = examplegen(span=3)
    assert not cached and summary["window"]["spans"] == [1, 2, 3]
    assert counts["rows_read"] == 120 and summary["warnings"] == []
    assert examplegen(span=3)[1]
    write_small_span(logs, 4)  # a new span: the window moves
    summary, cached, counts = examplegen()
    assert summary["span"] == 4 and not cached
    assert summary["window"]["text"] == "spans 2-4" and counts["rows_read"] == 120


def _step_states(config, run_id):
    from fm_keras.pipeline.metadata import MetadataStore

    store = MetadataStore(os.path.join(config.root, "metadata.sqlite"))
    try:
        context = store.context(run_id)
        return ([(x["type"], x["state"]) for x in store.executions(context["id"])],
                context["properties"])
    finally:
        store.close()


def test_a_retry_runs_the_failed_step_again_and_not_the_finished_ones(tmp_path, monkeypatch,
                                                                      capsys):
    """Regression: an Airflow retry (same run id, same step) of a step that failed printed
    'run airflow-1 has ended (failed); not running statistics' and exited 1."""
    from pipeline_testlib import window_pipeline

    from fm_keras.pipeline import statistics

    config = load_pipeline(window_pipeline(tmp_path, (1,), window=1))
    run = {"run_id": "airflow-1", "report": False}
    assert run_pipeline(config, steps=("examplegen",), **run)["status"] == "open"
    real = statistics.generate_statistics

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(statistics, "generate_statistics", disk_full)
    with pytest.raises(OSError):
        run_pipeline(config, steps=("statistics",), **run)
    assert _step_states(config, "airflow-1")[1]["status"] == "failed"
    monkeypatch.setattr(statistics, "generate_statistics", real)
    capsys.readouterr()
    summary = run_pipeline(config, steps=("examplegen", "statistics"), **run)
    assert summary["status"] == "open" and summary["error"] is None
    assert "ended (failed) in statistics: retrying statistics" in capsys.readouterr().err
    states, properties = _step_states(config, "airflow-1")
    assert states == [("examplegen", "COMPLETE"), ("statistics", "FAILED"),
                      ("statistics", "COMPLETE")]  # examplegen was not redone
    assert properties["pid"] == os.getpid()
    assert run_pipeline(config, steps=("validator",), **run)["status"] == "open"


def test_a_retry_after_sigkill_runs_the_abandoned_step_again(tmp_path):
    """A SIGKILLed step leaves its execution and run RUNNING; the retry marks them ABANDONED
    and runs the step again."""
    from pipeline_testlib import window_pipeline

    from fm_keras.pipeline.metadata import MetadataStore

    config = load_pipeline(window_pipeline(tmp_path, (1,), window=1))
    run_pipeline(config, run_id="airflow-2", steps=("examplegen",), report=False)
    store = MetadataStore(os.path.join(config.root, "metadata.sqlite"))
    try:  # what `kill -9` during the statistics step leaves in the store
        context_id = store.context("airflow-2")["id"]
        store.start_execution("statistics", context_id, "key", {}, {})
        store.update_context(context_id, status="running")
    finally:
        store.close()
    summary = run_pipeline(config, run_id="airflow-2", steps=("statistics",), report=False)
    assert summary["status"] == "open"
    assert _step_states(config, "airflow-2")[0] == [
        ("examplegen", "COMPLETE"), ("statistics", "ABANDONED"), ("statistics", "COMPLETE")]


@pytest.mark.parametrize("ended,step", [("not_blessed", "statistics"), ("failed", "validator"),
                                        ("invalid_data", "statistics")])
def test_a_run_that_ended_otherwise_still_refuses_its_steps(tmp_path, capsys, ended, step):
    """Only the step that failed is retried: an outcome (not blessed, anomalies) ends the run,
    and a failed run does not run a step other than the one that failed."""
    from pipeline_testlib import window_pipeline

    from fm_keras.pipeline.metadata import MetadataStore

    config = load_pipeline(window_pipeline(tmp_path, (1,), window=1))
    run_pipeline(config, run_id="r", steps=("examplegen",), report=False)
    store = MetadataStore(os.path.join(config.root, "metadata.sqlite"))
    try:
        context_id = store.context("r")["id"]
        execution = store.start_execution("statistics", context_id, "key", {}, {})
        store.finish_execution(execution, "FAILED" if ended == "failed" else "COMPLETE", {}, {})
        store.update_context(context_id, status=ended)
    finally:
        store.close()
    capsys.readouterr()
    summary = run_pipeline(config, run_id="r", steps=(step,), report=False)
    assert summary["status"] == ended
    assert f"run r has ended ({ended}); not running {step}" in capsys.readouterr().err
    assert len(_step_states(config, "r")[0]) == 2


def test_a_retry_of_a_trainer_terminated_during_its_export_trains_again(tmp_path, monkeypatch,
                                                                        capsys):
    """Regression (trial): a SIGTERM during the trainer's export left a finished training run
    in ``runs/<id>/trainer/run``; every retry of the step (same run id) then failed with
    '...trainer/run: holds a finished run; choose another --out or delete it', exit 2. The
    retry removes what the failed attempt left in the step's directory and trains again."""
    from pipeline_testlib import window_pipeline

    from fm_keras import export
    from fm_keras.errors import Terminated

    config = load_pipeline(window_pipeline(tmp_path, (1,), window=1))
    run = {"run_id": "airflow-3", "report": False}
    summary = run_pipeline(config, steps=("examplegen", "statistics", "validator"), **run)
    assert summary["status"] == "open"
    step_dir = os.path.join(config.root, "runs", "airflow-3", "trainer")
    real = export.export_run

    def terminated(run_dir, *args, **kwargs):  # SIGTERM once training has finished
        assert os.path.exists(os.path.join(run_dir, "run.json"))
        raise Terminated()

    monkeypatch.setattr(export, "export_run", terminated)
    with pytest.raises(Terminated):
        run_pipeline(config, steps=("trainer",), **run)
    assert _step_states(config, "airflow-3")[1]["status"] == "failed"
    assert os.listdir(step_dir) == ["run"]  # the finished training run, no candidate
    monkeypatch.setattr(export, "export_run", real)
    capsys.readouterr()
    summary = run_pipeline(config, steps=("trainer",), **run)
    assert summary["status"] == "open" and summary["error"] is None
    err = capsys.readouterr().err
    assert "ended (failed) in trainer: retrying trainer" in err
    assert f"trainer: removed the partial outputs of an earlier attempt ({step_dir})" in err
    assert _step_states(config, "airflow-3")[0][-2:] == [("trainer", "FAILED"),
                                                          ("trainer", "COMPLETE")]
    assert sorted(os.listdir(step_dir)) == ["candidate", "run"]
    assert os.path.exists(os.path.join(step_dir, "candidate", "1", "saved_model.pb"))
