"""ExampleGen: the spans of a run's window of logs -> cleaned, de-duplicated train and eval
examples.

Reads the files of every span of the run's rolling window of spans (``data.spans``; one span
by default) as one data set, every column as text (so a retyped or renamed column reaches
schema validation instead of failing here), drops rows matching the cleaning filters (counted
per filter), drops duplicate rows (on the ``dedup_keys``, or whole rows), and splits:
the last ``eval_fraction`` of the window by a time column, or by a stable hash of a key column,
so a user's rows stay on one side. Output: ``train.parquet``, ``eval.parquet``,
``counts.json``.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pandas as pd

from fm_keras import fsutil
from fm_keras.data import expand_paths, filter_mask, read_frame, skipped_empty_files
from fm_keras.errors import DataError, close_match
from fm_keras.pipeline.config import InputConfig


def input_files(patterns) -> list[dict]:
    """The files of a run's spans with size and mtime: the cheap fingerprint of ExampleGen's
    input (every span file of the window)."""
    files = expand_paths(list(patterns), warn=False)  # run_examplegen warns
    return [{"path": os.path.abspath(p), "size": os.path.getsize(p),
             "mtime_ns": os.stat(p).st_mtime_ns} for p in files]


def run_examplegen(data: InputConfig, patterns, out_dir: str,
                   lists: dict[str, str] | None = None, schema_columns=()) -> dict:
    """Writes ``out_dir/{train,eval}.parquet`` and ``counts.json``; returns the counts.

    `patterns`: the globs of every span of the window, read as one data set: the filters,
    de-duplication and the split apply to the union of their rows. `lists`: column ->
    separator of the multi-hot features, whose Parquet list columns are written as their
    joined text (`fm_keras.list_columns`). `schema_columns`: the feature and label columns.
    Rows are de-duplicated on ``data.dedup_keys`` (whole rows without them); where a key that
    is a `schema_columns` column is missing, on none (the validator fails the run on it).

    Raises:
        DataError: no file matches, a file is unreadable, a filter, split or dedup key column
            (other than a `schema_columns` one) is missing, or nothing is left after
            cleaning; it names the file (and the data row).
    """
    patterns = list(patterns)
    files = expand_paths(patterns)
    frames = [read_frame(p, lists=lists) for p in files]
    columns = list(dict.fromkeys(c for frame in frames for c in frame.columns))
    # index: (file number, data row), for errors that name the file and row
    frame = pd.concat(frames, keys=range(len(frames)))
    counts = {"files": [os.path.abspath(p) for p in files], "rows_read": len(frame),
              "dropped": {},
              # empty part files (Spark/Hive's empty partitions) of a glob, not read
              "empty_files_skipped": [os.path.abspath(p) for p in skipped_empty_files(patterns)]}
    # Columns some files lack (null in their rows of the union): the validator's to judge.
    counts["columns_missing_in"] = {
        c: [os.path.abspath(p) for p, f in zip(files, frames) if c not in f.columns]
        for c in columns if any(c not in f.columns for f in frames)}
    for flt in data.filters:
        _need(frame, flt.column, f"filter {flt.name!r}", files)
        hit = _filter(frame, flt, files)
        counts["dropped"][flt.name] = int(hit.sum())
        frame = frame[~hit]
    missing = [k for k in data.dedup_keys if k not in frame.columns]
    counts["dedup_keys_missing"] = missing
    unknown = [k for k in missing if k not in schema_columns]
    if unknown:  # a misspelt key would de-duplicate on the others: rows of different users
        close = close_match(unknown[0], columns)
        raise DataError(f"{files[0]}: data: dedup_keys: {unknown[0]!r} is not a column of the "
                        "data" + (f" (did you mean {close!r}?)" if close else
                                  f"; its columns: {', '.join(columns)}"))
    before = len(frame)
    # A feature or label column that is gone is schema validation's to report (the run
    # stops there): nothing is dropped as a duplicate on the remaining keys meanwhile.
    if not missing:
        frame = frame.drop_duplicates(subset=list(data.dedup_keys) or columns, keep="first")
    counts["duplicates"] = before - len(frame)
    if len(frame) < 2:
        raise DataError(f"{', '.join(files)}: {len(frame)} rows left after cleaning "
                        f"(dropped {counts['dropped']}, duplicates {counts['duplicates']})")
    is_eval = split_mask(frame, data.split.by, data.split.column, data.split.eval_fraction, files)
    os.makedirs(out_dir, exist_ok=True)
    frame[~is_eval].to_parquet(os.path.join(out_dir, "train.parquet"), index=False)
    frame[is_eval].to_parquet(os.path.join(out_dir, "eval.parquet"), index=False)
    counts.update({"rows": len(frame), "train_rows": int((~is_eval).sum()),
                   "eval_rows": int(is_eval.sum()), "columns": columns,
                   "split": {"by": data.split.by, "column": data.split.column,
                             "eval_fraction": data.split.eval_fraction}})
    fsutil.write_json(os.path.join(out_dir, "counts.json"), counts)
    return counts


def split_mask(frame: pd.DataFrame, by: str, column: str, eval_fraction: float,
               files=("data",)) -> np.ndarray:
    """Boolean eval mask: the newest rows by ``column`` (time), or a hash of ``column``.

    `frame`'s index is the data row, or (file number in `files`, data row) for several files.

    Raises:
        DataError: ``column`` is missing, or (by time) not numeric; names the file and row.
    """
    _need(frame, column, "split column", files)
    if by == "time":
        ts = pd.to_numeric(frame[column], errors="coerce")
        if ts.isna().any():
            bad = int(np.flatnonzero(ts.isna().to_numpy())[0])
            where = frame.index[bad]
            path, row = ((files[where[0]], where[1]) if isinstance(where, tuple)
                         else (files[0], where))
            raise DataError(f"{path}: split column {column!r} must be numeric time stamps, "
                            f"got {frame[column].iloc[bad]!r} at data row {int(row) + 1}")
        cut = np.quantile(ts.to_numpy(), 1 - eval_fraction)
        mask = (ts > cut).to_numpy()
        if not mask.any():  # every stamp equal: fall back to the last rows in file order
            mask = np.arange(len(frame)) >= int(len(frame) * (1 - eval_fraction))
        return mask
    buckets = np.array([int.from_bytes(hashlib.md5(v.encode()).digest()[:4], "little") % 10_000
                        for v in frame[column].astype(str)])
    return buckets < eval_fraction * 10_000


def _filter(frame: pd.DataFrame, flt, files) -> np.ndarray:
    """`filter_mask` on the rows of all `files`; an error names the file it is about."""
    try:
        return filter_mask(frame[flt.column], flt, files[0])
    except DataError:
        for i, path in enumerate(files):  # the first file that fails alone is the one to name
            if i in frame.index.get_level_values(0):
                filter_mask(frame.loc[i, flt.column], flt, path)
        raise


def _need(frame: pd.DataFrame, column: str, what: str, files) -> None:
    if column not in frame.columns:
        raise DataError(f"{files[0]}: {what}: missing column {column!r} "
                        f"(the data has {list(frame.columns)[:12]})")
