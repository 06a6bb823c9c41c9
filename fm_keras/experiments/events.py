"""The experiment event log: one row per served request (docs/experiments.md).

| column | type | meaning |
|---|---|---|
| ``<unit>`` (e.g. ``user_id``) | string | the randomization unit, as named by the experiment |
| ``arm`` | string | the arm that served the request (as the client returned it) |
| ``timestamp`` | integer | Unix seconds of the request |
| ``impressions`` | integer >= 0 | items shown |
| ``clicks`` | integer, 0..impressions | items clicked |
| ``pre_period`` | number, optional | the unit's metric before the experiment (for CUPED); the same on every row of a unit |

CSV or Parquet; ``ab report`` reads globs of either. The analysis unit is the randomization
unit: rows are summed per unit first (``per_unit``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

import numpy as np
import pandas as pd

from fm_keras.errors import DataError
from fm_keras.experiments.config import ABExperiment

COLUMNS = ("arm", "timestamp", "impressions", "clicks")
PRE_PERIOD = "pre_period"


def read_events(patterns: Sequence[str], experiment: ABExperiment) -> pd.DataFrame:
    """Reads and checks event files.

    Args:
        patterns: CSV/Parquet files or globs.
        experiment: names the unit column and the arms.

    Returns:
        A frame with columns unit (str), arm (str), timestamp (int64), impressions (int64),
        clicks (int64) and, when every file has it, pre_period (float64).

    Raises:
        DataError: naming the file and column: a missing column, a non-numeric or negative
            count, clicks above impressions, an arm the experiment does not have.
    """
    from fm_keras.data import expand_paths, read_frame

    unit = experiment.unit
    parts = []
    for path in expand_paths(patterns):
        frame = read_frame(path)
        for column in (unit, *COLUMNS):
            if column not in frame.columns:
                what = " (the experiment's unit)" if column == unit else ""
                raise DataError(f"{path}: column {column!r}{what} is missing; the file has "
                                f"{list(frame.columns)[:12]} (schema: docs/experiments.md)")
        out = pd.DataFrame({"unit": frame[unit].astype(str), "arm": frame["arm"].astype(str)})
        for column in ("timestamp", "impressions", "clicks"):
            out[column] = _counts(frame[column], path, column)
        bad = out["clicks"] > out["impressions"]
        if bad.any():
            raise DataError(f"{path}: column 'clicks': {int(bad.sum())} rows have more clicks "
                            f"than impressions (first at row {int(np.argmax(bad.to_numpy()))})")
        unknown = sorted(set(out["arm"]) - set(experiment.arm_names))
        if unknown:
            raise DataError(f"{path}: column 'arm': {unknown[:5]} are not arms of "
                            f"{experiment.source} (arms: {experiment.arm_names})")
        if PRE_PERIOD in frame.columns:
            out[PRE_PERIOD] = _numbers(frame[PRE_PERIOD], path, PRE_PERIOD)
        parts.append(out)
    events = pd.concat(parts, ignore_index=True)
    if PRE_PERIOD in events.columns and events[PRE_PERIOD].isna().any():
        events = events.drop(columns=PRE_PERIOD)  # only some files have it: not usable
    return events


def per_unit(events: pd.DataFrame) -> pd.DataFrame:
    """Sums events per (unit, arm): the analysis table.

    Returns:
        One row per (unit, arm): unit, arm, events, impressions, clicks, first_timestamp and
        pre_period (when present; its first value for the unit). A unit with rows in several
        arms appears once per arm (``analysis`` counts and drops them).
    """
    aggregations = {"events": ("clicks", "size"), "impressions": ("impressions", "sum"),
                    "clicks": ("clicks", "sum"), "first_timestamp": ("timestamp", "min")}
    if PRE_PERIOD in events.columns:
        aggregations[PRE_PERIOD] = (PRE_PERIOD, "first")
    return events.groupby(["unit", "arm"], sort=False).agg(**aggregations).reset_index()


def write_table(frame: pd.DataFrame, path: str) -> None:
    """Writes a frame as CSV or Parquet (by extension) to a temp file, then renames it."""
    if not path.endswith((".csv", ".parquet", ".pq")):
        raise DataError(f"{path}: the output must end in .csv or .parquet")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=directory)
    os.close(fd)
    try:
        if path.endswith(".csv"):
            frame.to_csv(tmp, index=False)
        else:
            frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _numbers(column: pd.Series, path: str, name: str) -> np.ndarray:
    values = pd.to_numeric(column.replace("", np.nan), errors="coerce")
    bad = values.isna() & (column != "")
    if bad.any():
        raise DataError(f"{path}: column {name!r}: not a number: {column[bad].iloc[0]!r}")
    return values.to_numpy(dtype=np.float64)


def _counts(column: pd.Series, path: str, name: str) -> np.ndarray:
    values = _numbers(column, path, name)
    if np.isnan(values).any():
        raise DataError(f"{path}: column {name!r}: {int(np.isnan(values).sum())} empty cells")
    if (values < 0).any() or (values != np.round(values)).any():
        raise DataError(f"{path}: column {name!r}: must be whole numbers >= 0, got "
                        f"{values[(values < 0) | (values != np.round(values))][0]!r}")
    return values.astype(np.int64)
