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


def test_three_arms_show_holm_p_values_and_small_arms_a_warning(tmp_path):
    experiment = ABExperiment(name="t3", unit="user_id", salt="s3", control="b", arms=(
        Arm(name="a", model="ctr", version=1, weight=0.04),
        Arm(name="b", model="ctr", version=2, weight=0.48),
        Arm(name="c", model="ctr", version=3, weight=0.48)))
    rng = np.random.default_rng(1)
    units = [f"u{i}" for i in range(2000)]
    frame = pd.DataFrame({"user_id": units, "arm": Assigner(experiment).assign(units),
                          "timestamp": 0, "impressions": 10, "clicks": rng.binomial(10, 0.1, 2000)})
    path = tmp_path / "events.csv"
    frame.to_csv(path, index=False)
    page = tmp_path / "r.html"
    result = ab_report([str(path)], experiment, html_path=str(page))
    line = summary_line(result)
    for c in result["comparisons"]:
        assert f"{c['arm']} vs b:" in line and f"Holm p = {c['p_value_holm']:.3g}" in line
    assert "note: p_value_holm: Holm-adjusted over the 2 comparisons" in line
    small = result["arms"][0]["units"]
    assert small < 100 and f"warning: arm 'a' has {small} units (< 100)" in line
    text = page.read_text()
    assert "Holm p = " in text and f"arm &#x27;a&#x27; has {small} units" in text


def test_an_unbounded_lift_ci_is_said_not_printed_as_numbers(tmp_path):
    frame = events(n=60, lift=0.0)
    frame["clicks"] = 0
    first = frame.index[frame.arm == "a"][0]
    frame.loc[first, "clicks"] = 3  # control barely above 0: Fieller's set is unbounded
    path = tmp_path / "events.csv"
    frame.to_csv(path, index=False)
    result = ab_report([str(path)], EXPERIMENT, html_path=str(tmp_path / "r.html"))
    (c,) = result["comparisons"]
    assert c["lift"] == -1.0 and np.isnan(c["ci_low"]) and np.isnan(c["ci_high"])
    line = summary_line(result)
    assert "(95% CI undefined)" in line
    assert "note: b: lift CI unbounded: the control mean is not distinguishable from 0" in line
