"""``ab report``: events -> per-unit table -> analysis (JSON) and an HTML page with plots.

The page is one self-contained file (PNG plots, matplotlib's Agg backend, embedded as base64):
the verdict (lift, CI, p-value, trustworthy or why not), the per-arm metric with its CI, the
lift of each arm with its CI, units per arm against the configured split (SRM), and the
distribution of the per-unit metric.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence

import numpy as np
import pandas as pd

from fm_keras import fsutil
from fm_keras.errors import DataError
from fm_keras.experiments.analysis import analyze
from fm_keras.experiments.config import ABExperiment
from fm_keras.data import check_not_an_input
from fm_keras.experiments.events import per_unit, read_events


def ab_report(events: Sequence[str], experiment: ABExperiment, metric: str = "clicks_per_user",
              cuped: bool = False, html_path: str | None = None, alpha: float = 0.05) -> dict:
    """Reads the events, analyzes them and optionally writes the HTML page.

    Args:
        events: CSV/Parquet files or globs (schema: ``fm_keras.experiments.events``).
        experiment: the experiment file's contents.
        metric: ``clicks_per_user`` or ``ctr``.
        cuped: CUPED-adjust with the events' ``pre_period`` column.
        html_path: where to write the page (atomically), or None.
        alpha: 1 - confidence level.

    Returns:
        The analysis (``analysis.analyze``) plus ``events`` (patterns) and ``html``.

    Raises:
        DataError, ConfigError: bad events or arguments (nothing is written).
    """
    if html_path:
        check_not_an_input(html_path, events, "--html")
    source = ", ".join(events)
    table = per_unit(read_events(events, experiment, need_pre_period=cuped))
    result = analyze(table, experiment, metric=metric, cuped=cuped, alpha=alpha, source=source)
    result["events"] = list(events)
    result["html"] = html_path
    if html_path:
        page = render_html(result, table)
        try:
            os.makedirs(os.path.dirname(os.path.abspath(html_path)), exist_ok=True)
            fsutil.write_text(html_path, page)
        except OSError as err:
            raise DataError(f"{html_path}: --html: cannot write: {err.strerror or err}") from None
    return result


def summary_line(result: dict) -> str:
    """One human line per comparison (lift, CI, p-value, Holm's p with several treatments, the
    SRM verdict), then one line per note and warning."""
    several = len(result["comparisons"]) >= 2
    lines = []
    for c in result["comparisons"]:
        ci = (f"95% CI {c['ci_low']:+.2%} .. {c['ci_high']:+.2%}"
              if np.isfinite(c["ci_low"]) and np.isfinite(c["ci_high"]) else "95% CI undefined")
        holm = f", Holm p = {c['p_value_holm']:.3g}" if several else ""
        lines.append(
            f"{c['arm']} vs {result['control']}: {result['metric']} {c['lift']:+.2%} "
            f"({ci}), p = {c['p_value']:.3g}{holm}; "
            f"SRM p = {result['srm']['p_value']:.3g}"
            + ("" if result["trustworthy"] else " -- UNTRUSTWORTHY (see srm/checks)"))
        lines.extend(f"note: {c['arm']}: {n}" for n in c.get("notes", []))
    lines.extend(f"note: {n}" for n in result.get("notes", []))
    lines.extend(f"warning: {w}" for w in result.get("warnings", []))
    if result["checks"].get("assignment_hint"):
        lines.append(f"warning: {result['checks']['assignment_hint']}")
    return "\n".join(lines)


def render_html(result: dict, table: pd.DataFrame) -> str:
    """The report page for an analysis and its per-unit table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title = f"A/B experiment {result['experiment']}: {result['metric']}"
    verdict = "trustworthy" if result["trustworthy"] else "UNTRUSTWORTHY"
    css = "ok" if result["trustworthy"] else "fail"
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p class='{css}'><b>{verdict}</b>: SRM chi-square p = "
             f"{result['srm']['p_value']:.3g} (flagged below {result['srm']['alpha']}); "
             f"units in several arms: {result['checks']['units_in_several_arms']}; "
             f"assignment mismatches: {result['checks']['assignment_mismatches']}</p>",
             *([f"<p class='fail'>{html.escape(result['checks']['assignment_hint'])}</p>"]
               if result["checks"].get("assignment_hint") else []),
             "<pre>" + html.escape(summary_line(result)) + "</pre>",
             *[f"<p class='fail'>warning: {html.escape(w)}</p>"
               for w in result.get("warnings", [])]]
    if result["cuped"]:
        parts.append(f"<p>CUPED: theta = {result['cuped']['theta']:.4f}, variance reduced by "
                     f"{result['cuped']['variance_reduction']:.1%}</p>")
    raw = ["unadjusted"] if result["cuped"] else []
    parts.append(_table([(a["arm"], a["units"], a["events"], a["impressions"], a["clicks"],
                          *([f"{a['value_raw']:.5g}"] if raw else []),
                          f"{a['value']:.5g}", f"[{a['ci_low']:.5g}, {a['ci_high']:.5g}]")
                         for a in result["arms"]],
                        ["arm", "units", "events", "impressions", "clicks", *raw,
                         result["metric"] + (" (CUPED-adjusted)" if result["cuped"] else ""),
                         "95% CI"]))
    parts.append(_img(plt, _arms_plot(plt, result)))
    parts.append(_img(plt, _lift_plot(plt, result)))
    parts.append(_img(plt, _srm_plot(plt, result)))
    parts.append(_img(plt, _distribution_plot(plt, result, table)))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            "</title><style>body{font-family:sans-serif;max-width:960px;margin:2em auto}"
            "td,th{padding:2px 8px;text-align:left}.fail{color:#b00}.ok{color:#070}</style>"
            "</head><body>" + "\n".join(parts) + "</body></html>\n")


def _table(rows, header) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(plt, fig) -> str:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return f"<img src='data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}'>"


def _arms_plot(plt, result):
    fig, ax = plt.subplots(figsize=(7, 3))
    arms = result["arms"]
    values = [a["value"] for a in arms]
    errors = [[a["value"] - a["ci_low"] for a in arms], [a["ci_high"] - a["value"] for a in arms]]
    ax.bar([a["arm"] for a in arms], values, yerr=errors, capsize=8, color="#8ab")
    ax.set_ylabel(result["metric"])
    ax.set_title(f"{result['metric']} per arm, 95% CI")
    return fig


def _lift_plot(plt, result):
    comparisons = result["comparisons"]
    fig, ax = plt.subplots(figsize=(7, 0.8 + 0.6 * len(comparisons)))
    for i, c in enumerate(comparisons):
        if not np.isfinite(c["lift"]):  # e.g. a control mean of 0: say so, not a blank row
            ax.text(0, i, " relative lift undefined (control's mean is 0)", va="center")
            continue
        if not (np.isfinite(c["ci_low"]) and np.isfinite(c["ci_high"])):  # see c["notes"]
            ax.plot([100 * c["lift"]], [i], "o", color="#258")
            ax.text(100 * c["lift"], i, "  CI undefined: " + "; ".join(c.get("notes", [])),
                    va="center", fontsize=8)
            continue
        ax.errorbar([100 * c["lift"]], [i], xerr=[[100 * (c["lift"] - c["ci_low"])],
                                                   [100 * (c["ci_high"] - c["lift"])]],
                    fmt="o", capsize=6, color="#258")
    ax.axvline(0, color="k", linestyle=":")
    ax.set_yticks(range(len(comparisons)), [f"{c['arm']} vs {result['control']}"
                                             for c in comparisons])
    ax.set_ylim(-0.8, len(comparisons) - 0.2)
    ax.set_xlabel("relative lift, % (95% CI)")
    return fig


def _srm_plot(plt, result):
    srm = result["srm"]
    names = list(srm["observed"])
    fig, ax = plt.subplots(figsize=(7, 2.8))
    x = np.arange(len(names))
    ax.bar(x - 0.2, [srm["expected"][n] for n in names], 0.4, label="expected (weights)")
    ax.bar(x + 0.2, [srm["observed"][n] for n in names], 0.4, label="observed")
    ax.set_xticks(x, names)
    ax.set_ylabel("units")
    ax.set_title(f"Sample ratio: chi-square p = {srm['p_value']:.3g}")
    ax.set_ylim(0, 1.3 * max(max(srm["observed"].values()), max(srm["expected"].values())))
    ax.legend(loc="upper center", ncol=2)
    return fig


def _distribution_plot(plt, result, table: pd.DataFrame):
    column = "clicks" if result["metric"] == "clicks_per_user" else "impressions"
    fig, ax = plt.subplots(figsize=(7, 2.8))
    for arm in [a["arm"] for a in result["arms"]]:
        values = np.sort(table.loc[table["arm"] == arm, column].to_numpy())
        ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post", label=arm)
    ax.set_xlim(0, max(1.0, float(np.percentile(table[column], 99))))
    ax.set_xlabel(f"{column} per unit (up to the 99th percentile)")
    ax.set_ylabel("share of units (CDF)")
    ax.legend()
    return fig
