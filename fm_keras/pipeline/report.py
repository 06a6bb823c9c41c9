"""The run report: ``<run dir>/report/index.html`` with PNG plots, one self-contained directory.

Sections: the outcome and why (anomalies that failed, thresholds that did not hold), the
steps with timings and cache hits, metrics against the last blessed model, the calibration
curve, the training curves, and the data statistics with every anomaly.
"""

from __future__ import annotations

import html
import json
import os

from fm_keras.pipeline.metadata import DONE, MetadataStore


def _artifacts(store: MetadataStore, run_id: str) -> tuple[dict, dict]:
    """(outputs by name, execution properties by step) of a run, cached ones included."""
    context = store.context(run_id)
    outputs, props = {}, {}
    for execution in store.executions(context["id"]):
        props[execution["type"]] = execution["properties"]
        if execution["state"] in DONE:
            outputs.update(store.events(execution["id"], "OUTPUT"))
    return outputs, props


def _read(artifact) -> dict | None:
    if artifact is None or not os.path.isfile(artifact.uri):
        return None
    with open(artifact.uri, encoding="utf-8") as f:
        return json.load(f)


def write_report(run_dir: str, summary: dict, store: MetadataStore) -> str:
    """Writes the report and returns the path of ``index.html``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = os.path.join(run_dir, "report")
    os.makedirs(out, exist_ok=True)
    outputs, props = _artifacts(store, summary["run_id"])
    evaluation = _read(outputs.get("evaluation"))
    anomalies = (_read(outputs.get("anomalies")) or {}).get("anomalies")
    stats = _read(outputs.get("statistics"))
    blessing = _read(outputs.get("blessing"))
    infra = _read(outputs.get("infra_blessing"))
    sections = [_outcome(summary, anomalies, blessing, infra), _steps(summary)]
    if evaluation:
        sections.append(_metrics_plot(plt, evaluation, out))
        sections.append(_calibration_plot(plt, evaluation, out))
    history = props.get("trainer", {}).get("history")
    if history:
        sections.append(_training_plot(plt, history, out))
    if stats or anomalies is not None:
        sections.append(_data_section(plt, stats, props.get("examplegen", {}), anomalies, out))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>fm-keras run "
            f"{html.escape(summary['run_id'])}</title><style>body{{font-family:sans-serif;"
            "max-width:960px;margin:2em auto}td,th{padding:2px 8px;text-align:left}"
            ".fail{color:#b00}.warn{color:#a60}.ok{color:#070}</style></head><body>"
            f"<h1>Pipeline run {html.escape(summary['run_id'])}</h1>"
            + "\n".join(sections) + "</body></html>")
    path = os.path.join(out, "index.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path


def _table(rows, header) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _window_text(summary: dict) -> str:
    """The run's rolling window of spans in words (``span 5``, ``spans 3-5 (span 4 missing)``)."""
    window = summary.get("window") or {}
    return window.get("text") or f"span {summary.get('span')}"


def _outcome(summary: dict, anomalies, blessing, infra) -> str:
    status = summary["status"]
    css = "ok" if status in ("pushed", "unchanged") else "fail"
    parts = [f"<h2>Outcome: <span class='{css}'>{html.escape(str(status))}</span></h2>",
             f"<p>{html.escape(_window_text(summary))}, pushed version "
             f"{summary.get('pushed_version')}, "
             f"{summary.get('seconds')} s</p>"]
    why = []
    if status == "invalid_data" and anomalies:
        why = [f"anomaly {a['kind']} on {a['column']}: {a['detail']}"
               for a in anomalies if a["severity"] == "fail"]
    if blessing and not blessing["blessed"]:
        why = [f"not blessed: {r}" for r in blessing["reasons"]]
    if status == "infra_invalid" and infra:
        why = [f"infra validation: {infra.get('error')}"]
    if summary.get("error"):
        why.append(f"error: {summary['error']}")
    if why:
        parts.append("<p>Why:</p><ul>" + "".join(f"<li class='fail'>{html.escape(w)}</li>"
                                               for w in why) + "</ul>")
    if status != "pushed":
        parts.append("<p>The served model is unchanged by this run.</p>")
    return "\n".join(parts)


def _steps(summary: dict) -> str:
    rows = [(s["step"], s["state"], s["seconds"], "yes" if s["cached"] else "",
             s.get("stop") or s.get("error") or "") for s in summary["steps"]]
    return "<h2>Steps</h2>" + _table(rows, ["step", "state", "seconds", "cached", "outcome"])


def _metrics_plot(plt, evaluation: dict, out: str) -> str:
    """One bar panel per metric, each its own scale from 0, the values printed on the bars."""
    cand, base = evaluation["candidate"], evaluation.get("baseline")

    def value(m, name):
        if m is None:
            return None
        if name == "calibration_error":
            return abs(m["calibration_ratio"] - 1) if m.get("calibration_ratio") else None
        return m.get(name)

    names = [n for n in ("recall", "auc", "logloss", "ece", "calibration_error",
                         "ann_recall_at_k") if value(cand, n) is not None]
    labels = {"recall": f"Recall@{cand.get('recall_at', 'K')}",
              "ann_recall_at_k": "ANN recall@K (vs exact)"}
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(2.2 * max(len(names), 1), 3.2),
                             squeeze=False)
    for ax, name in zip(axes[0], names):
        bars = [("candidate", value(cand, name))]
        if base and value(base, name) is not None:
            bars.append(("last blessed", value(base, name)))
        drawn = ax.bar([b[0] for b in bars], [b[1] for b in bars],
                       color=["C0", "C1"][:len(bars)])
        # Every metric here is >= 0: the axis starts at 0, so a bar's height is its value (an
        # axis cut above 0 made 0.70 vs 0.71 look like one bar twice the other); the printed
        # values show a small difference instead.
        ax.bar_label(drawn, labels=[_fmt(b[1]) for b in bars], fontsize=7)
        ax.set_ylim(0.0, max(max(b[1] for b in bars) * 1.15, 1e-6))
        ax.set_title(labels.get(name, name), fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle("Metrics on this run's eval rows", fontsize=10)
    _save(plt, fig, out, "metrics.png")
    rows = [(labels.get(n, n), _fmt(value(cand, n)), _fmt(value(base, n))) for n in names]
    return ("<h2>Metrics vs the last blessed model</h2><img src='metrics.png'>"
            + _table(rows, ["metric", "candidate", "last blessed"]))


def _save(plt, fig, out: str, name: str) -> None:
    fig.tight_layout()
    fig.savefig(os.path.join(out, name))
    plt.close(fig)


def _calibration_plot(plt, evaluation: dict, out: str) -> str:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for label, m in (("candidate", evaluation["candidate"]), ("last blessed", evaluation.get("baseline"))):
        if m and m.get("calibration_curve"):
            curve = m["calibration_curve"]
            ax.plot([b["predicted"] for b in curve], [b["observed"] for b in curve], "o-",
                    label=label)
    top = max(b["predicted"] for b in evaluation["candidate"]["calibration_curve"]) * 1.1
    ax.plot([0, top], [0, top], "k:", label="perfect")
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed click rate")
    ax.legend()
    _save(plt, fig, out, "calibration.png")
    return "<h2>Calibration</h2><img src='calibration.png'>"


def _training_plot(plt, history: list, out: str) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    epochs = range(1, len(history) + 1)
    for key in ("loss", "val_loss"):
        if key in history[0]:
            axes[0].plot(epochs, [h[key] for h in history], label=key)
    for key in ("auc", "val_auc"):
        if key in history[0]:
            axes[1].plot(epochs, [h[key] for h in history], label=key)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend()
    _save(plt, fig, out, "training.png")
    return "<h2>Training curves</h2><img src='training.png'>"


def _data_section(plt, stats, counts: dict, anomalies, out: str) -> str:
    parts = ["<h2>Data</h2>"]
    if counts.get("rows_read"):
        bars = {"read": counts["rows_read"], **{f"dropped: {k}": v for k, v in
                                                 counts.get("dropped", {}).items()},
                "duplicates": counts.get("duplicates", 0), "train": counts.get("train_rows", 0),
                "eval": counts.get("eval_rows", 0)}
        fig, ax = plt.subplots(figsize=(8, 3))
        ax.barh(list(bars), list(bars.values()))
        ax.invert_yaxis()
        ax.set_xlabel("rows")
        _save(plt, fig, out, "data.png")
        parts.append("<img src='data.png'>")
    if stats:
        parts.append(f"<p>label rate (train): {_fmt(stats.get('label_rate'))}</p>")
        rows = [(c, s["type"], f"{s['missing']:.1%}", s["distinct"],
                 _fmt(stats["holdout_oov_rate"].get(c))) for c, s in stats["columns"].items()]
        parts.append(_table(rows, ["column", "type", "missing", "distinct", "holdout OOV"]))
    parts.append("<h3>Anomalies</h3>")
    if anomalies:
        parts.append("<ul>" + "".join(
            f"<li class='{a['severity']}'>{a['severity']}: {html.escape(a['kind'])} "
            f"({html.escape(a['column'])}): {html.escape(a['detail'])}</li>" for a in anomalies)
            + "</ul>")
    else:
        parts.append("<p>none</p>" if anomalies is not None else "<p>not validated</p>")
    return "\n".join(parts)


def _fmt(value) -> str:
    return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
