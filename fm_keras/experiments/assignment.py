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

import hashlib
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
            ValueError: None, an empty id, or a float or bool (7.0 would be hashed as
                ``"7.0"``, another unit than 7), as in the event files (``events.unit_ids``).
        """
        if unit is None or isinstance(unit, (float, bool, np.floating)) or not str(unit).strip():
            raise ValueError(f"a unit id must be a non-empty string or an integer, got {unit!r}")
        b = bucket(self.experiment.salt, str(unit), self.experiment.buckets)
        return str(self.names[np.searchsorted(self.bounds, b, side="right")])

    def assign(self, units: Sequence) -> np.ndarray:
        """Arms of many units: object array [n] of arm names."""
        b = buckets_of(self.experiment.salt, units, self.experiment.buckets)
        return self.names[np.searchsorted(self.bounds, b, side="right")]

    def frame(self, units: Sequence) -> pd.DataFrame:
        """``[unit column, bucket, arm]`` for a list of units (the offline assignment)."""
        units = [str(u) for u in units]
        b = buckets_of(self.experiment.salt, units, self.experiment.buckets)
        return pd.DataFrame({self.experiment.unit: units, "bucket": b,
                             "arm": self.names[np.searchsorted(self.bounds, b, side="right")]})


def assign_file(experiment: ABExperiment, users: Sequence[str], output: str) -> dict:
    """Assigns the distinct units in the unit column of CSV/Parquet files; writes ``output``.

    Args:
        experiment: the experiment.
        users: CSV/Parquet files or globs with a column named ``experiment.unit``.
        output: ``.csv`` or ``.parquet`` file: unit, bucket, arm (written atomically).

    Returns:
        ``{"output", "units", "arms": {arm: units}}``.

    Raises:
        DataError: a file without the unit column, with empty or floating-point unit ids
            (``events.unit_ids``), or an output that cannot be written.
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
