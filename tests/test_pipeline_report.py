"""The run report: one directory with index.html and the PNGs it shows."""

import os


def test_report_of_a_pushed_run(pipeline_first_run):
    _, summary = pipeline_first_run
    report = summary["report"]
    directory = os.path.dirname(report)
    page = open(report, encoding="utf-8").read()
    for png in ("metrics.png", "calibration.png", "training.png", "data.png"):
        assert f"src='{png}'" in page
        with open(os.path.join(directory, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "Outcome: <span class='ok'>pushed</span>" in page
    for step in ("examplegen", "trainer", "evaluator", "infra_validator", "pusher"):
        assert f"<td>{step}</td>" in page
    assert "<h3>Anomalies</h3>\n<p>none</p>" in page
    assert "The served model is unchanged" not in page
