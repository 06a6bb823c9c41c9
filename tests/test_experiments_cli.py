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
