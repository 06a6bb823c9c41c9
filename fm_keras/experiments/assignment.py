"""Deterministic assignment of units to arms: a salted hash into 10,000 buckets.

    bucket(unit) = int.from_bytes(SHA-256(f"{salt}:{unit}")[:8], "big") % 10_000

and each arm owns a contiguous range of buckets, in the order of the file, sized by its weight
(50/50: buckets 0-4999 and 5000-9999). This is the scheme of the field's experiment platforms
(Optimizely's SDKs hash the user and experiment into 10,000 buckets, MAX_TRAFFIC_VALUE =
10000; Amplitude hashes ``"salt/id"``). We hash with SHA-256 rather than their MurmurHash3
because it is in Python's standard library (no dependency, the same bytes on every platform
and release, unlike ``hash()``), and its output is uniform; it costs about a microsecond a
unit. So a unit keeps its arm across requests, processes and releases; a new salt gives a new,
independent split; and 2^64 mod 10,000 leaves a bias below 1e-15 per bucket.
"""

from __future__ import annotations

import datetime
import hashlib
import sys
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from fm_keras.experiments.config import ABExperiment


def bucket(salt: str, unit: str, buckets: int = 10_000) -> int:
    """The bucket of one unit: SHA-256 of ``f"{salt}:{unit}"`` (UTF-8), first 8 bytes mod buckets."""
    digest = hashlib.sha256(f"{salt}:{unit}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % buckets


def buckets_of(salt: str, units: Iterable, buckets: int = 10_000) -> np.ndarray:
    """Buckets of many units: int64 array [n]; units are converted with ``str``."""
    return np.fromiter((bucket(salt, str(u), buckets) for u in units), dtype=np.int64)


class Assigner:
    """Maps units to arms for one experiment.

    Args:
        experiment: the validated experiment (its salt, buckets and arm weights).

    Example:
        >>> Assigner(experiment).arm("u42")
        'weighted'
    """

    def __init__(self, experiment: ABExperiment):
        self.experiment = experiment
        self.names = np.array(experiment.arm_names, dtype=object)
        # Upper bucket bound of each arm: cumulative weights in whole buckets.
        self.bounds = np.cumsum([round(a.weight * experiment.buckets) for a in experiment.arms])

    def arm(self, unit) -> str:
        """The arm of one unit: its id as text is hashed (an int 7 is ``"7"``).

        Raises:
            ValueError: None, an empty id, or a float, bool, date or time (7.0 would be hashed
                as ``"7.0"``, another unit than 7), as in the event files (``events.unit_ids``).
        """
        if not _is_unit_id(unit):
            raise ValueError(f"a unit id must be a non-empty string or an integer, got {unit!r}")
        b = bucket(self.experiment.salt, str(unit), self.experiment.buckets)
        return str(self.names[np.searchsorted(self.bounds, b, side="right")])

    def assign(self, units: Sequence) -> np.ndarray:
        """Arms of many units: object array [n] of arm names.

        Raises:
            ValueError: the first id that ``arm`` refuses, with its position. A NumPy or Arrow
                array is checked by its type (integer: all valid; float, bool, date or time:
                none), and a string array without a loop in Python.
        """
        b = buckets_of(self.experiment.salt, _checked_units(units), self.experiment.buckets)
        return self.names[np.searchsorted(self.bounds, b, side="right")]

    def frame(self, units: Sequence) -> pd.DataFrame:
        """``[unit column, bucket, arm]`` for a list of units (the offline assignment).

        Raises:
            ValueError: as ``assign``.
        """
        units = [str(u) for u in _checked_units(units)]
        b = buckets_of(self.experiment.salt, units, self.experiment.buckets)
        return pd.DataFrame({self.experiment.unit: units, "bucket": b,
                             "arm": self.names[np.searchsorted(self.bounds, b, side="right")]})


# Not ids: their text is not the id (7.0 -> "7.0"; True; a date's text depends on its type).
_NOT_IDS = (float, bool, np.floating, np.bool_, datetime.date, datetime.time,
            datetime.timedelta, np.datetime64, np.timedelta64)


def _is_unit_id(unit) -> bool:
    if type(unit) is str:  # the common case, first
        return bool(unit.strip())
    return not (unit is None or unit is pd.NA or isinstance(unit, _NOT_IDS)
                or not str(unit).strip())


def _checked_units(units) -> Sequence:
    """`units` (a sequence, NumPy/Arrow array or pandas Series) as a sequence of ids to hash.

    Raises:
        ValueError: naming the first id that is not a non-empty string or an integer (None,
            an empty id, a float, bool, date or time) and its 0-based position.
    """
    pa = sys.modules.get("pyarrow")  # no Arrow array without it: not imported for a list
    if isinstance(units, (pd.Series, pd.Index)):
        units = units.to_numpy() if isinstance(units.dtype, np.dtype) else units.array
        if not isinstance(units, np.ndarray):  # an extension array: pd.NA for nulls
            units = np.asarray(units, dtype=object)
    if pa is not None and isinstance(units, (pa.Array, pa.ChunkedArray)):
        return _checked_arrow(units)
    if isinstance(units, np.ndarray) and units.dtype.kind != "O":
        kind = units.dtype.kind
        if kind in "iu" or not len(units):
            return units
        if kind == "U":
            empty = np.char.str_len(np.char.strip(units)) == 0
            if empty.any():
                position = int(np.argmax(empty))
                _refuse(units[position], position)
            return units
        if kind in "fcbMm":
            _refuse(units[0], 0)
    if not isinstance(units, (Sequence, np.ndarray)):
        units = list(units)  # an iterator: read once
    for position, unit in enumerate(units):
        if not _is_unit_id(unit):
            _refuse(unit, position)
    return units


def _checked_arrow(units) -> list:
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = units.type.value_type if pa.types.is_dictionary(units.type) else units.type
    if len(units) and not (pa.types.is_integer(kind) or pa.types.is_string(kind)
                           or pa.types.is_large_string(kind)):
        _refuse(units[0].as_py(), 0)
    if units.null_count:
        _refuse(None, int(np.argmax(pc.is_null(units).to_numpy(zero_copy_only=False))))
    values = units.to_pylist()
    if len(units) and not pa.types.is_integer(kind):
        empty = pc.equal(pc.utf8_trim_whitespace(pc.cast(units, kind)), "")
        if pc.any(empty).as_py():
            position = int(np.argmax(empty.to_numpy(zero_copy_only=False)))
            _refuse(values[position], position)
    return values


def _refuse(unit, position: int):
    if isinstance(unit, np.generic):
        unit = unit.item()  # 1.0, not np.float64(1.0)
    raise ValueError(f"a unit id must be a non-empty string or an integer, got {unit!r} at "
                     f"position {position}")


def assign_file(experiment: ABExperiment, users: Sequence[str], output: str) -> dict:
    """Assigns the distinct units in the unit column of CSV/Parquet files; writes ``output``.

    Args:
        experiment: the experiment.
        users: CSV/Parquet files or globs with a column named ``experiment.unit``.
        output: ``.csv`` or ``.parquet`` file: unit, bucket, arm (written atomically).

    Returns:
        ``{"output", "units", "arms": {arm: units}}``.

    Raises:
        DataError: a file without the unit column, with empty unit ids or a Parquet unit
            column of floats, booleans, dates or times (``events.unit_ids``), or an output
            that cannot be written.
    """
    from fm_keras.data import check_not_an_input, expand_paths, read_frame
    from fm_keras.errors import DataError
    from fm_keras.experiments.events import unit_ids, write_table

    check_not_an_input(output, users, "--output")
    seen: dict[str, None] = {}
    for path in expand_paths(users):
        seen.update(dict.fromkeys(unit_ids(read_frame(path), path, experiment.unit).tolist()))
    if not seen:
        raise DataError(f"{users}: no units in column {experiment.unit!r}")
    table = Assigner(experiment).frame(list(seen))
    write_table(table, output)
    counts = table["arm"].value_counts()
    return {"output": output, "units": len(table),
            "arms": {a: int(counts.get(a, 0)) for a in experiment.arm_names}}
