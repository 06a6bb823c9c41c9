"""``fm-keras pipeline``: one-line errors, steps run one by one as container steps would,
and ``synth --span``."""

import json

from pipeline_testlib import write_pipeline_yaml

from fm_keras.cli import main
from fm_keras.pipeline.runner import STEPS


def test_bad_pipeline_yaml_is_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text("name: ctr\nroot: r\ndata: {input: x.csv, label: click}\n"
                    "features: []\npusher: {base: m, model_config_file: m.config}\n"
                    "evaluator: {min_auc: high}\n")
    assert main(["pipeline", "run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fm-keras: error: {path}: evaluator: min_auc: expected float, got 'high'"]
    assert main(["pipeline", "status", str(tmp_path / "missing.yaml")]) == 2
    assert "no such config file" in capsys.readouterr().err


def test_a_missing_item_catalog_is_one_line_exit_2_before_any_work(pipeline_logs, tmp_path,
                                                                    capsys):
    """Found by a new user's trial: the evaluator hit FileNotFoundError (a traceback) after
    ExampleGen, the statistics, the validator and the trainer had run."""
    data = {"input": f"{pipeline_logs}/span-{{SPAN}}/*.csv", "label": "click",
            "items": str(tmp_path / "itemz.csv")}
    path = write_pipeline_yaml(tmp_path / "p.yaml", pipeline_logs, tmp_path / "root",
                               tmp_path / "models", data=data)
    for args in (["run", path, "--span", "1"], ["step", "evaluator", path, "--run-id", "r"]):
        assert main(["pipeline", *args]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            f"fm-keras: error: {path}: data: items: {tmp_path / 'itemz.csv'}: no such file"]
    assert not (tmp_path / "root").exists()  # no run, no metadata store


def test_steps_one_by_one_with_a_run_id(pipeline_first_run, capsys):
    path, first = pipeline_first_run
    for step in STEPS:
        code = main(["pipeline", "step", step, path, "--run-id", "by-steps", "--span", "1"])
        assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    summary = json.loads(out[out.rindex('{\n  "run_id"'):])
    assert summary["run_id"] == "by-steps"
    assert [s["step"] for s in summary["steps"]] == list(STEPS)
    assert summary["status"] == "unchanged" and summary["pushed_version"] == 1
    assert main(["pipeline", "step", "pusher", path, "--run-id", "by-steps"]) == 0
    assert "run by-steps has ended (unchanged); not running pusher" in capsys.readouterr().err
    assert main(["pipeline", "step", "trainer", path, "--run-id", "fresh"]) == 2
    assert "needs 'examples', which no earlier step of this run produced" in \
        capsys.readouterr().err


def test_synth_span(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path), "--span", "3", "--rows", "2000",
                 "--schema-change"]) == 0
    assert json.loads(capsys.readouterr().out)["span"] == 3
    header = (tmp_path / "span-3" / "part-0.csv").read_text().splitlines()[0].split(",")
    assert "item" in header and "item_id" not in header
    assert (tmp_path / "items.csv").exists() and (tmp_path / "features.yaml").exists()
    assert main(["synth", "--out", str(tmp_path), "--shuffle-labels"]) == 2


def test_failed_run_is_recorded_with_a_report(pipeline_logs, tmp_path, capsys):
    data = {"input": f"{pipeline_logs}/span-{{SPAN}}/*.csv", "label": "click",
            "items": f"{pipeline_logs}/items.csv",
            "filters": [{"name": "bots", "column": "is_bot", "op": "==", "value": 1}]}
    path = write_pipeline_yaml(tmp_path / "p.yaml", pipeline_logs, tmp_path / "root",
                               tmp_path / "models", data=data)
    assert main(["pipeline", "run", path, "--span", "1"]) == 2
    out, err = capsys.readouterr()
    last = err.strip().splitlines()[-1]
    assert last.startswith("fm-keras: error: ") and "filter 'bots': missing column 'is_bot'" in last
    printed = json.loads(out)  # the summary of a failed run too, as of a finished one
    assert printed["status"] == "failed" and "\n" not in printed["error"]
    assert printed["error"].startswith("DataError: ") and "is_bot" in printed["error"]
    (run_dir,) = (tmp_path / "root" / "runs").iterdir()
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "failed" and "is_bot" in record["error"]
    assert printed["run_id"] == record["run_id"] == run_dir.name
    assert [(s["step"], s["state"]) for s in record["steps"]] == [("examplegen", "FAILED")]
    assert "is_bot" in (run_dir / "report" / "index.html").read_text()
    assert not (tmp_path / "models").exists()


def test_rollback_warns_on_stderr_for_each_label_it_removes(tmp_path, capsys):
    for v in (1, 2):
        (tmp_path / "ctr" / str(v)).mkdir(parents=True)
    path = tmp_path / "models.config"
    path.write_text(f'model_config_list {{ config {{ name: "ctr" base_path: "{tmp_path / "ctr"}" '
                    'model_version_policy { specific { versions: 1 versions: 2 } } '
                    'version_labels { key: "control" value: 1 } } }\n')
    assert main(["pipeline", "rollback", "--model_config_file", str(path), "--name", "ctr",
                 "--to", "latest"]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines()[0] == (
        f"fm-keras: pipeline: warning: {path}: model 'ctr': version label 'control' removed: "
        "it named version 1, which its version policy no longer serves (it serves [2])")
    assert json.loads(captured.out)["warnings"] == [captured.err.splitlines()[0][29:]]
    assert "version_labels" not in path.read_text()


def test_terminated_run_prints_its_summary_and_leaves_no_empty_step_dir(pipeline_logs, tmp_path,
                                                                        capsys, monkeypatch):
    """Regression: SIGTERM gave no JSON summary, ``"error": "Terminated: "`` in run.json and an
    empty directory of the step it stopped."""
    import signal

    from fm_keras.pipeline import examplegen

    def terminated(data, patterns, out_dir, lists=None, schema_columns=()):
        signal.raise_signal(signal.SIGTERM)  # as a scheduler stopping the job, mid-step
        raise AssertionError("SIGTERM did not stop the step")

    monkeypatch.setattr(examplegen, "run_examplegen", terminated)
    path = write_pipeline_yaml(tmp_path / "p.yaml", pipeline_logs, tmp_path / "root",
                               tmp_path / "models")
    def ignore(signum, frame):  # the handler in place before (without main's, a no-op)
        pass

    before = signal.signal(signal.SIGTERM, ignore)
    try:
        status = main(["pipeline", "run", path, "--span", "1"])
        assert signal.getsignal(signal.SIGTERM) is ignore
    finally:
        signal.signal(signal.SIGTERM, before)
    assert status == 128 + signal.SIGTERM
    out, err = capsys.readouterr()
    assert err.strip().splitlines()[-1] == "fm-keras: terminated"
    printed = json.loads(out)
    assert printed["status"] == "failed" and printed["error"] == "terminated by SIGTERM"
    assert [(s["step"], s["state"], s["error"]) for s in printed["steps"]] == [
        ("examplegen", "FAILED", "terminated by SIGTERM")]
    (run_dir,) = (tmp_path / "root" / "runs").iterdir()
    assert json.loads((run_dir / "run.json").read_text())["error"] == "terminated by SIGTERM"
    assert sorted(p.name for p in run_dir.iterdir()) == ["report", "run.json"]
    assert not (tmp_path / "models").exists()


def test_sigterm_after_the_run_is_recorded_exits_with_the_run(pipeline_logs, tmp_path, capsys,
                                                               monkeypatch):
    """Regression (trial): a run recorded `unchanged` exited 143 on a SIGTERM while it wrote
    its report; once run.json records the run, the job is done, as for `score`."""
    import signal

    from fm_keras.pipeline import report, runner

    monkeypatch.setattr(runner, "_execute", lambda run, steps: "unchanged")
    write = report.write_report

    def terminated_while_reporting(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)  # a scheduler's timeout at the very end
        return write(*args, **kwargs)

    monkeypatch.setattr(report, "write_report", terminated_while_reporting)
    path = write_pipeline_yaml(tmp_path / "p.yaml", pipeline_logs, tmp_path / "root",
                               tmp_path / "models")
    assert main(["pipeline", "run", path, "--span", "1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["status"] == "unchanged" and printed["report"]


def test_rollback_to_a_version_without_its_recall_version_is_one_line_exit_2(tmp_path, capsys):
    from fm_keras.pipeline.serving_config import ensure_models, served_policy

    for name, versions in (("ctr", (1, 2)), ("ctr_recall", (1,))):
        for v in versions:
            (tmp_path / name / str(v)).mkdir(parents=True)
    path = str(tmp_path / "models.config")
    ensure_models(path, str(tmp_path), ["ctr", "ctr_recall"])
    args = ["pipeline", "rollback", "--name", "ctr", "--to", "2", "--model_config_file", path]
    assert main(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("fm-keras: error: --to 2: ctr_recall/2 does not exist")
    assert line.endswith("or pass --force to pin ctr alone")
    assert served_policy(path, "ctr")["policy"] == "latest"
    assert main(args + ["--force"]) == 0
    assert "warning: --force: ctr pinned to version 2" in capsys.readouterr().err
    assert served_policy(path, "ctr")["versions"] == [2]
