"""Batch scoring with an export's signatures: streamed, so memory stays flat in input size.

Files (CSV or Parquet, globs) are read in record batches by `fm_keras.reading` (the reader and
cell rules of training), the next batch read on a thread while the signature runs on the
current one, and written batch by batch to a temp file that is renamed onto the output only
when complete.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from fm_keras import libsvm, termination
from fm_keras._tf import tf
from fm_keras.arrow_text import split_ids, split_keys, string_tensor
from fm_keras.config import FeatureConfig
from fm_keras.data import check_not_an_input, column_hint, expand_paths, multi_hot_separators
from fm_keras.reading import (as_text, first_uncastable, is_parquet, missing_columns,
                               numbers, read_header, record_batches)
from fm_keras.errors import DataError, ExportError
from fm_keras.progress import log
from fm_keras.servables import export_metadata, load_export, signature_inputs

OUTPUT_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
RECOMMEND_COLUMNS = ("rank", "item_id", "score", "probability")
# With exclusion lists, `recommend`'s batches hold at most ~4 MiB of the users file (1,000
# users x 600 ids), and a file's first batch half of that: the lists of a batch are split
# (`split_ids`, on the reader thread) while the signature searches the batch before, so the
# split of a 4,096-row batch is work nothing overlaps (BENCHMARKS.md, session 16).
EXCLUSION_BATCH_BYTES = 4 << 20
# ... and the lists of a batch, padded to its longest, at most ~16 MiB of ids (`read_batches`):
# a few users with tens of thousands of ids must not widen every row of their batch.
EXCLUSION_PADDED_BYTES = 16 << 20


def default_keep(columns: Sequence[str]) -> list[str]:
    """Id columns passed through by default: ``id`` and names ending in ``_id``."""
    return [c for c in columns if c == "id" or c.endswith("_id")]


class Progress:
    """Progress on stderr (bytes of input read, rows, rows/s): on a terminal one line redrawn
    at most once a second; otherwise (a log file, a pipe) a whole line at most every
    `LOG_INTERVAL_SECONDS`, and one at the end."""

    LOG_INTERVAL_SECONDS = 30.0

    def __init__(self, total_bytes: int, enabled: bool = True):
        self.total, self.enabled = max(total_bytes, 1), enabled
        self.rows, self.done_bytes, self.started = 0, 0, time.time()
        self.tty = sys.stderr.isatty()
        self._last = 0.0 if self.tty else self.started  # a log's first line after a while

    def update(self, rows: int, done_bytes: int) -> None:
        self.rows += rows
        self.done_bytes = done_bytes
        now = time.time()
        if self.enabled and now - self._last >= (1.0 if self.tty else self.LOG_INTERVAL_SECONDS):
            self._last = now
            self._print()

    def close(self, ok: bool = True) -> None:
        if self.enabled and ok:
            self.done_bytes = self.total
            self._print()
        if self.enabled and self.tty and (ok or self._last):
            print(file=sys.stderr, flush=True)

    @property
    def rows_per_second(self) -> float:
        return self.rows / max(time.time() - self.started, 1e-9)

    def _print(self) -> None:
        frac = min(self.done_bytes / self.total, 1.0)
        bar = "#" * int(frac * 30)
        print(f"{chr(13) if self.tty else ''}fm-keras: [{bar:<30s}] {frac:6.1%} {self.rows:,} "
              f"rows {self.rows_per_second:,.0f} rows/s", end="" if self.tty else "\n",
              file=sys.stderr, flush=True)


def read_batches(path: str, types: dict[str, tf.DType], keep: Sequence[str],
                 batch_size: int, derived: dict[str, tuple[str, Callable]] | None = None,
                 lists: dict[str, str] | None = None, first_rows: int | None = None,
                 padded_bytes: int | None = None) -> Iterator[dict[str, tf.Tensor]]:
    """One file as batches of column tensors, typed as the signature wants.

    The file is read by `fm_keras.reading` (the reader and cell rules of `fm-keras train`):
    float32 inputs follow its numeric rule (a missing token is NaN, the model's fill; a
    non-number is a `DataError` naming the file, column and data row), string inputs are the
    cells as written. Text columns go from Arrow's buffers to a string tensor in C++ (one
    `tf.strings.substr` of the batch's bytes), never through Python objects per cell.

    `derived` adds values computed from a column's Arrow array: ``{name: (column, fn)}``
    yields ``name: fn(column's array)`` (e.g. `split_ids` of a list column).

    `lists`: column -> separator of the multi-hot columns a Parquet file may store as lists
    (`fm_keras.list_columns`; `export_list_columns` of the export).

    `first_rows`: rows of the first batch when it should be other than `batch_size`.

    `padded_bytes`: a batch is cut into consecutive parts whose rows times the longest cell
    of a `derived` column's source stay within this many bytes (a longer cell is a part of
    its own): `split_ids` pads every list of a batch to the longest, so one user with 20,000
    excluded ids would otherwise widen 4,096 rows to 20,000 slots (gigabytes).

    Yields:
        ``{column: tensor of shape [rows]}``, float32 or string, at most `batch_size` rows.

    Raises:
        DataError: the file is empty or unreadable, lacks a column, or a cell breaks a rule.
    """
    derived = derived or {}
    sources = list(dict.fromkeys(c for c, _ in derived.values()))
    wanted = list(dict.fromkeys([*types, *sources, *keep]))
    check_columns(path, list(types), keep, sources=[c for c in sources if c not in types])
    # Two stages on two threads (with the caller's `_prefetched`): pyarrow parses the next
    # batch while this one becomes tensors.
    for start, whole in _prefetched(record_batches(path, wanted, batch_size, lists,
                                                   first_rows)):
        parts = [(0, whole.num_rows)] if padded_bytes is None or not sources else \
            padding_bounded(np.max([pc.binary_length(as_text(whole.column(c))).to_numpy()
                                    for c in sources], axis=0), padded_bytes)
        for begin, end in parts:
            batch, first = whole.slice(begin, end - begin), start + begin
            yield {**{name: tf.constant(numbers(batch.column(name),
                                                f"{path}: column {name!r}", first))
                      if types.get(name) == tf.float32 else string_tensor(batch.column(name))
                      for name in [*types, *keep]},
                   **{name: fn(batch.column(column)) for name, (column, fn) in derived.items()}}


def padding_bounded(lengths: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Consecutive row ranges ``[(begin, end), ...]`` covering ``range(len(lengths))`` in
    which (rows x the longest length) <= `budget`; a row longer than `budget` is a range of
    its own. One range when the whole batch fits (the usual case: no Python loop)."""
    n = len(lengths)
    if n == 0 or n * int(lengths.max()) <= budget:
        return [(0, n)]
    parts, begin, widest = [], 0, 0
    for i, length in enumerate(lengths.tolist()):
        wider = max(widest, length)
        if i > begin and (i + 1 - begin) * wider > budget:
            parts.append((begin, i))
            begin, wider = i, length
        widest = wider
    parts.append((begin, n))
    return parts


def export_list_columns(meta: dict) -> dict[str, str]:
    """Column -> separator of the multi-hot features of an export (a recall export's from
    the metadata of the ranking export it was built from; {} when that is gone)."""
    entries = meta.get("features")
    if entries is None and meta.get("ranking_model"):
        try:
            entries = export_metadata(meta["ranking_model"])[1].get("features")
        except ExportError:
            return {}
    return multi_hot_separators([FeatureConfig(**e["config"]) for e in entries or []])


def _prefetched(batches: Iterator) -> Iterator:
    """`batches`, the next one read on a thread while the caller works on this one (pyarrow
    and TF release the GIL); an error of the reader is raised where the batch is taken."""
    with ThreadPoolExecutor(max_workers=1) as reader:
        ahead = reader.submit(next, batches, None)
        while (batch := ahead.result()) is not None:
            ahead = reader.submit(next, batches, None)
            yield batch


def _bytes_per_row(path: str) -> float:
    """Average bytes per row from the first MiB (CSV) or the footer: for the progress bar and
    `run_signature`'s `batch_bytes`."""
    size = os.path.getsize(path)
    if is_parquet(path):
        return size / max(pq.ParquetFile(path).metadata.num_rows, 1)
    with open(path, "rb") as f:
        sample = f.read(1 << 20)
    return len(sample) / max(sample.count(b"\n"), 1)


def check_columns(path: str, needed: Sequence[str], keep: Sequence[str] = (),
                  local: str | None = None, sources: Sequence[str] = ()) -> None:
    """Raises `DataError` naming the first column that the file lacks: of the signature's
    inputs `needed` (the message lists them), then of the `sources` of derived inputs
    (``recommend``'s ``--exclude-column``), then of the columns to pass through, `keep`
    (`local`: where the file at `path` is read from, when it is a copy)."""
    where = local or path
    # in that order: needed ones first
    missing = missing_columns(where, [*needed, *sources, *keep])
    if not missing:
        return
    if missing[0] in needed:
        raise DataError(f"{path}: missing column {missing[0]!r}"
                        f"{column_hint(where, missing[0], needed)}")
    if missing[0] in sources:  # a new user's trial read "the signature needs" it
        raise DataError(f"{path}: missing column {missing[0]!r}, the lists of item ids to "
                        f"exclude (--exclude-column){column_hint(where, missing[0])}")
    # not the signature's: a new user's trial read "the signature needs" them
    raise DataError(f"{path}: missing column {missing[0]!r}, one to pass through to the "
                    f"output (--keep){column_hint(where, missing[0])}")


def output_format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in OUTPUT_FORMATS:
        raise ExportError(f"--output {path}: unknown format {ext or '(none)'!r}; use .csv or "
                          ".parquet")
    return OUTPUT_FORMATS[ext]


def check_output(path: str) -> None:
    """Fails before any work if the output cannot be written."""
    output_format(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ExportError(f"--output {path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ExportError(f"--output {path}: directory {directory} is not writable")
    if os.path.isdir(path):
        raise ExportError(f"--output {path}: is a directory; give a file name")


def temp_output(path: str) -> str:
    """The hidden temp file beside `path` that a command writes before renaming it into place
    (``.tmp-<pid>-<name>``: the pid keeps two processes writing one output apart)."""
    return os.path.join(os.path.dirname(os.path.abspath(path)),
                        f".tmp-{os.getpid()}-{os.path.basename(path)}")


class TableWriter:
    """Writes record batches to a temp file beside `path`; `commit` renames it into place."""

    def __init__(self, path: str):
        self.path, self.format = path, output_format(path)
        self.tmp = temp_output(path)
        self._writer = None

    def write(self, table: pa.Table) -> None:
        if self._writer is None:
            self._writer = (pq.ParquetWriter(self.tmp, table.schema) if self.format == "parquet"
                            else pacsv.CSVWriter(self.tmp, table.schema))
        self._writer.write_table(table)

    def commit(self) -> None:
        """Closes the temp file and renames it into place: the command's output is complete,
        so a SIGTERM from here on no longer stops it (``fm_keras.termination``)."""
        self._writer.close()
        with termination.committing():
            os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


def kept_types(paths: Sequence[str], keep: Sequence[str]) -> dict[str, pa.DataType]:
    """The types the kept (``--keep``) columns of the files `paths` are written with, where
    not text.

    A Parquet file's integer, floating-point and boolean columns keep their type, and so does
    the label of a libSVM / libFFM file (a number by the format's rule: float64), when every
    file gives the column that same type; every other kept column is written as text, as read
    (CSV cells are text: an id such as ``007`` stays ``007``; a column that is int64 in one
    file and text or float64 in another is text).
    """
    types = None
    for path in paths:
        found = _file_kept_types(path, keep)
        types = found if types is None else \
            {c: kind for c, kind in types.items() if found.get(c) == kind}
    return types or {}


def _file_kept_types(path: str, keep: Sequence[str]) -> dict[str, pa.DataType]:
    """`kept_types` of one file."""
    if is_parquet(path):
        schema = pq.read_schema(path)
        return {c: schema.field(c).type for c in keep if c in schema.names
                and any(is_kind(schema.field(c).type) for is_kind in _NUMERIC_KINDS)}
    if libsvm.text_format(path) is not None and libsvm.LABEL in keep:
        return {libsvm.LABEL: pa.float64()}
    return {}


_NUMERIC_KINDS = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean)


def kept_array(values: np.ndarray, kind: pa.DataType | None, where: str,
               first_row: int | None = None) -> pa.Array:
    """A kept column's cells as read (UTF-8 bytes, "" for a null; object array [rows]) as an
    Arrow array of type `kind` ("" -> null), or text when `kind` is None. A column that is
    also a numeric input of the signature comes as the float32 values the model read (NaN:
    missing) and is written so.

    Args:
        first_row: the 0-based data row of the first cell in its file, when the cells come
            from one file: an error then names the row of the cell that is not `kind`.

    Raises:
        DataError: a cell is not a `kind` value (`where` names the file and column).
    """
    if values.dtype != object:
        return pa.array(values)
    text = pa.array(values, pa.string())
    if kind is None:
        return text
    text = pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)
    try:
        return pc.cast(text, kind)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
        fix = "; give the column one type in every input file, or leave it out of --keep"
        if first_row is None:
            raise DataError(f"{where}: kept column (--keep) is {kind} in every input file "
                            f"but holds a cell that is not: {str(error).splitlines()[0]}"
                            f"{fix}") from None
        bad = first_uncastable(text, kind)
        raise DataError(f"{where}: kept column (--keep) is {kind} in the other input files, "
                        f"but {text[bad].as_py()!r} at data row {first_row + bad + 1} is "
                        f"not{fix}") from None


def outputs_table(keep: dict[str, pa.Array], outputs: dict[str, np.ndarray],
                  fmt: str) -> pa.Table:
    """Kept input columns (`kept_array`s), then outputs; a 2-D output becomes NAME_0.. (CSV) or
    a list (Parquet)."""
    columns = dict(keep)
    for name in sorted(outputs):
        value = outputs[name]
        kind = pa.string() if value.dtype == object else None  # bytes decode as UTF-8
        if value.ndim == 1:
            columns[name] = pa.array(value, kind)
        elif fmt == "parquet":
            columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(value.reshape(-1), kind),
                                                              value.shape[1])
        else:
            for j in range(value.shape[1]):
                columns[f"{name}_{j}"] = pa.array(value[:, j], kind)
    return pa.table(columns)


def column_inputs(version_dir: str, signature: str, fn, meta: dict,
                  derived: Collection[str] = ()) -> dict[str, tf.TensorSpec]:
    """The inputs of the signature `fn` (`fm_keras.servables.signature_inputs`) that `score`
    reads from files, one value per row and column.

    Args:
        version_dir, signature: the export and the signature's name, for the message.
        meta: the export's metadata.
        derived: inputs computed otherwise (`run_signature`'s `derive`), which may be lists.

    Raises:
        ExportError: an input of rank 2 not in `derived` (a recall export's
            ``exclude_item_ids`` / ``exclude_item_keys``: no column holds those lists;
            `recommend` makes them from its exclusion column).
    """
    specs = signature_inputs(fn, meta)
    lists = [n for n, spec in specs.items() if n not in derived and spec.shape.rank == 2]
    if lists:
        raise ExportError(f"{version_dir}: signature {signature!r} takes {lists[0]} as lists "
                          f"[rows, n]; `score` reads one value per column, use "
                          f"`fm-keras recommend --exclude-column COLUMN` for exclusions")
    return specs


def run_signature(model: str, inputs: Sequence[str], output: str, *,
                  signature: str = "serving_default", batch_size: int = 16_384,
                  keep: Sequence[str] | None = None, progress: bool = True,
                  derive: dict[str, tuple[str, Callable]] | None = None,
                  to_table: Callable[[dict, dict, str], pa.Table] = outputs_table,
                  lists: dict[str, str] | None = None, batch_bytes: int | None = None,
                  padded_bytes: int | None = None) -> dict:
    """Streams files through one signature of an export into `output`; returns a summary.

    Args:
        model: a version or model directory of an fm_keras export.
        inputs: CSV/Parquet paths or globs.
        signature: the signature to run; its raw inputs must be columns of the files (an
            input of rank 2, an exclusion list, only from `derive`: else ExportError).
        keep: input columns copied to the output (default: id columns), typed by `kept_types`
            of the files.
        derive: signature inputs computed from a column of the files, not read as they are:
            ``{input: (column, fn of its Arrow array)}`` (e.g. the exclusion lists of
            `recommend`).
        to_table: builds the output rows of a batch from (kept columns, outputs, format).
        lists: columns (besides the export's multi-hot features) that a Parquet file may
            store as lists, with the separator to join them with.
        batch_bytes: also cap a batch at about this many bytes of its file (rows estimated
            from the file's average row size, at least one row), and make a file's first batch
            half as long, so that the reader's work on the second overlaps the signature's
            on the first sooner; None: `batch_size` rows throughout.
        padded_bytes: `read_batches`' bound on a batch's padded `derive` lists.
    """
    check_output(output)
    if batch_size < 1:
        raise ExportError(f"--batch-size must be at least 1, got {batch_size}")
    files = expand_paths(list(inputs))
    check_not_an_input(output, files, "--output")
    version_dir, loaded, meta = load_export(model)
    if signature not in loaded.signatures:
        raise ExportError(f"{version_dir}: no signature {signature!r}; it has "
                          f"{sorted(loaded.signatures)}")
    fn = loaded.signatures[signature]
    derived = set(derive or {})
    types = {name: spec.dtype for name, spec in
             column_inputs(version_dir, signature, fn, meta, derived).items()}
    read_types = {n: t for n, t in types.items() if n not in derived}
    lists = {**export_list_columns(meta), **(lists or {})}
    keep = list(keep) if keep is not None else default_keep(read_header(files[0]))
    keep_types = kept_types(files, keep)
    fmt = output_format(output)
    warm = time.time()
    fn(**{n: tf.constant([0.0] if t == tf.float32 else [""], t) if n not in derived
          else tf.constant([[""]]) if t == tf.string else tf.zeros([1, 1], t)
          for n, t in types.items()})  # the first call optimizes the graph
    warm = time.time() - warm
    writer = TableWriter(output)
    bar = Progress(sum(os.path.getsize(f) for f in files), enabled=progress)
    started, done_bytes = time.time(), 0
    # Converting and writing a batch (pyarrow, releases the GIL) overlaps the next model call.
    write_thread, pending = ThreadPoolExecutor(max_workers=1), None
    try:
        for path in files:
            # The next batch is read and parsed while the signature runs on this one.
            per_row, rows_in_file = _bytes_per_row(path), 0
            rows, first_rows = batch_size, None
            if batch_bytes is not None:
                rows = max(1, min(batch_size, int(batch_bytes / max(per_row, 1.0))))
                first_rows = max(1, rows // 2)
            for columns in _prefetched(read_batches(path, read_types, keep, rows, derive,
                                                    lists, first_rows, padded_bytes)):
                outputs = {k: v.numpy() for k, v in fn(**{n: columns[n] for n in types}).items()}
                kept = {k: kept_array(columns[k].numpy(), keep_types.get(k),
                                      f"{path}: column {k!r}") for k in keep}
                if pending is not None:
                    pending.result()
                pending = write_thread.submit(
                    lambda kept=kept, outputs=outputs: writer.write(to_table(kept, outputs, fmt)))
                n = len(next(iter(outputs.values())))
                rows_in_file += n
                bar.update(n, done_bytes + min(int(rows_in_file * per_row),
                                               os.path.getsize(path)))
            done_bytes += os.path.getsize(path)
        if pending is not None:
            pending.result()
        writer.commit()
    except BaseException:
        if pending is not None:
            pending.cancel()
            try:
                pending.result()
            except Exception:  # noqa: BLE001  (the first error is the one to report)
                pass
        writer.abort()
        bar.close(ok=False)
        raise
    finally:
        write_thread.shutdown()
    bar.close()
    seconds = time.time() - started
    return {"model": version_dir, "signature": signature, "output": output,
            "rows": bar.rows, "files": len(files), "seconds": round(seconds, 3),
            "warmup_seconds": round(warm, 3),
            "rows_per_second": round(bar.rows / max(seconds, 1e-9)), "format": meta.get("format")}


def recommend(model: str, users: Sequence[str], output: str, k: int, *,
              exclude_column: str | None = None, keep: Sequence[str] | None = None,
              batch_size: int = 4096, progress: bool = True) -> dict:
    """Top-k items per user row of `users` with a recall export, one output row per item.

    Output columns: the kept user columns, ``rank`` (1 = best), ``item_id``, ``score`` (the
    FM logit; a regression model's prediction) and ``probability`` (calibrated; none for a
    regression model). With `exclude_column` (a ``|``-separated list of item ids
    per user, e.g. already seen; spaces around an id are dropped), those items are left out;
    a user with fewer than k items left gets fewer rows. A `k` above the catalog size is
    clamped to it, with a warning. With `exclude_column`, a batch holds at most
    `EXCLUSION_BATCH_BYTES` of the file as well as `batch_size` rows, and is cut where its
    lists, padded to the longest, would pass `EXCLUSION_PADDED_BYTES`.

    Returns:
        `run_signature`'s summary with ``k`` (after clamping) and ``users_fewer_than_k``: the
        user rows that got fewer than k items (exclusions, a small catalog); with
        `exclude_column` also `fm_keras.catalog_check.UnknownIds.summary` (the excluded ids
        that are not in the catalog, which exclude nothing).

    Raises:
        ExportError: `k` < 1 or above the k the recall model was indexed with.
    """
    version_dir, meta = export_metadata(model, expect="fm_keras.recall")  # run_signature loads it
    if k > meta["items"]:
        log(f"warning: --k {k} is larger than the catalog ({meta['items']:,} items): "
            f"recommending at most {meta['items']:,} items per user")
        k = meta["items"]
    if not 1 <= k <= meta["k"]:
        why = (f"the catalog holds {meta['items']} items" if meta["k"] >= meta["items"]
               else "the k this recall model was indexed with; rebuild it with 'fm-keras index "
                    "--k'")
        raise ExportError(f"--k must be between 1 and {meta['k']} ({why}), got {k}")
    if keep is None:  # the users' id columns, minus names the output uses itself
        keep = [c for c in default_keep(read_header(expand_paths(list(users))[0]))
                if c not in RECOMMEND_COLUMNS]
    clash = sorted(set(keep) & set(RECOMMEND_COLUMNS))
    if clash:
        raise ExportError(f"--keep {clash} would clash with the output columns "
                          f"{list(RECOMMEND_COLUMNS)}")
    derive = unknown = None
    # An export whose item ids are 1-8 bytes also takes the lists as item keys: half the work.
    signature = ("exclude_seen_keys" if "exclude_seen_keys" in meta.get("signatures", {})
                 else "exclude_seen") if exclude_column else "serving_default"
    if exclude_column:  # "a|b|c" -> [rows, longest list] ids ("" pads) or keys (0 pads)
        from fm_keras.catalog_check import UnknownIds
        from fm_keras.recall import catalog_ids

        unknown = UnknownIds(catalog_ids(version_dir),
                             by_item_keys=signature == "exclude_seen_keys")
        derive = ({"exclude_item_keys": (exclude_column, lambda array: unknown.count_keys(
                      split_keys(array), array))} if signature == "exclude_seen_keys" else
                  {"exclude_item_ids": (exclude_column,
                                        lambda array: unknown.count(split_ids(array)))})

    short = [0]  # user rows with fewer than k items (batches are written one at a time)

    def to_table(kept, outputs, fmt):
        n = outputs["item_ids"].shape[0]
        top = min(k, outputs["item_ids"].shape[1])
        ids = outputs["item_ids"][:, :top]
        found = ids != b""  # a pad slot: fewer than k items left after exclusion
        short[0] += int(np.sum(found.sum(axis=1) < k))
        user_rows = pa.array(np.repeat(np.arange(n), top)[found.reshape(-1)])
        columns = {c: v.take(user_rows) for c, v in kept.items()}
        columns["rank"] = pa.array(np.tile(np.arange(1, top + 1), n)[found.reshape(-1)])
        columns["item_id"] = pa.array(ids.reshape(-1)[found.reshape(-1)], pa.string())
        for name, out in (("score", "scores"), ("probability", "probabilities")):
            if out in outputs:  # a regression model's recall export has no probabilities
                columns[name] = pa.array(outputs[out][:, :top].reshape(-1)[found.reshape(-1)])
        return pa.table(columns)

    summary = run_signature(model, users, output, batch_size=batch_size, keep=keep,
                            progress=progress, derive=derive, to_table=to_table,
                            signature=signature,
                            lists={exclude_column: "|"} if exclude_column else None,
                            batch_bytes=EXCLUSION_BATCH_BYTES if exclude_column else None,
                            padded_bytes=EXCLUSION_PADDED_BYTES if exclude_column else None)
    summary.update(k=k, users_fewer_than_k=short[0], **(unknown.summary() if unknown else {}))
    return summary
