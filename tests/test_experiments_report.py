"""ab_report: events -> JSON-ready analysis and one self-contained HTML page with plots."""

import json
import re

import numpy as np
import pandas as pd
import pytest

from fm_keras.errors import DataError
from fm_keras.experiments.assignment import Assigner
from fm_keras.experiments.config import ABExperiment, Arm
from fm_keras.experiments.report import ab_report, summary_line

EXPERIMENT = ABExperiment(name="t", unit="user_id", salt="s", control="a", arms=(
    Arm(name="a", model="ctr", version=1, weight=0.5),
    Arm(name="b", model="ctr", version=2, weight=0.5)))


def events(n=4000, lift=0.2, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    units = [f"u{i}" for i in range(n)]
    arms = Assigner(EXPERIMENT).assign(units)
    rows = np.repeat(np.arange(n), 1 + rng.poisson(1.0, n))
    rate = np.where(arms[rows] == "b", 0.1 * (1 + lift), 0.1)
    return pd.DataFrame({"user_id": np.array(units)[rows], "arm": arms[rows],
                         "timestamp": rng.integers(0, 86_400, len(rows)), "impressions": 10,
                         "clicks": rng.binomial(10, rate),
                         "pre_period": rng.poisson(1.0, n)[rows]})


def test_report_json_and_html(tmp_path):
    path = tmp_path / "events.csv"
    events().to_csv(path, index=False)
    page = tmp_path / "report.html"
    result = ab_report([str(path)], EXPERIMENT, cuped=True, html_path=str(page))
    json.dumps(result)  # JSON-ready
    (c,) = result["comparisons"]
    assert c["arm"] == "b" and c["ci_low"] < 0.2 < c["ci_high"] and c["p_value"] < 1e-6
    assert result["trustworthy"] and result["checks"]["assignment_mismatches"] == 0
    text = page.read_text()
    assert len(re.findall(r"<img src='data:image/png;base64,", text)) == 4
    assert "trustworthy" in text and "CUPED" in text
    line = summary_line(result)
    assert line.startswith("b vs a: clicks_per_user +") and "95% CI" in line


def test_a_failed_report_writes_no_page(tmp_path):
    path = tmp_path / "events.csv"
    frame = events()
    frame[frame.arm == "a"].to_csv(path, index=False)
    page = tmp_path / "report.html"
    with pytest.raises(DataError, match="arm 'b' has no events"):
        ab_report([str(path)], EXPERIMENT, html_path=str(page))
    assert not page.exists()


def test_untrustworthy_results_say_so(tmp_path):
    frame = events(lift=0.0)
    lost = (frame.arm == "b") & (frame.user_id.str[1:].astype(int) % 5 == 0)  # 20% of b
    path = tmp_path / "events.parquet"
    frame[~lost].to_parquet(path)
    result = ab_report([str(path)], EXPERIMENT, metric="ctr")
    assert result["srm"]["flagged"] and not result["trustworthy"]
    assert "UNTRUSTWORTHY" in summary_line(result)


def test_an_undefined_lift_is_labelled_on_the_page(tmp_path, monkeypatch):
    import matplotlib.axes

    frame = events()
    frame.loc[frame.arm == "a", "clicks"] = 0  # control mean 0: the lift is undefined
    path = tmp_path / "events.csv"
    frame.to_csv(path, index=False)
    texts = []
    original = matplotlib.axes.Axes.text
    monkeypatch.setattr(matplotlib.axes.Axes, "text",
                        lambda self, x, y, s, *a, **k: texts.append(s) or original(
                            self, x, y, s, *a, **k))
    result = ab_report([str(path)], EXPERIMENT, html_path=str(tmp_path / "r.html"))
    assert np.isnan(result["comparisons"][0]["lift"])
    assert any("relative lift undefined" in t for t in texts)  # was a blank plot
