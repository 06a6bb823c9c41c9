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


def test_metric_bars_start_at_zero(pipeline_first_run, tmp_path, monkeypatch):
    """A bar's height is its value: an axis cut above zero made a 0.70 vs 0.71 AUC look like
    one bar twice the other (the panels were zoomed to the difference)."""
    import matplotlib.figure

    from fm_keras.pipeline.config import load_pipeline
    from fm_keras.pipeline.metadata import MetadataStore
    from fm_keras.pipeline.report import write_report

    path, summary = pipeline_first_run
    saved = {}
    original = matplotlib.figure.Figure.savefig

    def savefig(fig, name, *args, **kwargs):
        saved[os.path.basename(str(name))] = [ax.get_ylim() for ax in fig.axes]
        return original(fig, name, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    store = MetadataStore(os.path.join(load_pipeline(path).root, "metadata.sqlite"))
    try:
        write_report(str(tmp_path), summary, store)
    finally:
        store.close()
    assert saved["metrics.png"], "no metric panels"
    for low, high in saved["metrics.png"]:
        assert low == 0 and high > 0
