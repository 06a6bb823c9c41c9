"""``fm-keras ab``: bad input is one line on stderr and exit 2 with nothing written;
report and assign print one JSON document."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from fm_keras.cli import main
from fm_keras.experiments.assignment import Assigner
from fm_keras.experiments.config import load_ab_experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AB_YAML = """\
name: cli-test
unit: user_id
salt: s
arms:
  - {name: naive, model: ctr, label: naive, weight: 0.5}
  - {name: cleaned, model: ctr, label: cleaned, weight: 0.5}
"""

MODELS_CONFIG = """\
model_config_list { config { name: "ctr" base_path: "/nowhere/ctr" model_platform: "tensorflow"
  version_labels { key: "naive" value: 1 } version_labels { key: "cleaned" value: 2 } } }
"""


@pytest.fixture
def files(tmp_path):
    (tmp_path / "ab.yaml").write_text(AB_YAML)
    (tmp_path / "models.config").write_text(MODELS_CONFIG)
    experiment = load_ab_experiment(tmp_path / "ab.yaml")
    units = [f"u{i}" for i in range(2000)]
    rng = np.random.default_rng(0)
    pd.DataFrame({"user_id": units, "arm": Assigner(experiment).assign(units),
                  "timestamp": 1, "impressions": 10, "clicks": rng.binomial(10, 0.1, 2000)}
                 ).to_csv(tmp_path / "events.csv", index=False)
    return tmp_path


def test_report_prints_one_json_document_and_writes_the_page(files, capsys):
    page = files / "out" / "report.html"
    assert main(["ab", "report", "--experiment", str(files / "ab.yaml"), "--events",
                 str(files / "events.csv"), "--metric", "ctr", "--html", str(page)]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["metric"] == "ctr" and result["comparisons"][0]["arm"] == "cleaned"
    assert page.exists() and "cleaned vs naive: ctr" in captured.err


def test_assign_writes_the_arm_of_each_unit(files, capsys):
    out = files / "arms.csv"
    assert main(["ab", "assign", "--experiment", str(files / "ab.yaml"), "--users",
                 str(files / "events.csv"), "--output", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["units"] == 2000
    arms = pd.read_csv(out)
    assert list(arms.columns) == ["user_id", "bucket", "arm"]


def edit(path, old, new):
    path.write_text(path.read_text().replace(old, new))


@pytest.mark.parametrize("prepare, extra, message", [
    (lambda d: edit(d / "ab.yaml", "weight: 0.5}\n  - {name: cleaned", "weight: 0.4}\n  - "
                    "{name: cleaned"), [], "ab.yaml: arms: weights sum to 0.9, not 1"),
    (lambda d: edit(d / "ab.yaml", "label: cleaned", "label: canary"),
     ["--model_config_file", "models.config"],
     "ab.yaml: arms[1] 'cleaned': label 'canary' is not a version label of model 'ctr'"),
    (lambda d: edit(d / "events.csv", "user_id,", "uid,"), [],
     "events.csv: column 'user_id' (the experiment's unit) is missing"),
    (lambda d: pd.read_csv(d / "events.csv").query("arm == 'naive'").to_csv(
        d / "events.csv", index=False), [], "arm 'cleaned' has no events"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(files, capsys, monkeypatch, prepare,
                                                         extra, message):
    prepare(files)
    monkeypatch.chdir(files)
    code = main(["ab", "report", "--experiment", "ab.yaml", "--events", "events.csv",
                 "--html", "report.html", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("fm-keras: error: ") and message in err and err.count("\n") == 1
    assert not (files / "report.html").exists()


def test_the_installed_command_exits_2_on_a_bad_experiment(files):
    edit(files / "ab.yaml", "weight: 0.5}\n  - {name: cleaned", "weight: 0.6}\n  - {name: cleaned")
    proc = subprocess.run([sys.executable, "-m", "fm_keras.cli", "ab", "assign", "--experiment",
                           str(files / "ab.yaml"), "--users", str(files / "events.csv"),
                           "--output", str(files / "arms.csv")],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1].endswith("weights sum to 1.1, not 1 (naive=0.6, "
                                                         "cleaned=0.5); make them add up to 1")
    assert not (files / "arms.csv").exists()


def test_an_undefined_lift_is_json_null_not_nan(files, capsys):
    # A control without clicks has no relative lift; json.dumps used to print NaN.
    frame = pd.read_csv(files / "events.csv")
    frame.loc[frame.arm == "naive", "clicks"] = 0
    frame.to_csv(files / "events.csv", index=False)
    assert main(["ab", "report", "--experiment", str(files / "ab.yaml"), "--events",
                 str(files / "events.csv")]) == 0
    out = capsys.readouterr().out
    (c,) = json.loads(out, parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))[
        "comparisons"]
    assert c["lift"] is None and c["ci_low"] is None and c["p_value"] < 1e-10


@pytest.mark.parametrize("html", ["events.csv/report.html", "out.html"])
def test_an_unwritable_html_path_is_one_line_exit_2(files, capsys, monkeypatch, html):
    monkeypatch.chdir(files)
    (files / "out.html").mkdir()
    code = main(["ab", "report", "--experiment", "ab.yaml", "--events", "events.csv",
                 "--html", html])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.startswith(f"fm-keras: error: {html}: --html: cannot write")
    assert captured.err.count("\n") == 1
    assert sorted(p.name for p in files.iterdir()) == ["ab.yaml", "events.csv", "models.config",
                                                       "out.html"]
    assert list((files / "out.html").iterdir()) == []


@pytest.mark.parametrize("out", ["data_dir", "events.csv"])
def test_simulate_refuses_an_out_it_would_wipe(files, capsys, monkeypatch, out):
    # --out is replaced as a whole: '--out demo/ab' used to delete the data and saved models.
    monkeypatch.chdir(files)
    (files / "data_dir").mkdir()
    (files / "data_dir" / "oracle.json").write_text("{}")
    code = main(["ab", "simulate", "--experiment", "ab.yaml", "--data", "data_dir",
                 "--out", out])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"fm-keras: error: {out}: --out: ")
    assert (files / "data_dir" / "oracle.json").read_text() == "{}"
    assert (files / "events.csv").stat().st_size > 0


@pytest.mark.parametrize("command", [
    ["ab", "assign", "--experiment", "ab.yaml", "--users", "events.csv", "--output", "events.csv"],
    ["ab", "report", "--experiment", "ab.yaml", "--events", "*.csv", "--html", "events.csv"],
])
def test_an_output_that_is_an_input_is_refused(files, capsys, monkeypatch, command):
    # The input used to be replaced by the assignment table (or the HTML page).
    monkeypatch.chdir(files)
    before = (files / "events.csv").read_bytes()
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.startswith("fm-keras: error: events.csv: --") and "is the input events.csv" in err
    assert (files / "events.csv").read_bytes() == before


def test_each_comparison_is_its_own_stderr_line(files, capsys):
    text = (files / "ab.yaml").read_text().replace("weight: 0.5}\n  - {name: cleaned",
                                                   "weight: 0.25}\n  - {name: cleaned")
    (files / "ab3.yaml").write_text(text + "  - {name: third, model: ctr, label: third, "
                                    "weight: 0.25}\n")
    experiment = load_ab_experiment(files / "ab3.yaml")
    frame = pd.read_csv(files / "events.csv")
    frame["arm"] = Assigner(experiment).assign(frame["user_id"].tolist())
    frame.to_csv(files / "events3.csv", index=False)
    assert main(["ab", "report", "--experiment", str(files / "ab3.yaml"), "--events",
                 str(files / "events3.csv")]) == 0
    lines = capsys.readouterr().err.splitlines()
    comparisons = [line for line in lines if " vs " in line]
    assert [line.split(":")[1].strip() for line in comparisons] == ["cleaned vs naive",
                                                                    "third vs naive"]
    assert all(line.startswith("fm-keras: ") for line in lines)  # the second had no prefix
    # Then notes and warnings, each its own line: Holm's adjustment over the 2 comparisons.
    assert all(line.startswith(("fm-keras: note: ", "fm-keras: warning: "))
               for line in lines if " vs " not in line)
    assert any("Holm-adjusted over the 2 comparisons" in line for line in lines)


@pytest.mark.parametrize("cell, message", [
    ("u3,cleaned,1,,0", "events.csv: column 'impressions': 1 empty cells (first at line 5)"),
    ("u3,cleaned,soon,10,0",
     "events.csv: column 'timestamp': not a number: 'soon' (first at line 5)"),
    ("u3,cleaned,1,10,11", "events.csv: column 'clicks': 1 rows have more clicks than "
     "impressions (first at line 5)"),
])
def test_report_names_the_file_line_of_a_bad_cell(files, capsys, monkeypatch, cell, message):
    # A bad cell on line 5 was "(first at row 3)", 0-based; empty and text cells named no line.
    lines = (files / "events.csv").read_text().splitlines()
    lines[4] = cell
    (files / "events.csv").write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(files)
    assert main(["ab", "report", "--experiment", "ab.yaml", "--events", "events.csv"]) == 2
    assert capsys.readouterr().err == f"fm-keras: error: {message}\n"


def test_a_bool_unit_column_is_one_line_exit_2_in_report_and_assign(files, capsys, monkeypatch):
    # Issue 19: a Parquet bool user_id was hashed as 'True'/'False' by report and assign.
    frame = pd.read_csv(files / "events.csv").head(8)
    frame.assign(user_id=[True, False] * 4).to_parquet(files / "events.parquet", index=False)
    monkeypatch.chdir(files)
    for command in (["report", "--events", "events.parquet", "--html", "out.html"],
                    ["assign", "--users", "events.parquet", "--output", "out.csv"]):
        assert main(["ab", command[0], "--experiment", "ab.yaml", *command[1:]]) == 2
        err = capsys.readouterr().err
        assert err == ("fm-keras: error: events.parquet: column 'user_id': unit ids are bool, "
                       "not text or integers (a unit id is hashed as its text); store the ids "
                       "as integers or strings\n")
    assert not (files / "out.html").exists() and not (files / "out.csv").exists()


def test_an_arm_left_too_small_by_units_in_several_arms_names_them(files, capsys, monkeypatch):
    # Issue 19: "arm 'naive' has events of only 1 unit" did not say that u1, logged in both
    # arms, had been dropped.
    (files / "two.csv").write_text("user_id,arm,timestamp,impressions,clicks\n"
                                   "u1,naive,1,5,1\nu2,naive,1,5,0\nu1,cleaned,1,5,0\n"
                                   "u3,cleaned,1,5,0\nu4,cleaned,1,5,2\n")
    monkeypatch.chdir(files)
    assert main(["ab", "report", "--experiment", "ab.yaml", "--events", "two.csv"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fm-keras: error: two.csv: arm 'naive' has "
                                                   "events of only 1 unit once")
    assert "1 unit dropped (1 logged in 'naive'), e.g. 'u1' in ['cleaned', 'naive']" in err
