"""One reader for CSV and Parquet files, with one set of cell rules for every command.

train, evaluate, convert, score, recommend, Beam scoring and the pipeline's ExampleGen all read
their files here, so a file means the same thing to each of them:

- CSV (RFC 4180, read by pyarrow's streaming C++ reader): UTF-8 with or without a byte-order
  mark; LF or CRLF line ends; fields quoted with ``"`` may hold the delimiter, ``""`` and line
  breaks; blank lines are skipped; every cell is read as the text written (``007`` and ``1e3``
  stay ``"007"`` and ``"1e3"``: ids are never retyped). Parquet columns keep their types; text
  is asked of them through `as_text`. A Parquet list column of a multi-hot feature is read as
  its elements joined with the feature's separator (`fm_keras.list_columns`); any other nested
  column is an error naming the file and column.
- A text cell is taken as written, an absent (null) one is ``""``. A NUL byte in a text cell
  of a column read is an error naming the line (CSV, libSVM/libFFM) or data row (Parquet) and
  column: NumPy's and TensorFlow's string conversions drop a trailing NUL, so ``"82\\x00"``
  and ``"82"`` would collide (`_check_nul`).
- A numeric cell (`numbers`) is a number as Arrow parses it (``1``, ``-2.5``, ``.5``, ``1e3``,
  ``+1``; spaces around it are ignored), or missing (NaN) when it is one of `MISSING_TOKENS`;
  anything else, or an infinite number, is an error naming the file, column and data row.
- libSVM (``.libsvm``/``.svm``) and libFFM (``.libffm``/``.ffm``) text files are read as the
  columns ``label`` and ``features`` (libSVM) or ``label`` and ``field_<n>`` (libFFM), multi-hot
  text cells (`fm_keras.libsvm`); their data row N is line N.
- Problems raise `DataError` naming the file and, where known, the line (CSV), data row
  (1-based, the header not counted) and column. A CSV file that pyarrow rejects (a row with
  too few or too many fields, bytes that are not UTF-8 in a column read) is scanned once more
  to name the line and column (`fm_keras.line_scan.first_problem`): pyarrow's messages name
  neither, and its invalid-row callback cannot decode a row that is not UTF-8 (Python printed
  "Exception ignored ... UnicodeDecodeError"), so this reader installs none.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from fm_keras import libsvm, line_scan, list_columns
from fm_keras.errors import DataError
from fm_keras.tfrecord import is_tfrecord

MISSING_TOKENS = ("", "nan", "NaN", "NA", "null", "None")
PARQUET_EXTENSIONS = (".parquet", ".pq")
_CSV_BLOCK_BYTES = 1 << 20
_BLANK_TAIL_BYTES = 1 << 16  # `has_rows` reads at most this much after a header


def is_parquet(path: str) -> bool:
    return path.endswith(PARQUET_EXTENSIONS)


def read_header(path: str) -> list[str]:
    """The column names of one file (its header or schema), without its rows.

    A libFFM file's are ``label`` and the ``field_<n>`` its lines have: a pass over the file
    (once per file version in a process); `missing_columns` checks names without it.

    A CSV file's header is its first record (after blank lines); its rows are not read here,
    so a bad row is reported, with its line, by the reader that reads it.

    Raises:
        DataError: the file is empty or cannot be read, the header is not UTF-8 (naming the
            line), two columns have the same name (a reader would take the first one
            silently), or it is a TFRecord file (``*.tfrecord``).
    """
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: the file is empty")
    _refuse_tfrecord(path)
    fmt = libsvm.text_format(path)
    if fmt == "libsvm":
        return [libsvm.LABEL, libsvm.FEATURES]
    if fmt == "libffm":
        stat = os.stat(path)
        return list(_libffm_header(path, stat.st_size, stat.st_mtime_ns))
    try:
        if is_parquet(path):
            names = list(pq.read_schema(path).names)
        else:
            names = _csv_header(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: cannot read: {_one_line(err)}") from None
    check_unique(path, names)
    return names


def _refuse_tfrecord(path: str) -> None:
    """A TFRecord file is not read as CSV (a new user's trial got "not UTF-8 ... re-encode the
    file"): train and evaluate read its Examples (`fm_keras.tfrecord`), other commands not."""
    if is_tfrecord(path):
        raise DataError(f"{path}: a TFRecord file of tf.train.Example rows: train and evaluate "
                        "read those; this command reads CSV, Parquet, libSVM and libFFM files")


def _csv_header(path: str) -> list[str]:
    """The names of a CSV file's header, parsed by pyarrow from the bytes of its first record
    (`fm_keras.line_scan.header_record`): no row is read."""
    record = line_scan.header_record(path)
    if not record.endswith((b"\n", b"\r")):  # a file of a header alone, no line end after it:
        record += b"\n"  # pyarrow would see "Empty CSV file or block"
    header = pacsv.read_csv(pa.py_buffer(record),
                            parse_options=pacsv.ParseOptions(newlines_in_values=True))
    return list(header.schema.names)


def check_unique(path: str, names: Sequence[str]) -> None:
    """Raises `DataError` naming the first column name that `names` (a header) holds twice."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DataError(f"{path}: column {name!r} appears twice in the header; rename one "
                            "of them (a reader would take only the first)")
        seen.add(name)


def bytes_in_memory(path: str) -> int:
    """The bytes of a file's rows once read: a Parquet file's uncompressed size (its row
    groups' ``total_byte_size``, from the footer; often ~4x its size on disk), else the file's
    size on disk (CSV and the text formats are read about as large as they are written)."""
    if not is_parquet(path):
        return os.path.getsize(path)
    try:
        meta = pq.ParquetFile(path).metadata
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: cannot read: {_one_line(err)}") from None
    return sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))


def has_rows(path: str) -> bool:
    """Whether a file holds a data row, decided cheaply: False for 0 bytes, a CSV file of a
    header (and blank lines) alone, a Parquet file of 0 rows (its footer), a libSVM/libFFM file
    of blank lines. Only the first 64 KiB after a header are read; a file that cannot be read
    this way counts as holding rows (its reader then says what is wrong).

    Spark and Hive write such part files for empty partitions (`fm_keras.data.expand_paths`
    skips them when a pattern matches several files).
    """
    size = os.path.getsize(path)
    if size == 0:
        return False
    try:
        if is_parquet(path):
            return pq.ParquetFile(path).metadata.num_rows > 0
        start = 0 if libsvm.text_format(path) else len(line_scan.header_record(path))
        if size - start > _BLANK_TAIL_BYTES:
            return True
        with open(path, "rb") as f:
            f.seek(start)
            return bool(f.read().strip())
    except (pa.ArrowException, OSError, DataError):
        return True


def missing_columns(path: str, columns: Sequence[str]) -> list[str]:
    """The names in `columns` that the file lacks, in order.

    A libFFM file has every ``field_<n>`` (a line without field n has ``""`` there), so this
    checks a libFFM file's names without reading it.
    """
    fmt = libsvm.text_format(path)
    if fmt is not None:
        return [c for c in columns if not libsvm.is_column(fmt, c)]
    header = set(read_header(path))
    return [c for c in columns if c not in header]


def record_batches(path: str, columns: Sequence[str] | None = None,
                   block_rows: int | None = 65_536, lists: Mapping[str, str] | None = None,
                   first_rows: int | None = None) -> Iterator[tuple[int, pa.RecordBatch]]:
    """Streams one file as Arrow record batches of at most `block_rows` rows.

    Args:
        path: a CSV, Parquet (``.parquet``/``.pq``), libSVM (``.libsvm``/``.svm``) or libFFM
            (``.libffm``/``.ffm``) file; any other name is read as CSV.
        columns: the columns to read (every column when None); the caller checks that the
            header has them (`read_header`).
        block_rows: rows per batch; None reads the whole file as one batch.
        lists: column -> separator of the multi-hot columns that a Parquet file may store as
            lists (`fm_keras.list_columns`): such a column comes back as joined text.
        first_rows: rows of the first batch, when it should differ from `block_rows` (e.g. a
            short first batch that starts a pipeline sooner); None: `block_rows`.

    Yields:
        ``(first_row, batch)``: the 0-based data row of the batch's first row, and the batch.
        CSV columns are ``string``; Parquet columns keep their types. Memory is bounded by
        `block_rows` (and pyarrow's read-ahead), not by the size of the file.

    Raises:
        DataError: the file is empty, has a header but no rows, holds bytes that are not
            UTF-8 in a column read (naming the line, byte and column), or a row has a
            different number of fields than the header (naming the line); a Parquet
            nested column that `fm_keras.list_columns.check_schema` rejects; for libSVM
            and libFFM, any problem of `fm_keras.libsvm.parse_lines` (naming line and token);
            a TFRecord file (``*.tfrecord``: `fm_keras.tfrecord` reads those).
    """
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: the file is empty")
    _refuse_tfrecord(path)
    fmt = libsvm.text_format(path)
    if fmt is not None:
        if fmt == "libffm" and columns is None:
            columns = read_header(path)  # every block gets the same columns
        yield from _rebatch_numbered(_text_batches(path, fmt, columns), block_rows, path,
                                     first_rows)
        return
    start, joined = 0, {}  # joined: the list columns of a Parquet file, as text
    parquet = is_parquet(path)
    names = None
    try:
        if parquet:
            parquet = pq.ParquetFile(path)
            schema = parquet.schema_arrow
            check_unique(path, schema.names)
            joined = list_columns.check_schema(
                path, pa.schema([schema.field(c) for c in columns]) if columns else schema,
                lists or {})
            pending = parquet.iter_batches(block_rows or 65_536,
                                           columns=list(columns) if columns else None)
        else:
            names = list(columns) if columns else read_header(path)
            pending = pacsv.open_csv(
                path, read_options=pacsv.ReadOptions(block_size=_CSV_BLOCK_BYTES),
                parse_options=pacsv.ParseOptions(newlines_in_values=True),
                convert_options=pacsv.ConvertOptions(
                    include_columns=names, column_types={n: pa.string() for n in names},
                    strings_can_be_null=False, quoted_strings_can_be_null=False),
                memory_pool=_pool())
        for batch in _rebatch(pending, block_rows, first_rows):
            if joined:
                batch = list_columns.join_lists(batch, joined, path, start)
            _check_nul(batch, path, start, names)
            yield start, batch
            start += batch.num_rows
    except pa.ArrowInvalid as err:
        if names is not None and start == 0 and "Empty CSV file" in str(err):
            # a header without a line end after it: pyarrow sees no block to read
            raise DataError(f"{path}: the file has a header but no rows") from None
        problem = None if parquet or names is None else line_scan.first_problem(path, names)
        raise DataError(f"{path}: {problem or 'cannot read: ' + _one_line(err)}") from None
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: cannot read: {_one_line(err)}") from None
    if start == 0:
        raise DataError(f"{path}: the file has a header but no rows")


def _text_batches(path: str, fmt: str, columns: Sequence[str] | None
                  ) -> Iterator[tuple[pa.RecordBatch, np.ndarray]]:
    """The blocks of a libSVM/libFFM file parsed (`fm_keras.libsvm.parse_lines`), with the
    libFFM fields of each. The lines are read by pyarrow's CSV reader as one column (no
    quoting; the delimiter a control character, \\x1f, that text does not hold)."""
    line = 1
    try:
        with pacsv.open_csv(
                path, read_options=pacsv.ReadOptions(block_size=_CSV_BLOCK_BYTES,
                                                     column_names=["line"]),
                parse_options=pacsv.ParseOptions(
                    delimiter="\x1f", quote_char=False, escape_char=False,
                    ignore_empty_lines=False),
                convert_options=pacsv.ConvertOptions(
                    column_types={"line": pa.string()}, strings_can_be_null=False),
                memory_pool=_pool()) as lines:
            for batch in lines:
                if batch.num_rows:
                    yield libsvm.parse_lines(batch.column(0), fmt, columns, path, line)
                    line += batch.num_rows
    except pa.ArrowInvalid as err:
        at = "Expected 1 columns" in str(err) and line_scan.find_line(path,
                                                                       lambda t: b"\x1f" in t)
        if at:
            raise DataError(f"{path}: line {at[0]}: holds the control character \\x1f") from None
        at = line_scan.find_line(path, line_scan.not_utf8)
        if at:
            raise DataError(f"{path}: line {at[0]}: not UTF-8 (byte 0x{at[1]:02x}); "
                            f"{line_scan.REENCODE}") from None
        raise DataError(f"{path}: cannot read: {_one_line(err)}") from None
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: cannot read: {_one_line(err)}") from None


def _rebatch_numbered(parsed, rows: int | None, path: str, first: int | None = None
                      ) -> Iterator[tuple[int, pa.RecordBatch]]:
    start = 0
    for batch in _rebatch((batch for batch, _ in parsed), rows, first):
        _check_nul(batch, path, start, None, row_is_line=True)
        yield start, batch
        start += batch.num_rows


@functools.lru_cache(maxsize=64)
def _libffm_header(path: str, size: int, mtime_ns: int) -> tuple[str, ...]:
    """``label`` and the fields of a libFFM file (a checked pass over it), by file version."""
    fields: set[int] = set()
    for _, block_fields in _text_batches(path, "libffm", [libsvm.LABEL]):
        fields.update(block_fields.tolist())
    return (libsvm.LABEL, *(libsvm.field_column(f) for f in sorted(fields)))


def _check_nul(batch: pa.RecordBatch, path: str, start: int, csv_names: Sequence[str] | None,
               row_is_line: bool = False) -> None:
    """Raises `DataError` when a text cell of `batch` (its first data row `start`) holds a NUL
    byte: NumPy's and TensorFlow's string conversions drop trailing NULs, so ``"82\\x00"``
    would become ``"82"`` in one place and not in another (a vocabulary that holds "82" twice
    failed in Keras). A CSV file (`csv_names`: its columns read) is scanned once more to name
    the line (`fm_keras.line_scan.first_problem`); else the data row (`row_is_line`: a
    libSVM/libFFM file's, which is its line) names it. On a clean batch the cost is one NumPy
    pass over each text column's bytes."""
    found = None  # (row, column) of the first NUL
    for name, column in zip(batch.schema.names, batch.columns):
        row = _first_nul_row(column)
        if row is not None and (found is None or row < found[0]):
            found = (row, name)
    if found is None:
        return
    problem = line_scan.first_problem(path, csv_names) if csv_names is not None else None
    if problem is None:
        where = "line" if row_is_line else "data row"
        problem = (f"{where} {start + found[0] + 1}: a NUL byte in column {found[1]!r}; "
                   f"{line_scan.REMOVE_NUL}")
    raise DataError(f"{path}: {problem}")


def _first_nul_row(column: pa.Array) -> int | None:
    """The index of the first cell of a text column that holds a 0 byte, or None (also for a
    column that is not text)."""
    if pa.types.is_string(column.type):
        width = np.int32
    elif pa.types.is_large_string(column.type):
        width = np.int64
    else:
        return None
    _, offsets, data = column.buffers()
    if data is None or len(column) == 0:
        return None
    bounds = np.frombuffer(offsets, width, count=len(column) + 1, offset=column.offset *
                           np.dtype(width).itemsize)
    first, last = int(bounds[0]), int(bounds[-1])
    if last == first:  # every cell ""
        return None
    raw = np.frombuffer(data, np.uint8, count=last - first, offset=first)
    if raw.min():  # no 0 byte: the fastest NumPy pass over bytes (~13 GB/s), no copy
        return None
    return int(np.searchsorted(bounds, first + int(np.argmin(raw)), side="right")) - 1


def as_text(array: pa.Array | pa.ChunkedArray) -> pa.Array:
    """A column as Arrow ``string``, ``""`` for a null.

    Numbers are written as Arrow casts them (900.0 -> ``"900"``), so an id column that
    Parquet stores as float (pandas' int with nulls) gives the same ids as a CSV file.
    """
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if not pa.types.is_string(array.type):
        array = pc.cast(array, pa.string())
    return pc.fill_null(array, "") if array.null_count else array


def texts(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """`as_text` as a NumPy object array of Python strings, shape [rows]."""
    return as_text(array).to_numpy(zero_copy_only=False).astype(object)


def numbers(array: pa.Array | pa.ChunkedArray, where: str,
            rows: int | np.ndarray = 0) -> np.ndarray:
    """A column as float32 numbers, NaN where a cell is missing (see the module's rules).

    Args:
        array: text (CSV) or numeric (Parquet) cells, shape [rows].
        where: what to call the column in an error, e.g. ``"f.csv: column 'age'"``.
        rows: the 0-based data row of the first cell (int), or of every cell (int array),
            for the error message.

    Returns:
        float32 array of shape [rows].

    Raises:
        DataError: a cell is neither a number nor a missing token, or is infinite; the
            message names `where`, the cell and its 1-based data row.
    """
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        text = pc.utf8_trim_whitespace(array)
        missing = pc.fill_null(pc.is_in(text, value_set=pa.array(MISSING_TOKENS)), True)
        text = pc.if_else(missing, pa.scalar(None, pa.string()), text)
        try:
            values = pc.cast(text, pa.float64())
        except pa.ArrowInvalid:
            bad = first_uncastable(text)
            raise DataError(f"{where}: non-numeric value {array[bad].as_py()!r} "
                            f"at data row {_row(rows, bad) + 1}") from None
    elif pa.types.is_null(array.type):
        values = pa.nulls(len(array), pa.float64())
    else:
        try:
            values = pc.cast(array, pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise DataError(f"{where}: a column of type {array.type} is not numeric") from None
    out = pc.fill_null(values, np.nan).to_numpy(zero_copy_only=False)
    infinite = np.isinf(out)
    if infinite.any():
        bad = int(np.flatnonzero(infinite)[0])
        raise DataError(f"{where}: infinite value at data row {_row(rows, bad) + 1}")
    return out.astype(np.float32)


def _pool() -> pa.MemoryPool:
    """jemalloc where pyarrow has it: with the default mimalloc, the streaming CSV reader's
    peak memory grew with the file (+35 MiB from 0.8M to 2.4M rows); with jemalloc it is flat
    (`BENCHMARKS.md`, "Batch scoring: one reader")."""
    try:
        return pa.jemalloc_memory_pool()
    except (NotImplementedError, pa.ArrowNotImplementedError):
        return pa.default_memory_pool()


def first_uncastable(text: pa.Array, kind: pa.DataType = pa.float64()) -> int:
    """Index of the first cell of `text` (a string array whose cast to `kind` fails) that
    Arrow cannot cast to `kind`: a bisection of casts (C++), so the cell that failed is the
    one the rule rejects, found without a Python loop."""
    lo, hi = 0, len(text)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            pc.cast(text.slice(lo, mid - lo), kind)
            lo = mid
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            hi = mid
    return lo


def _row(rows: int | np.ndarray, index: int) -> int:
    return int(rows + index) if np.isscalar(rows) else int(rows[index])


def _rebatch(batches, rows: int | None, first: int | None = None) -> Iterator[pa.RecordBatch]:
    """Batches of exactly `rows` rows (the first one `first` rows when given, the last one
    shorter) from batches of any size."""
    held: list[pa.RecordBatch] = []
    count, want = 0, first or rows
    for batch in batches:
        if batch.num_rows == 0:
            continue
        held.append(batch)
        count += batch.num_rows
        while want is not None and count >= want:
            table = pa.Table.from_batches(held)
            yield _one_batch(table.slice(0, want))
            rest = table.slice(want)
            held, count, want = rest.to_batches(), rest.num_rows, rows
    if count:
        yield _one_batch(pa.Table.from_batches(held))


def _one_batch(table: pa.Table) -> pa.RecordBatch:
    return table.combine_chunks().to_batches()[0] if table.num_rows else \
        pa.RecordBatch.from_pylist([], table.schema)


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())[:200]
