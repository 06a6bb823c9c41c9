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

from fm_keras import line_scan
from fm_keras.errors import DataError
from fm_keras.experiments.config import EVENT_COLUMNS, PRE_PERIOD, ABExperiment
from fm_keras.reading import is_parquet

COLUMNS = EVENT_COLUMNS
# Per-row bounds: one request shows at most 2^31 - 1 items (so per-unit sums stay exact in
# int64); timestamps and the pre-period metric stay where float64 holds integers exactly.
MAX_COUNT = 2**31 - 1
MAX_TIMESTAMP = 2**53
MAX_PRE_PERIOD = 1e15


def read_events(patterns: Sequence[str], experiment: ABExperiment,
                need_pre_period: bool = False) -> pd.DataFrame:
    """Reads and checks event files.

    Args:
        patterns: CSV/Parquet files or globs.
        experiment: names the unit column and the arms.
        need_pre_period: every file must have a ``pre_period`` column without empty cells
            (CUPED); otherwise a file without it, or with empty cells, drops the column.

    Returns:
        A frame with columns unit (str), arm (str), timestamp (int64), impressions (int64),
        clicks (int64) and, when every file has it, pre_period (float64).

    Raises:
        DataError: naming the file and column: a missing column, an empty unit id, unit ids
            stored as floats, booleans, dates or times, a non-numeric, empty, negative or
            out-of-range count, clicks above impressions, an arm the experiment does not have,
            or a non-finite pre_period or one that differs between the rows of a unit; a bad
            cell is named by its line in a CSV file (``first at line 5``, as
            `fm_keras.reading` names lines), by its 1-based data row in a Parquet file.

    A file matched twice (by a glob and by its name) is read once.
    """
    from fm_keras.data import expand_paths, read_frame

    unit = experiment.unit
    parts = []
    # A file named twice (a glob and its own name) would count every event twice.
    paths: dict[str, str] = {}
    for path in expand_paths(patterns):
        paths.setdefault(os.path.realpath(path), path)
    for path in paths.values():
        frame = read_frame(path)
        for column in (unit, *COLUMNS):
            if column not in frame.columns:
                what = " (the experiment's unit)" if column == unit else ""
                raise DataError(f"{path}: column {column!r}{what} is missing; the file has "
                                f"{list(frame.columns)[:12]} (schema: docs/experiments.md)")
        out = pd.DataFrame({"unit": unit_ids(frame, path, unit),
                            "arm": frame["arm"].astype(str)})
        for column, maximum in (("timestamp", MAX_TIMESTAMP), ("impressions", MAX_COUNT),
                                ("clicks", MAX_COUNT)):
            out[column] = _counts(frame[column], path, column, maximum)
        bad = (out["clicks"] > out["impressions"]).to_numpy()
        if bad.any():
            raise DataError(f"{path}: column 'clicks': {int(bad.sum())} rows have more clicks "
                            f"than impressions (first at {_file_line(path, bad)})")
        unknown = sorted(set(out["arm"]) - set(experiment.arm_names))
        if unknown:
            first = _file_line(path, ~out["arm"].isin(experiment.arm_names).to_numpy())
            raise DataError(f"{path}: column 'arm': {unknown[:5]} are not arms of "
                            f"{experiment.source} (arms: {experiment.arm_names}; first at "
                            f"{first})")
        if PRE_PERIOD in frame.columns:
            out[PRE_PERIOD] = _pre_period(frame[PRE_PERIOD], path, need_pre_period)
        elif need_pre_period:
            raise DataError(f"{path}: column {PRE_PERIOD!r} is missing: --cuped needs each "
                            "unit's pre-period metric on every row")
        parts.append(out)
    events = pd.concat(parts, ignore_index=True)
    if PRE_PERIOD in events.columns and events[PRE_PERIOD].isna().any():
        events = events.drop(columns=PRE_PERIOD)  # only some files have it: not usable
    if PRE_PERIOD in events.columns:
        spread = events.groupby("unit")[PRE_PERIOD].agg(["min", "max"])
        differs = spread[spread["min"] != spread["max"]]
        if len(differs):
            raise DataError(f"{', '.join(patterns)}: column {PRE_PERIOD!r}: {len(differs)} units "
                            f"have different values on different rows (e.g. "
                            f"{differs.index[0]!r}: {differs['min'].iloc[0]:g} and "
                            f"{differs['max'].iloc[0]:g}); it is the unit's pre-experiment "
                            "metric, the same on each of its rows")
    return events


def unit_ids(frame: pd.DataFrame, path: str, unit: str) -> pd.Series:
    """The unit column of a file read by ``data.read_frame``, as the text that is hashed.

    Ids are hashed as text exactly: ``"007"`` and ``"7"`` are different units; a Parquet
    integer column is its decimal text (7 -> ``"7"``, the same unit as the CSV cell ``7``).
    A CSV column has no type: every cell is the text written (`fm_keras.reading`), so the
    cell ``1.0`` is the unit ``"1.0"``, not ``"1"``, as in a Parquet string column.

    Raises:
        DataError: naming the file and column: the column is missing, has empty ids (naming
            the first one's line, or data row in Parquet), or is a Parquet floating-point
            column (a float does not keep the id's text: Arrow reads 7.0 as ``"7"``, the same
            frame written as CSV says ``"7.0"``, and ids above 2^53 are rounded), a boolean or
            a temporal (date, time, timestamp, duration) column: ids are text or integers.
    """
    if unit not in frame.columns:
        raise DataError(f"{path}: column {unit!r} (the experiment's unit) is missing; the file "
                        f"has {list(frame.columns)[:12]}")
    if is_parquet(path):
        import pyarrow as pa
        import pyarrow.parquet as pq

        kind = pq.read_schema(path).field(unit).type
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
        if pa.types.is_floating(kind):
            raise DataError(f"{path}: column {unit!r}: unit ids are floating point ({kind}), "
                            "which do not keep the id's text (7.0 is read as '7', but a CSV of "
                            "the same frame says '7.0'; ids above 2^53 are rounded); store the "
                            "ids as integers or strings")
        if pa.types.is_boolean(kind) or pa.types.is_temporal(kind):
            # Their text is not an id: True/False would make 2 units, a timestamp's text
            # depends on its unit and time zone (ExperimentClient refuses both).
            raise DataError(f"{path}: column {unit!r}: unit ids are {kind}, not text or "
                            "integers (a unit id is hashed as its text); store the ids as "
                            "integers or strings")
    ids = frame[unit].astype(str)
    empty = (ids.str.strip() == "").to_numpy()
    if empty.any():
        raise DataError(f"{path}: column {unit!r}: {int(empty.sum())} empty unit ids (first at "
                        f"{_file_line(path, empty)}); every row needs its unit")
    return ids


def _file_line(path: str, bad: np.ndarray) -> str:
    """Where the first True of `bad` (bool [rows], one per data row of the file) is, for an
    error: ``"line N"`` in a CSV file (its line, as `fm_keras.reading` names lines: blank lines
    and quoted line breaks counted), ``"data row N"`` (1-based) in a Parquet file."""
    row = int(np.argmax(bad))
    line = None if is_parquet(path) else line_scan.record_line(path, row)
    return f"line {line}" if line is not None else f"data row {row + 1}"


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
    """Writes a frame as CSV or Parquet (by extension) to a temp file, then renames it.

    Raises:
        DataError: another extension, or the path cannot be written (nothing is left behind).
    """
    if not path.endswith((".csv", ".parquet", ".pq")):
        raise DataError(f"{path}: the output must end in .csv or .parquet")
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1],
                                   dir=directory)
        os.close(fd)
        if path.endswith(".csv"):
            frame.to_csv(tmp, index=False)
        else:
            frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException as err:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise DataError(f"{path}: cannot write: {err.strerror or err}") from None
        raise


def _numbers(column: pd.Series, path: str, name: str) -> np.ndarray:
    values = pd.to_numeric(column.replace("", np.nan), errors="coerce")
    bad = (values.isna() & (column != "")).to_numpy()
    if bad.any():
        raise DataError(f"{path}: column {name!r}: not a number: {column[bad].iloc[0]!r} "
                        f"(first at {_file_line(path, bad)})")
    return values.to_numpy(dtype=np.float64)


def _counts(column: pd.Series, path: str, name: str, maximum: int) -> np.ndarray:
    values = _numbers(column, path, name)
    empty = np.isnan(values)
    if empty.any():
        raise DataError(f"{path}: column {name!r}: {int(empty.sum())} empty cells (first at "
                        f"{_file_line(path, empty)})")
    bad = (values < 0) | (values > maximum) | (values != np.round(values))
    if bad.any():
        raise DataError(f"{path}: column {name!r}: must be whole numbers in 0..{maximum:,}, "
                        f"got {column[bad].iloc[0]!r} (first at {_file_line(path, bad)})")
    return values.astype(np.int64)


def _pre_period(column: pd.Series, path: str, required: bool) -> np.ndarray:
    values = _numbers(column, path, PRE_PERIOD)
    empty = np.isnan(values)
    if required and empty.any():
        raise DataError(f"{path}: column {PRE_PERIOD!r}: {int(empty.sum())} empty cells (first "
                        f"at {_file_line(path, empty)}); --cuped needs every unit's "
                        "pre-period metric")
    bad = ~empty & ~(np.abs(values) <= MAX_PRE_PERIOD)
    if bad.any():
        raise DataError(f"{path}: column {PRE_PERIOD!r}: must be a finite number within "
                        f"+-{MAX_PRE_PERIOD:g}, got {column[bad].iloc[0]!r} "
                        f"(first at {_file_line(path, bad)})")
    return values
