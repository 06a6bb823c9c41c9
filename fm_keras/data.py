"""Reading click logs: CSV/Parquet/libSVM/libFFM globs into checked columns, row filters,
weights, sampling.

Every problem with the input raises `DataError` naming the file and the column, so a bad log
fails before a run directory is created. Categorical and multi-hot columns are kept as strings
(raw values go into the model unchanged), numeric columns as float32 with NaN for a missing cell.
"""

from __future__ import annotations

import functools
import glob
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from fm_keras.config import DataConfig, FeatureConfig, FilterConfig, TrainingConfig
from fm_keras.errors import DataError, close_match
from fm_keras.libsvm import check_features
from fm_keras.progress import log
from fm_keras.reading import (MISSING_TOKENS, has_rows, missing_columns, numbers, read_header,
                              record_batches, texts)
from fm_keras.tfrecord import is_tfrecord, read_examples



@dataclass
class Split:
    """One split of the data, checked and filtered.

    Attributes:
        features: column name -> array of shape [rows] (object strings or float32).
        labels: float32 array of shape [rows], or None when the label is not required.
        passthrough: extra columns kept as read (ids to carry into scoring output).
        rows_read: rows before filtering.
        dropped: filter name -> rows that filter dropped.
        files: the files read, in order.
    """

    features: dict[str, np.ndarray]
    labels: np.ndarray | None
    rows_read: int
    dropped: dict[str, int] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    passthrough: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(next(iter(self.features.values())))

    def take(self, mask_or_index: np.ndarray) -> Split:
        """The rows selected by a boolean mask or an index array."""
        pick = lambda d: {k: v[mask_or_index] for k, v in d.items()}  # noqa: E731
        return Split(pick(self.features),
                     None if self.labels is None else self.labels[mask_or_index],
                     self.rows_read, dict(self.dropped), list(self.files), pick(self.passthrough))


def expand_paths(patterns: Sequence[str], shard_index: int = 0, num_shards: int = 1,
                 warn: bool = True) -> list[str]:
    """Expands globs into a sorted file list; with sharding keeps every num_shards-th file.

    A glob that matches several files skips the empty ones among them (0 bytes, a header and
    no rows: `fm_keras.reading.has_rows`), which Spark and Hive write for empty partitions,
    with one warning line (unless not `warn`; once per process for the same files) giving
    their count and the first one (`skipped_empty_files` lists them). When every file a glob matches is empty they are kept,
    so the reader's error ("the file is empty") stays; a file named without a glob is always
    kept.

    Raises:
        DataError: a pattern matches no file, or a named file does not exist.
    """
    files, skipped = _expand(patterns)
    if warn and not _WARNED_EMPTY.issuperset(skipped):  # a command expands its inputs often
        _WARNED_EMPTY.update(skipped)
        more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
        log(f"warning: skipped {len(skipped)} empty file(s) (0 bytes, or a header and no rows) "
            f"that a pattern matches: {skipped[0]}{more}")
    return files[shard_index::num_shards]


_WARNED_EMPTY: set[str] = set()  # skipped files a warning has named in this process


def skipped_empty_files(patterns: Sequence[str]) -> list[str]:
    """The empty files that `expand_paths` skips for `patterns`, in order, without a warning:
    for a run's summary."""
    return _expand(patterns)[1]


def _expand(patterns: Sequence[str]) -> tuple[list[str], list[str]]:
    """`expand_paths` of all patterns: (files kept, empty files skipped)."""
    files: list[str] = []
    skipped: list[str] = []
    for pattern in patterns:
        matches = _matches(pattern)
        if len(matches) > 1:
            empty = [p for p in matches if not _holds_rows(p)]
            if len(empty) < len(matches):
                skipped.extend(empty)
                empty_set = set(empty)
                matches = [p for p in matches if p not in empty_set]
        files.extend(matches)
    return files, skipped


def _matches(pattern: str) -> list[str]:
    """The files a pattern names (sorted glob matches, or the path itself), all existing.

    Raises:
        DataError: the pattern matches no file, or a named file does not exist.
    """
    matches = _named(pattern)
    if not matches:
        raise DataError(f"{pattern}: no file matches this pattern")
    for path in matches:
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such file{_file_hint(path)}")
    return matches


def _file_hint(path: str) -> str:
    """``' (did you mean 'NAME'?)'`` for a misspelt file name with a close one beside it
    (``trian.csv`` -> ``train.csv``), else ``''``."""
    directory = os.path.dirname(path) or "."
    try:
        names = [n for n in os.listdir(directory)
                 if os.path.isfile(os.path.join(directory, n))]
    except OSError:  # no such directory, or not listable: nothing to suggest
        return ""
    close = close_match(os.path.basename(path), names)
    return f" (did you mean {close!r}?)" if close else ""


def _named(pattern: str) -> list[str]:
    """The paths a pattern names: its sorted glob matches, or the path itself (unchecked)."""
    return sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]


def _holds_rows(path: str) -> bool:
    """`fm_keras.reading.has_rows`; a TFRecord file is empty only at 0 bytes. Looked up once
    per file version (path, size, mtime): a command expands its input patterns several times."""
    stat = os.stat(path)
    return _holds_rows_version(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=65_536)
def _holds_rows_version(path: str, size: int, mtime_ns: int) -> bool:
    return size > 0 if is_tfrecord(path) else has_rows(path)


def check_not_an_input(output: str, patterns: Sequence[str], option: str) -> None:
    """Refuses an output path that is one of the input files (it would be replaced).

    Raises:
        DataError: naming the output, the option and the input it would overwrite.
    """
    target = os.path.realpath(output)
    for path in (p for pattern in patterns for p in _matches(pattern)):  # empty ones too
        if os.path.realpath(path) == target:
            raise DataError(f"{output}: {option}: is the input {path}, which it would "
                            "overwrite; write elsewhere")


def read_frame(path: str, columns: Sequence[str] | None = None,
               lists: dict[str, str] | None = None) -> pd.DataFrame:
    """Reads one CSV or Parquet file whole, every column as text (`fm_keras.reading`'s rules;
    a null cell is ''), the frame's index the 0-based data row. `lists`: as for
    `fm_keras.reading.record_batches`."""
    if columns:
        read_header_checked(path, columns)
    return next(_read_frames(path, columns, None, lists))


def _text_frame(batch, first_row: int) -> pd.DataFrame:
    return pd.DataFrame({name: texts(batch.column(name)) for name in batch.schema.names},
                        index=pd.RangeIndex(first_row, first_row + batch.num_rows))


def column_hint(path: str, column: str, needed: Sequence[str] | None = None) -> str:
    """The hint after "missing column ...": ``' (did you mean ...?; the file has [...])'``
    from the header of the file at `path` (not the columns read), ending with
    ``'; the signature needs [...]'`` when `needed` is given."""
    header = read_header(path)
    close = close_match(column, header)
    hint = f"did you mean {close!r}?; " if close else ""
    needs = f"; the signature needs {list(needed)}" if needed is not None else ""
    return f" ({hint}the file has {header[:12]}{' ...' if len(header) > 12 else ''}{needs})"


def load_split(
    patterns: Sequence[str],
    features: Sequence[FeatureConfig],
    label: str | None,
    filters: Sequence[FilterConfig] = (),
    *,
    task: str = "binary",
    passthrough: Sequence[str] = (),
    weight: str | None = None,
    shard_index: int = 0,
    num_shards: int = 1,
) -> Split:
    """Reads, checks and filters the files matching `patterns`.

    Args:
        patterns: paths or globs of CSV, Parquet, libSVM or libFFM files (`fm_keras.reading`).
        features: the feature spec; every feature must be a column.
        label: the label column, or None for unlabeled data (scoring).
        filters: rows matching any filter are dropped and counted per filter.
        task: ``binary`` requires labels in {0, 1}; ``regression`` any finite number.
        passthrough: extra columns to carry along unchanged (e.g. ids).
        weight: a column of per-row sample weights, read into ``passthrough[weight]`` as
            float32 [rows]; each must be a finite number >= 0.
        shard_index, num_shards: read only this worker's share of the files.

    TFRecord files of ``tf.train.Example`` rows (``*.tfrecord``, `fm_keras.tfrecord`) are read
    whole, without filters or passthrough columns.
    """
    files = expand_paths(patterns, shard_index, num_shards)
    if files and all(is_tfrecord(f) for f in files):
        columns, labels = read_examples(files, features, label, task)
        return Split(columns, labels, len(next(iter(columns.values()))), {}, list(files))
    blocks = list(iter_blocks(files, features, label, filters, task=task,
                              passthrough=passthrough, weight=weight, block_rows=None))
    last = blocks[-1]
    join = lambda key: {k: np.concatenate([getattr(b, key)[k] for b in blocks])  # noqa: E731
                        for k in getattr(last, key)}
    labels = np.concatenate([b.labels for b in blocks]) if label else None
    split = Split(join("features"), labels, last.rows_read, last.dropped, files,
                  join("passthrough"))
    if len(split) == 0:
        raise DataError(f"{', '.join(files)}: no rows left after filters {split.dropped}")
    return split


def iter_blocks(
    files: Sequence[str],
    features: Sequence[FeatureConfig],
    label: str | None,
    filters: Sequence[FilterConfig] = (),
    *,
    task: str = "binary",
    passthrough: Sequence[str] = (),
    weight: str | None = None,
    block_rows: int | None = 262_144,
) -> Iterator[Split]:
    """Reads data `files` (`fm_keras.reading`) in blocks of rows, checked and filtered as
    `load_split` does.

    Memory is bounded by `block_rows`, not by the size of the files: the streaming pass of
    out-of-core training (`fm_keras.out_of_core`) fits its vocabularies and writes its shards
    from these blocks. `load_split` is these blocks concatenated.

    Args:
        files: CSV/Parquet/libSVM/libFFM paths (`expand_paths` output), read in order.
        features, label, filters, task, passthrough, weight: as for `load_split`.
        block_rows: rows read at a time per file; None reads each file whole.

    Yields:
        One `Split` per block, after the filters (it may have no rows). ``rows_read`` and
        ``dropped`` count everything read so far, so the last block's are the totals.

    Raises:
        DataError: a file is empty or unreadable, a column is missing, or a value is bad
            (naming the file, column and data row).
    """
    needed = [f.name for f in features] + ([label] if label else [])
    needed += [flt.column for flt in filters] + list(passthrough) + ([weight] if weight else [])
    needed = list(dict.fromkeys(needed))
    dropped, rows_read = {flt.name: 0 for flt in filters}, 0
    lists = multi_hot_separators(features)
    for path in files:
        check_features(path, features)
        for frame in _read_frames(path, needed, block_rows, lists):
            rows_read += len(frame)
            keep = np.ones(len(frame), dtype=bool)
            for flt in filters:
                hit = filter_mask(frame[flt.column], flt, path) & keep
                dropped[flt.name] += int(hit.sum())
                keep &= ~hit
            frame = frame[keep]
            extra = {c: frame[c].to_numpy(dtype=object) for c in passthrough}
            if weight:
                extra[weight] = _weight_column(frame[weight], weight, path)
            yield Split(
                {f.name: _feature_column(frame[f.name], f, path) for f in features},
                _label_column(frame[label], label, task, path) if label else None,
                rows_read, dict(dropped), [path], extra)


def _read_frames(path: str, columns: Sequence[str] | None, block_rows: int | None,
                 lists: dict[str, str] | None = None) -> Iterator[pd.DataFrame]:
    """The file in frames of text columns of `block_rows` rows (None: the whole file); the
    frames' index is the 0-based data row in the file, so errors name the row. `lists`: as
    for `fm_keras.reading.record_batches`."""
    read_header_checked(path, columns or [])
    for first_row, batch in record_batches(path, columns, block_rows, lists):
        yield _text_frame(batch, first_row)


def multi_hot_separators(features: Sequence[FeatureConfig]) -> dict[str, str]:
    """Column -> separator of the multi-hot `features`: the columns a Parquet file may store
    as lists (`fm_keras.list_columns`)."""
    return {f.name: f.separator for f in features if f.kind == "multi_hot"}


def read_header_checked(path: str, columns: Sequence[str]) -> None:
    """Raises `DataError` naming the first of `columns` that the file's header lacks."""
    missing = missing_columns(path, columns)
    if missing:
        raise DataError(f"{path}: missing column {missing[0]!r}{column_hint(path, missing[0])}")


def load_data_split(data: DataConfig, role: str, features: Sequence[FeatureConfig],
                    task: str) -> Split:
    """`load_split` for the train/valid/test split named by `role` of an experiment."""
    patterns = getattr(data, role)
    if not patterns:
        raise DataError(f"data: no {role!r} files configured")
    return load_split(patterns, features, data.label, data.filters, task=task)


def check_disjoint_splits(data: DataConfig, source: str | None) -> None:
    """Raises `DataError` when a validation or test file is also a training file (a glob
    such as ``data.train: logs/*.csv`` that matches ``logs/valid.csv``): its rows would be
    trained on, and early stopping, calibration and the metrics would measure them.

    Args:
        data: the experiment's data section.
        source: the experiment file, named in the message.
    """
    # Only files that exist: a shard directory, its manifest or a missing file is for the
    # readers (e.g. `fm_keras.convert.converted_shards`) to name, with its fix.
    def existing(patterns):
        return [p for pattern in patterns for p in _named(pattern) if os.path.isfile(p)]

    training = {os.path.realpath(p) for p in existing(data.train)}
    for role in ("valid", "test"):
        for path in existing(getattr(data, role)):
            if os.path.realpath(path) in training:
                raise DataError(f"{source or 'experiment'}: data: {role} file {path} is also a "
                                f"training file (data.train {list(data.train)} names it), so "
                                f"its rows would be trained on; keep it out of data.train")


def require_both_classes(split: Split, label: str) -> None:
    """Raises `DataError` when a binary label column has a single class in `split`.

    A CTR model trained without a single click (or without a non-click) learns only the
    constant; the run would complete and export it. Call it on the training split.
    """
    only = single_class(split.labels)
    if only is not None:
        files = split.files[0] + (f" (and {len(split.files) - 1} more)"
                                  if len(split.files) > 1 else "")
        raise DataError(f"{files}: label column {label!r}: every training row has label "
                        f"{only:g}; a binary model needs both clicks (1) and non-clicks (0): "
                        "check the label column and data.filters")


def single_class(labels: np.ndarray | None) -> float | None:
    """The label value every row shares, or None when there are two classes (or no rows)."""
    if labels is None or len(labels) == 0:
        return None
    first = float(labels[0])
    return first if bool(np.all(labels == first)) else None


def _feature_column(column: pd.Series, feat: FeatureConfig, path: str) -> np.ndarray:
    if feat.kind != "numeric":
        return column.to_numpy(dtype=object)
    return _numeric(column, f"{path}: column {feat.name!r} (numeric feature)")


def _numeric(column: pd.Series, where: str) -> np.ndarray:
    """`fm_keras.reading.numbers` of a text column of a frame (index: the data rows)."""
    return numbers(pa.array(column.to_numpy(dtype=object), pa.string()), where,
                   column.index.to_numpy())


def _label_column(column: pd.Series, label: str, task: str, path: str) -> np.ndarray:
    where = f"{path}: label column {label!r}"
    values = _numeric(column, where)
    if np.isnan(values).any():
        row = int(np.flatnonzero(np.isnan(values))[0])
        raise DataError(f"{where}: missing label at data row {column.index[row] + 1}")
    if task == "binary" and not np.isin(values, (0.0, 1.0)).all():
        outside = ~np.isin(values, (0.0, 1.0))
        bad = sorted(set(values[outside].tolist()))[:5]
        row = column.index[int(np.argmax(outside))] + 1
        fix = ("map the label -1 to 0 (the negative class, as libSVM files often write it)"
               if bad == [-1.0] else "use task: regression for real-valued targets")
        raise DataError(f"{where}: task 'binary' needs labels in {{0, 1}}, found {bad} (first "
                        f"at data row {row}); {fix}")
    return values


def _weight_column(column: pd.Series, name: str, path: str) -> np.ndarray:
    where = f"{path}: column {name!r} (data: weight)"
    values = _numeric(column, where)
    bad = ~(values >= 0)  # NaN (missing) too
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"{where}: {column.iloc[row]!r} at data row {column.index[row] + 1} "
                        "is not a weight (a finite number >= 0)")
    return values


def filter_mask(column: pd.Series, flt: FilterConfig, path: str) -> np.ndarray:
    """Rows of `column` [rows] (raw strings) that `flt` matches, bool [rows]; errors name
    `path`."""
    if flt.op == "is_null":
        return column.isin(MISSING_TOKENS).to_numpy()
    values = flt.value if flt.op in ("in", "not_in") else [flt.value]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if numeric:
        col = pd.to_numeric(column, errors="coerce")
        if col.isna().all() and len(col):
            raise DataError(f"{path}: filter {flt.name!r}: column {flt.column!r} is not numeric "
                            f"but the filter compares it with {flt.value!r}")
    else:
        col, values = column, [str(v) for v in values]
        present = col[~col.isin(MISSING_TOKENS)]
        if flt.op in ("<", "<=", ">", ">=") and len(present) and pd.isna(
                pd.to_numeric(values[0], errors="coerce")) and \
                pd.to_numeric(present, errors="coerce").notna().all():
            raise DataError(f"{path}: filter {flt.name!r}: column {flt.column!r} holds numbers "
                            f"but the filter orders it against the text {flt.value!r}, which "
                            "would compare as text; give a number")
    ops = {
        "==": lambda: col == values[0], "!=": lambda: col != values[0],
        "<": lambda: col < values[0], "<=": lambda: col <= values[0],
        ">": lambda: col > values[0], ">=": lambda: col >= values[0],
        "in": lambda: col.isin(values), "not_in": lambda: ~col.isin(values),
    }
    return ops[flt.op]().to_numpy(dtype=bool)


# ---------------------------------------------------------------------------------------------
# Imbalance: weights and negative downsampling


def sample_weights(labels: np.ndarray, training: TrainingConfig) -> np.ndarray:
    """Per-row weights from pos_weight / class_weight; float32 of shape [rows]."""
    if training.class_weight is not None:
        w0, w1 = training.class_weight[0], training.class_weight[1]
    else:
        w0, w1 = 1.0, training.positive_weight_ratio
    return np.where(labels > 0.5, w1, w0).astype(np.float32)


def downsample_negatives(labels: np.ndarray, rate: float, seed: int) -> np.ndarray:
    """Boolean mask keeping every positive and each negative with probability `rate`."""
    if rate >= 1.0:
        return np.ones(len(labels), dtype=bool)
    rng = np.random.default_rng(seed)
    return (labels > 0.5) | (rng.random(len(labels)) < rate)
