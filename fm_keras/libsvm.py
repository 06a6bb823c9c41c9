"""libSVM and libFFM text files read as columns, so that every command reads them as it reads CSV.

The two sparse text formats of the FM tools (libFM, libFFM, xLearn; Chang & Lin 2011, "LIBSVM: a
library for support vector machines", for the libSVM line; Juan et al. 2016, "Field-aware
Factorization Machines for CTR Prediction", for the libFFM line)::

    file.libsvm / file.svm      label idx:val idx:val ...
    file.libffm / file.ffm      label field:idx:val field:idx:val ...

become the columns of a CSV file with a header, which the rest of fm_keras reads like any other:

- ``label``: the label as written (a number).
- libSVM: ``features``, one weighted multi-hot cell per line, the line's tokens joined by ``|``
  (``3:0.5 7:1`` -> ``"3:0.5|7:1"``): the multi-hot text rule of `fm_keras.features` (separator
  ``|``, weight after the last ``:``), so ``idx`` is the value and ``val`` its weight.
- libFFM: ``field_<n>`` per field ``n`` (a non-negative integer, written without leading
  zeros in the column name), holding the ``idx:val`` tokens of that field joined by ``|``;
  ``""`` in a line without that field. Any ``field_<n>`` is a column of every libFFM file.

Rules (one per problem, each an error naming the file, the line and the token): tokens are
separated by ASCII spaces and tabs; a line is never blank; the label and every ``val`` are
numbers by the multi-hot weight rule (`fm_keras.fitting.NUMBER`: ``1``, ``-2.5``, ``.5``,
``1e3``, ``+1``) and finite as float32; ``idx`` is any text without ``:``, ``|`` or spaces
(``007`` stays ``"007"``), never empty. No comments, no ``qid:``.

The parse runs over a block's bytes with NumPy (no Python loop per line or token).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fm_keras.config import FeatureConfig
from fm_keras.errors import DataError
from fm_keras.fitting import NUMBER

LIBSVM_EXTENSIONS = (".libsvm", ".svm")
LIBFFM_EXTENSIONS = (".libffm", ".ffm")
LABEL = "label"
FEATURES = "features"
FIELD_PREFIX = "field_"
SEPARATOR = "|"  # the multi-hot separator of the columns made
WEIGHT_SEPARATOR = ":"
_LINE = {"libsvm": "label idx:val idx:val ...", "libffm": "label field:idx:val ..."}
NAMES = {"libsvm": "libSVM", "libffm": "libFFM"}
_FIELD_COLUMN = re.compile(re.escape(FIELD_PREFIX) + r"(0|[1-9][0-9]{0,8})")


def _byte_table(chars: bytes) -> np.ndarray:
    table = np.zeros(256, bool)
    table[np.frombuffer(chars, np.uint8)] = True
    return table


_SPACE = _byte_table(b" \t\v\f\r")
_NON_NUMBER = ~_byte_table(b"0123456789.eE+-")
_NON_DIGIT = ~_byte_table(b"0123456789")
_NUMBER_TEXT = "^(?:" + NUMBER + ")$"


def text_format(path: str) -> str | None:
    """``"libsvm"``, ``"libffm"`` or None (not a libSVM/libFFM file), from the extension."""
    if path.endswith(LIBSVM_EXTENSIONS):
        return "libsvm"
    if path.endswith(LIBFFM_EXTENSIONS):
        return "libffm"
    return None


def field_column(field: int) -> str:
    """The column of libFFM field `field`: ``field_<n>``."""
    return f"{FIELD_PREFIX}{int(field)}"


def is_column(fmt: str, name: str) -> bool:
    """Whether every file of format `fmt` has the column `name`."""
    if fmt == "libsvm":
        return name in (LABEL, FEATURES)
    return name == LABEL or _FIELD_COLUMN.fullmatch(name) is not None


def parse_lines(lines: pa.Array, fmt: str, columns: Sequence[str] | None, path: str,
                first_line: int) -> tuple[pa.RecordBatch, np.ndarray]:
    """One block of lines of a libSVM/libFFM file as a record batch of text columns.

    Args:
        lines: the lines, Arrow ``string`` of shape [lines], without their line ends.
        fmt: ``"libsvm"`` or ``"libffm"`` (`text_format`).
        columns: the columns to make (see the module's docstring); None: ``label`` and
            ``features`` (libSVM), or ``label`` and the fields this block has (libFFM).
        path: the file, for errors.
        first_line: the 1-based line number of ``lines[0]`` in the file, for errors.

    Returns:
        ``(batch, fields)``: the batch (``string`` columns, one row per line, in `columns`
        order) and the sorted libFFM field numbers the block has (int64; empty for libSVM).

    Raises:
        DataError: a blank line, a label or value that is not a finite number, a token
            that is not ``idx:val`` (``field:idx:val``), or a field that is not a
            non-negative integer; the message names the file, line and token.
    """
    block = _Block(lines, fmt, path, first_line)
    fields = np.unique(block.field) if fmt == "libffm" else np.zeros(0, np.int64)
    if columns is None:
        columns = [LABEL, FEATURES] if fmt == "libsvm" else \
            [LABEL, *(field_column(f) for f in fields)]
    for name in columns:
        if not is_column(fmt, name):
            raise DataError(f"{path}: missing column {name!r} (a {NAMES[fmt]} file has "
                            f"{_columns_hint(fmt)})")
    lists = block.columns([name for name in columns if name != LABEL])
    return pa.RecordBatch.from_arrays([block.label if name == LABEL else lists[name]
                                       for name in columns], names=list(columns)), fields


def check_features(path: str, features: Sequence[FeatureConfig]) -> None:
    """Checks that the feature spec reads a libSVM/libFFM file's columns as what they are.

    Raises:
        DataError: a feature names a ``features``/``field_<n>`` column of the file at
            `path` but is not ``multi_hot`` with separator ``|`` and weight_separator ``:``
            (it would read ``"3:0.5|7:1"`` as one category or one token).
    """
    fmt = text_format(path)
    if fmt is None:
        return
    for f in features:
        if f.name != LABEL and is_column(fmt, f.name) and (
                f.kind != "multi_hot" or f.separator != SEPARATOR
                or f.weight_separator != WEIGHT_SEPARATOR):
            raise DataError(
                f"{path}: feature {f.name!r}: a {NAMES[fmt]} column holds weighted multi-hot "
                f"text ('idx:val|idx:val'): declare it kind: multi_hot with separator "
                f"{SEPARATOR!r} and weight_separator {WEIGHT_SEPARATOR!r} (the defaults)")


def _columns_hint(fmt: str) -> str:
    """The columns a `fmt` file has, in words, for an error message."""
    return (f"{LABEL!r} and {FEATURES!r}" if fmt == "libsvm" else
            f"{LABEL!r} and {FIELD_PREFIX}<n> for each field n")


class _Block:
    """The tokens of a block of lines, checked: byte positions in the block's text.

    Every rule is checked on every token, and the first problem in the block (by position)
    is the one reported.
    """

    def __init__(self, lines: pa.Array, fmt: str, path: str, first_line: int):
        self.fmt, self.path, self.first_line = fmt, path, first_line
        self.offsets, self.data = _buffers(lines)
        self.lines = len(lines)
        start, end = _tokens(self.data, self.offsets)
        line = np.searchsorted(self.offsets, start, "right") - 1
        first = np.ones(len(start), bool)
        first[1:] = line[1:] != line[:-1]
        self._problems: list[tuple[int, int, str]] = []  # (byte, line, message)
        self._blank_lines(line[first])
        self.label = self._labels(start[first], end[first])
        self.start, self.end, self.line = start[~first], end[~first], line[~first]
        self._tokens_checked()
        if self._problems:
            raise DataError(min(self._problems)[2])

    def columns(self, names: Sequence[str]) -> dict[str, pa.Array]:
        """The multi-hot text columns `names` (``features`` or ``field_<n>``), each [lines]:
        one gather of the tokens wanted, in (column, line) order; each column is a slice."""
        if self.fmt == "libsvm":
            number = {name: 0 for name in names}
            group, payload = np.zeros(len(self.start), np.int64), self.start
        else:
            number = {name: int(name[len(FIELD_PREFIX):]) for name in names}
            group, payload = self.field, self.first_colon + 1
        wanted = np.unique(np.array(list(number.values()), np.int64))
        rank = np.searchsorted(wanted, group)  # each token's column among `wanted`
        found = rank < len(wanted)
        found[found] = wanted[rank[found]] == group[found]
        order = np.flatnonzero(found)[np.argsort(rank[found], kind="stable")]
        joined = _join(self.data, payload[order], self.end[order],
                       rank[order] * self.lines + self.line[order], len(wanted) * self.lines)
        return {name: joined.slice(int(np.searchsorted(wanted, n)) * self.lines, self.lines)
                for name, n in number.items()}

    def _problem(self, position: int, message: str, line: int | None = None) -> None:
        if line is None:  # the line of a token (an empty line has no bytes, no tokens)
            line = int(np.searchsorted(self.offsets, position, "right") - 1)
        where = f"{self.path}: line {self.first_line + line}"
        self._problems.append((position, line, f"{where}: {message} (a {NAMES[self.fmt]} line "
                                               f"is {_LINE[self.fmt]!r})"))

    def _token_problem(self, bad: np.ndarray, message) -> None:
        """Reports the first token of mask `bad`; `message(index)` says what is wrong."""
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            token = _text(self.data[self.start[i]:self.end[i]])
            self._problem(int(self.start[i]), f"token {token!r}{message(i)}")

    def _blank_lines(self, with_tokens: np.ndarray) -> None:
        blank = np.ones(self.lines, bool)
        blank[with_tokens] = False
        if blank.any():
            line = int(np.flatnonzero(blank)[0])
            self._problem(int(self.offsets[line]), "blank line", line)

    def _labels(self, start: np.ndarray, end: np.ndarray) -> pa.Array:
        text = _gather(self.data, start, end)
        bad = _not_numbers(text)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            self._problem(int(start[i]), f"label {_text(self.data[start[i]:end[i]])!r} is not "
                                         "a finite number")
        return text

    def _tokens_checked(self) -> None:
        """idx:val (field:idx:val) tokens, val a number, field a non-negative integer."""
        colon = np.flatnonzero(self.data == ord(WEIGHT_SEPARATOR))
        before = np.searchsorted(colon, self.start)  # colons before each token
        want = 1 if self.fmt == "libsvm" else 2
        shaped = np.searchsorted(colon, self.end) - before == want
        colon = np.append(colon, 0)  # where a token has too few colons: any position
        self.first_colon = colon[np.where(shaped, before, -1)]
        last = colon[np.where(shaped, before + want - 1, -1)]
        shaped &= (self.first_colon > self.start) & (last + 1 < self.end)
        if want == 2:
            shaped &= last > self.first_colon + 1
        self._token_problem(~shaped, lambda i: f" is not {_LINE[self.fmt].split()[1]}")
        pipe = _hits(self.data == ord(SEPARATOR), self.start, self.end) > 0
        self._token_problem(pipe, lambda i: f" holds {SEPARATOR!r}, the multi-hot separator")
        value_at = np.where(shaped, last + 1, self.end)  # a bad shape: checked as empty
        bad = _not_numbers(_gather(self.data, value_at, self.end))
        self._token_problem(
            bad & shaped, lambda i: ": value "
            f"{_text(self.data[value_at[i]:self.end[i]])!r} is not a finite number")
        if want == 2:
            field_end = np.where(shaped, self.first_colon, self.start)
            fields = _gather(self.data, self.start, field_end)
            odd = _in_ranges(fields, _NON_DIGIT) | (field_end - self.start > 9)
            self._token_problem(
                odd & shaped, lambda i: ": field "
                f"{_text(self.data[self.start[i]:field_end[i]])!r} is not a non-negative "
                "integer (0, 1, 2, ...)")
            if not self._problems:
                self.field = pc.cast(fields, pa.int64()).to_numpy()


def _buffers(lines: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets int64 [lines + 1] from 0, text uint8 [bytes])`` of an Arrow string array."""
    if isinstance(lines, pa.ChunkedArray):
        lines = lines.combine_chunks()
    if not pa.types.is_string(lines.type):
        lines = pc.cast(lines, pa.string())
    _, offsets, data = lines.buffers()
    offsets = np.frombuffer(offsets, np.int32, count=len(lines) + 1,
                            offset=lines.offset * 4).astype(np.int64)
    text = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    return offsets - offsets[0], text[offsets[0]:offsets[-1]]


def _tokens(data: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(start, end)`` byte positions of the space-separated tokens, int64 [tokens]; a
    token never runs over a line's end.

    One difference of the non-space mask: +1 where a token starts, -1 where one ends, and 2
    at a line start between two non-space bytes (a token ends and the next starts there).
    """
    body = (~_SPACE[data]).view(np.int8)
    edge = np.zeros(len(data) + 1, np.int8)
    if len(data):
        edge[0], edge[-1] = body[0], -body[-1]
        np.subtract(body[1:], body[:-1], out=edge[1:-1])
        inner = offsets[(offsets > 0) & (offsets < len(data))]
        edge[inner[(body[inner - 1] == 1) & (body[inner] == 1)]] = 2
    return np.flatnonzero(edge > 0), np.flatnonzero((edge < 0) | (edge == 2))


def _hits(mask: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """How many of `mask`'s bytes lie in each [start, end), int64 [ranges] (fast for a
    sparse mask: a search of its positions)."""
    at = np.flatnonzero(mask)
    return np.searchsorted(at, end) - np.searchsorted(at, start)


def _in_ranges(strings: pa.Array, table: np.ndarray) -> np.ndarray:
    """Which strings hold a byte that `table` marks, bool [strings]."""
    offsets, text = _buffers(strings)
    return _hits(table[text], offsets[:-1], offsets[1:]) > 0


def _gather(data: np.ndarray, start: np.ndarray, end: np.ndarray) -> pa.Array:
    """The byte ranges [start, end) as an Arrow string array (one string per range)."""
    lengths = end - start
    offsets = np.zeros(len(start) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    index = np.arange(offsets[-1]) - np.repeat(offsets[:-1] - start, lengths)
    return _strings(offsets, data[index])


def _join(data: np.ndarray, start: np.ndarray, end: np.ndarray, line: np.ndarray,
          lines: int) -> pa.Array:
    """Per line, its tokens [start, end) joined by the separator: string [lines]; `line`
    [tokens] ascending (any grouping of tokens into rows, e.g. (column, line)).

    Each token but a line's first is copied with the byte before it (a space or the field's
    ':'), which becomes the separator, so the join is one gather.
    """
    joined = np.zeros(len(start), bool)
    joined[1:] = line[1:] == line[:-1]
    begin = start - joined
    lengths = end - begin
    at = np.zeros(len(start) + 1, np.int64)
    np.cumsum(lengths, out=at[1:])
    text = data[np.arange(at[-1]) - np.repeat(at[:-1] - begin, lengths)]
    text[at[:-1][joined]] = ord(SEPARATOR)
    offsets = np.zeros(lines + 1, np.int64)
    np.cumsum(np.bincount(line, lengths, minlength=lines).astype(np.int64), out=offsets[1:])
    return _strings(offsets, text)


def _strings(offsets: np.ndarray, text: np.ndarray) -> pa.Array:
    kind, width = (pa.string(), np.int32) if offsets[-1] < 2**31 else (pa.large_string(), np.int64)
    return pa.Array.from_buffers(kind, len(offsets) - 1,
                                 [None, pa.py_buffer(offsets.astype(width)), pa.py_buffer(text)])


def _not_numbers(text: pa.Array) -> np.ndarray:
    """Which strings are not numbers of the weight rule or not finite in float32, bool [n].

    Fast path: only the characters ``0-9 . e E + -`` and Arrow's cast, which together accept
    exactly `fm_keras.fitting.NUMBER` (tests/test_libsvm.py checks it). The regex runs only
    when some string fails them, to find which.
    """
    bad = _in_ranges(text, _NON_NUMBER)
    values = None
    if not bad.any():
        try:
            values = pc.cast(text, pa.float64()).to_numpy(zero_copy_only=False)
        except pa.ArrowInvalid:
            pass
    if values is None:
        bad = ~pc.match_substring_regex(text, _NUMBER_TEXT).to_numpy(zero_copy_only=False)
        values = np.zeros(len(text))
        values[~bad] = pc.cast(text.filter(pa.array(~bad)), pa.float64()).to_numpy(
            zero_copy_only=False)
    with np.errstate(over="ignore"):
        return bad | np.isinf(values.astype(np.float32))


def _text(raw: np.ndarray) -> str:
    text = raw.tobytes().decode("utf-8", "replace")
    return text if len(text) <= 60 else text[:57] + "..."
