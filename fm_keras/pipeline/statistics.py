"""StatisticsGen, SchemaGen and ExampleValidator for ExampleGen's output.

Statistics per column: inferred type (numeric when every non-missing cell parses as a number;
categorical and multi-hot features are text by the spec, whatever their ids look like),
missing share, distinct values, numeric range, top values, a few non-numeric cells (with their
span file and data row for a numeric feature or the label); the label's positive rate; and per
categorical feature the *holdout OOV rate*: the share of eval values the train split never saw.
The schema keeps each column's type, the label rate and each categorical feature's vocabulary.

Validation compares a span (or a window of spans) with the feature spec and with the last
validated schema: missing or retyped columns (a feature column that some files of the window
lack is missing), new columns, label-rate drift (relative change of the positive
rate), and OOV-rate drift (the share of values the last schema never saw, minus the OOV rate a
holdout of one span already shows). Each anomaly is ``fail`` or ``warn`` as configured.
"""

from __future__ import annotations

import os

import pandas as pd

from fm_keras import fsutil
from fm_keras.config import FeatureConfig
from fm_keras.errors import close_match
from fm_keras.reading import MISSING_TOKENS
from fm_keras.pipeline.config import ValidationConfig

MAX_VOCABULARY = 50_000


# What the statistics record; part of the statistics step's cache key, so that statistics
# written by an older fm-keras (without the non-numeric cells' places or the label's bad
# cells) are computed again rather than reused.
STATISTICS_VERSION = 2


def column_stats(column: pd.Series, text: bool = False) -> dict:
    """Type, missing share, distinct count, and range (numeric) or top values (string).

    `text`: the column is text by the feature spec (a categorical or multi-hot feature: ids
    such as ``255`` are names, not numbers), so its type is ``string`` whatever it holds."""
    present = column[~column.isin(MISSING_TOKENS)]
    numbers = pd.to_numeric(present, errors="coerce") if not text else None
    numeric = not text and len(present) > 0 and not numbers.isna().any()
    stats = {"type": "numeric" if numeric else "string",
             "missing": float(1 - len(present) / max(len(column), 1)),
             "distinct": int(present.nunique())}
    if not text and not numeric and len(present):
        # the cells that are not numbers (the evidence of a retyped numeric column)
        bad = present[numbers.isna()]
        stats["non_numeric"] = {"count": int(len(bad)),
                                "examples": [str(v) for v in bad.drop_duplicates().head(3)]}
    if numeric:
        stats.update(min=float(numbers.min()), max=float(numbers.max()),
                     mean=float(numbers.mean()))
    else:
        top = present.value_counts().head(5)
        stats["top"] = {str(k): int(v) for k, v in top.items()}
    return stats


def _values(column: pd.Series, feature: FeatureConfig) -> pd.Series:
    """A categorical column's values; a multi-hot column's elements (weights stripped)."""
    column = column.astype(str)
    if feature.kind != "multi_hot":
        return column
    elements = column.str.split(feature.separator, regex=False).explode()
    return elements.str.split(feature.weight_separator, n=1, regex=False).str[0]


def _locate(examples_dir: str, column: str, values, limit: int = 3) -> list[dict]:
    """The first `limit` cells of `column` holding one of `values` (None: a missing value)
    in ExampleGen's input files (``counts.json``), as {value, file, row} (row: the 1-based
    data row); [] when ExampleGen's record of its files is not there."""
    counts_path = os.path.join(examples_dir, "counts.json")
    if not os.path.exists(counts_path):
        return []
    from fm_keras.data import read_frame
    from fm_keras.reading import read_header

    found, values = [], set(values) if values is not None else None
    for path in fsutil.read_json(counts_path).get("files", []):
        if not os.path.exists(path) or column not in read_header(path):
            continue
        cells = read_frame(path, columns=[column])[column]
        hit = cells.isin(values) if values is not None else \
            cells.isna() | cells.isin(MISSING_TOKENS)
        for row, value in cells[hit].head(limit - len(found)).items():
            found.append({"value": str(value), "file": path, "row": int(row) + 1})
        if len(found) >= limit:
            break
    return found


def _label_cells(examples_dir: str, column: pd.Series) -> dict:
    """The label cells a model cannot train on, over both splits: ``missing`` (empty or a
    missing-value token) and ``not_binary`` (numbers other than 0 and 1; the validator judges
    them by the task), each ``{count, examples, where}`` as `_locate` finds them; {} if none.
    """
    present = ~column.isin(MISSING_TOKENS) & column.notna()
    numbers = pd.to_numeric(column[present], errors="coerce")
    found = {}
    for name, bad in (("missing", column[~present]),
                      ("not_binary", column[present][numbers.notna() & ~numbers.isin([0, 1])])):
        if len(bad):
            examples = [str(v) for v in bad.drop_duplicates().head(3)]
            found[name] = {"count": int(len(bad)), "examples": examples, "where": _locate(
                examples_dir, column.name, examples if name == "not_binary" else None)}
    return found


def _label_detail(label: str, kind: str, bad: dict) -> str:
    """The validator's one line on `label`'s cells of one `_label_cells` kind."""
    what = "missing" if kind == "missing" else "not 0 or 1"
    first = bad["where"][0] if bad.get("where") else None
    cell = ("a missing value" if kind == "missing" else f"value {bad['examples'][0]!r}")
    where = (f"{first['file']}: label {label!r}: {cell} at data row {first['row']}"
             if first else f"label {label!r}: {cell}")
    return where + (f" ({bad['count']} label cells {what})" if bad["count"] > 1 else "")


def _non_numeric_detail(what: str, stats: dict) -> str:
    """`what` (e.g. ``numeric feature 'age'``) has non-numeric values: the first one with its
    file and data row when the statistics located it, and the count and a few examples."""
    bad = stats.get("non_numeric")
    if not bad:  # no cell at all, or statistics written before non-numeric cells were recorded
        return (f"{what} has no values" if stats.get("missing") == 1.0
                else f"{what} has non-numeric values")
    more = (f" ({bad['count']} non-numeric cells in the train split, e.g. {bad['examples']})"
            if bad["count"] > 1 else "")
    if bad.get("where"):
        first = bad["where"][0]
        return (f"{first['file']}: {what}: non-numeric value {first['value']!r} "
                f"at data row {first['row']}{more}")
    return f"{what}: non-numeric value {bad['examples'][0]!r}{more}"


def _text_features(features) -> set[str]:
    """The columns the feature spec reads as text: categorical and multi-hot features."""
    return {f.name for f in features if f.kind != "numeric"}


def generate_statistics(examples_dir: str, features, label: str, out_dir: str) -> tuple[dict, dict]:
    """Writes ``statistics.json`` and ``schema.json``; returns (statistics, schema)."""
    train = pd.read_parquet(os.path.join(examples_dir, "train.parquet"))
    evaluation = pd.read_parquet(os.path.join(examples_dir, "eval.parquet"))
    text = _text_features(features)
    stats = {"rows": {"train": len(train), "eval": len(evaluation)},
             "columns": {c: column_stats(train[c], text=c in text) for c in train.columns},
             "label": label, "label_rate": None, "holdout_oov_rate": {}}
    if label in train.columns and stats["columns"][label]["type"] == "numeric":
        stats["label_rate"] = float(pd.to_numeric(train[label]).mean())
    # Where the non-numeric cells of a numeric feature (or the label) are: the span file and
    # data row, found in ExampleGen's input files (read again only for such a column).
    for name in [f.name for f in features if f.kind == "numeric"] + [label]:
        bad = stats["columns"].get(name, {}).get("non_numeric")
        if bad and "where" not in bad:
            bad["where"] = _locate(examples_dir, name, bad["examples"])
    if label in train.columns:
        stats["label_cells"] = _label_cells(examples_dir,
                                            pd.concat([train[label], evaluation[label]]))
    vocabularies = {}
    for f in features:
        if f.kind == "numeric" or f.name not in train.columns:
            continue
        counts = _values(train[f.name], f).value_counts()
        vocabularies[f.name] = [str(v) for v in counts.index[:MAX_VOCABULARY]]
        if f.name in evaluation.columns and len(evaluation):
            seen = set(counts.index)
            stats["holdout_oov_rate"][f.name] = float(
                (~_values(evaluation[f.name], f).isin(seen)).mean())
    schema = {"columns": {c: s["type"] for c, s in stats["columns"].items()}, "label": label,
              "label_rate": stats["label_rate"], "holdout_oov_rate": stats["holdout_oov_rate"],
              "vocabularies": vocabularies}
    os.makedirs(out_dir, exist_ok=True)
    fsutil.write_json(os.path.join(out_dir, "statistics.json"), stats)
    fsutil.write_json(os.path.join(out_dir, "schema.json"), schema)
    return stats, schema


def validate(stats: dict, schema: dict, features, baseline: dict | None,
             config: ValidationConfig, examples_dir: str, task: str = "binary") -> list[dict]:
    """Anomalies of a span: against the feature spec, and against ``baseline`` (the last
    validated schema) when there is one. Each is {kind, column, severity, detail}.

    `task` (``model.task``): a binary model's labels must be 0 or 1, a binary or regression
    model's present (``invalid_label``, fail: the trainer would stop on them)."""
    anomalies = []
    columns = schema["columns"]

    def add(kind, column, severity, detail):
        anomalies.append({"kind": kind, "column": column, "severity": severity, "detail": detail})

    # ExampleGen's record of columns that some of its files lack (a window of spans is one
    # data set: a column gone from the newest span is still in the older spans' rows).
    counts_path = os.path.join(examples_dir, "counts.json")
    counts = fsutil.read_json(counts_path) if os.path.exists(counts_path) else {}
    partial = counts.get("columns_missing_in", {})

    def files_text(files) -> str:
        return (f"{files[-1]}" + (f" and {len(files) - 1} more file(s)" if len(files) > 1 else "")
                if files else "the data")

    for name in [f.name for f in features] + [schema["label"]]:
        what = (f"label column {name!r}" if name == schema["label"]
                else f"column {name!r} (in the feature spec)")
        if name not in columns:
            close = close_match(name, columns)
            add("missing_column", name, config.missing_column,
                f"{what} is not in {files_text(counts.get('files', []))}"
                + (f" (did you mean {close!r}?)" if close else ""))
        elif partial.get(name):
            add("missing_column", name, config.missing_column,
                f"{what} is not in {files_text(partial[name])}")
    for f in features:
        if f.kind == "numeric" and columns.get(f.name) == "string":
            add("retyped_column", f.name, config.retyped_column,
                _non_numeric_detail(f"numeric feature {f.name!r}", stats["columns"][f.name]))
    label = schema["label"]
    if columns.get(label) == "string":
        add("retyped_column", label, config.retyped_column,
            _non_numeric_detail(f"label {label!r}", stats["columns"].get(label, {})))
    cells = stats.get("label_cells", {})
    checked = {"binary": ("missing", "not_binary"), "regression": ("missing",)}.get(task, ())
    for kind in checked:
        if kind in cells:
            add("invalid_label", label, "fail", _label_detail(label, kind, cells[kind]))
    if baseline is None:
        return anomalies
    old, text = baseline["columns"], _text_features(features)
    read = {f.name for f in features} | {label}  # the columns the model reads
    for name in old:
        if name not in columns and not any(a["column"] == name for a in anomalies):
            if name in read:
                add("missing_column", name, config.missing_column,
                    f"column {name!r} of the last schema is missing")
            else:  # e.g. a column one span added and the next dropped: no input of the model
                add("missing_column", name, config.missing_unused_column,
                    f"column {name!r} of the last schema is missing (no feature or label "
                    "reads it: validation: missing_unused_column)")
    for name, kind in columns.items():
        if name not in old:
            add("new_column", name, config.new_column, f"column {name!r} is new")
        elif old[name] != kind and name not in text \
                and not any(a["column"] == name for a in anomalies):
            # (a text feature's ids may all look like numbers in one span: not a retyping)
            add("retyped_column", name, config.retyped_column,
                f"column {name!r} was {old[name]}, is now {kind}")
    old_rate, new_rate = baseline.get("label_rate"), schema.get("label_rate")
    if old_rate and new_rate is not None:
        drift = abs(new_rate / old_rate - 1)
        if drift > config.label_rate_drift.max:
            add("label_rate_drift", label, config.label_rate_drift.severity,
                f"positive rate {new_rate:.4f} vs {old_rate:.4f} in the last schema "
                f"(relative change {drift:.2f} > {config.label_rate_drift.max})")
    train = None
    for f in features:
        vocabulary = baseline.get("vocabularies", {}).get(f.name)
        if vocabulary is None or f.name not in columns or any(
                a["kind"] == "missing_column" and a["column"] == f.name for a in anomalies):
            continue  # (rows of files without the column are not new values of it)
        if train is None:
            train = pd.read_parquet(os.path.join(examples_dir, "train.parquet"))
        oov = float((~_values(train[f.name], f).isin(set(vocabulary))).mean())
        expected = baseline.get("holdout_oov_rate", {}).get(f.name, 0.0)
        if oov - expected > config.oov_rate_drift.max:
            add("oov_rate_drift", f.name, config.oov_rate_drift.severity,
                f"{oov:.1%} of {f.name!r} values are new to the last schema, against "
                f"{expected:.1%} unseen in a holdout of its own span "
                f"(increase {oov - expected:.2f} > {config.oov_rate_drift.max})")
    return anomalies


def anomalies_fail(anomalies: list[dict]) -> list[dict]:
    return [a for a in anomalies if a["severity"] == "fail"]

