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
(``007`` stays ``"007"``), never empty. No comments, no ``qid:N`` token (SVMrank's query id:
an error, not a feature ``qid`` of weight N).

The parse runs in pyarrow's C++ kernels over a block's lines (no Python loop per line or
token): one RE2 match of each line against the rules, a whitespace split into tokens, a join
of the tokens by ``|``; only the first line that breaks a rule is read in Python, to say why.
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
_SPACES = " \t\v\f\r"  # what separates tokens (pyarrow's ASCII whitespace; a line has no \n)
_GAP = f"[{_SPACES}]+"
_IDX = f"[^:|{_SPACES}]+"
# A libSVM idx other than SVMrank's query id "qid" (RE2 has no lookahead: spelled out), so
# that the one match of each line also rejects a qid:N token.
_C, _NOT = f"[^:|{_SPACES}]", ":|" + _SPACES
_IDX_NOT_QID = (f"(?:[^q{_NOT}]{_C}*|q(?:[^i{_NOT}]{_C}*)?|qi(?:[^d{_NOT}]{_C}*)?"
                f"|qid{_C}+)")
_FIELD = "[0-9]{1,9}"
_TOKEN = {"libsvm": f"{_IDX_NOT_QID}:(?:{NUMBER})",
          "libffm": f"{_FIELD}:{_IDX}:(?:{NUMBER})"}
# A line that keeps every rule but, maybe, float32's range (checked where it can be broken:
# an exponent, or 39 digits in a row).
_GOOD_LINE = {fmt: f"^(?:{NUMBER})(?:{_GAP}{token})*[{_SPACES}]*$" for fmt, token in _TOKEN.items()}
_MAYBE_HUGE = "[eE]|[0-9]{39}"
QID_PROBLEM = "qid: ranking files are not supported; drop the qid:N tokens"


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
            non-negative integer; the message names the file, line and token of the first
            problem in the block.
    """
    if isinstance(lines, pa.ChunkedArray):
        lines = lines.combine_chunks()
    if not pa.types.is_string(lines.type):
        lines = pc.cast(lines, pa.string())
    bad = _first_bad_line(lines, fmt)
    if bad is not None:
        raise DataError(f"{path}: line {first_line + bad}: {_problem(lines[bad].as_py(), fmt)} "
                        f"(a {NAMES[fmt]} line is {_LINE[fmt]!r})")
    split = pc.ascii_split_whitespace(pc.ascii_trim_whitespace(lines))
    starts = split.offsets.to_numpy().astype(np.int64)
    starts -= starts[0]
    tokens = pc.list_flatten(split)
    first = np.zeros(len(tokens), bool)
    first[starts[:-1]] = True
    rest = tokens.filter(pa.array(~first))  # [tokens - lines], in line order
    rest_starts = starts - np.arange(len(starts))  # each line's first in `rest`
    if fmt == "libsvm":
        cells = {FEATURES: _joined(rest, rest_starts)}
        fields = np.zeros(0, np.int64)
    else:
        cells, fields = _field_cells(rest, rest_starts, columns)
    if columns is None:
        columns = [LABEL, FEATURES] if fmt == "libsvm" else \
            [LABEL, *(field_column(f) for f in fields)]
    for name in columns:
        if not is_column(fmt, name):
            raise DataError(f"{path}: missing column {name!r} (a {NAMES[fmt]} file has "
                            f"{_columns_hint(fmt)})")
    label = tokens.take(pa.array(starts[:-1]))
    return pa.RecordBatch.from_arrays([label if name == LABEL else cells[name]
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


def _first_bad_line(lines: pa.Array, fmt: str) -> int | None:
    """The 0-based index of the first line that breaks a rule, or None: an RE2 match of every
    line, then float32's range where a number may leave it."""
    good = pc.match_substring_regex(lines, _GOOD_LINE[fmt]).to_numpy(zero_copy_only=False)
    maybe = np.flatnonzero(good & pc.match_substring_regex(lines, _MAYBE_HUGE).to_numpy(
        zero_copy_only=False))
    if len(maybe):
        split = pc.ascii_split_whitespace(pc.ascii_trim_whitespace(lines.take(pa.array(maybe))))
        parts = pc.split_pattern(pc.list_flatten(split), WEIGHT_SEPARATOR, max_splits=1,
                                 reverse=True)  # [label] or [idx (field:idx), val]
        ends = parts.offsets.to_numpy()[1:] - parts.offsets[0].as_py() - 1
        numbers = pc.list_flatten(parts).take(pa.array(ends))  # label, then each val
        huge = pc.is_inf(pc.cast(numbers, pa.float32())).to_numpy(zero_copy_only=False)
        line = pc.list_parent_indices(split).to_numpy()
        good[maybe[np.unique(line[huge])]] = False
    bad = np.flatnonzero(~good)
    return int(bad[0]) if len(bad) else None


def _problem(line: str, fmt: str) -> str:
    """What is wrong with one line that `_first_bad_line` found: its first problem."""
    tokens = re.split(_GAP, line.strip(_SPACES))
    if tokens == [""]:
        return "blank line"
    if not _is_number(tokens[0]):
        return f"label {_short(tokens[0])!r} is not a finite number"
    for token in tokens[1:]:
        if token.startswith("qid:"):
            return f"token {_short(token)!r}: {QID_PROBLEM}"
        if not re.fullmatch(_TOKEN[fmt], token) or not _is_number(token.rsplit(":", 1)[1]):
            return f"token {_short(token)!r}{_token_problem(token, fmt)}"
    return "not read by the rules"  # unreachable while Python's re and RE2 agree on them


def _token_problem(token: str, fmt: str) -> str:
    """Why `token` is not ``idx:val`` (``field:idx:val``), the first of: it holds the
    multi-hot separator, its shape, its field, its value."""
    if SEPARATOR in token:
        return f" holds {SEPARATOR!r}, the multi-hot separator"
    parts = token.split(WEIGHT_SEPARATOR)
    if len(parts) != (2 if fmt == "libsvm" else 3) or "" in parts:
        return f" is not {_LINE[fmt].split()[1]}"
    if fmt == "libffm" and not re.fullmatch(_FIELD, parts[0]):
        return f": field {_short(parts[0])!r} is not a non-negative integer (0, 1, 2, ...)"
    return f": value {_short(parts[-1])!r} is not a finite number"


def _is_number(text: str) -> bool:
    """Whether `text` is a number by `fm_keras.fitting.NUMBER`, finite as float32 (Arrow's
    cast, as the fast path)."""
    return re.fullmatch(NUMBER, text) is not None and not pc.is_inf(
        pc.cast(pa.array([text]), pa.float32()))[0].as_py()


def _joined(tokens: pa.Array, starts: np.ndarray) -> pa.Array:
    """Row i: ``tokens[starts[i]:starts[i + 1]]`` joined by ``|``, string [len(starts) - 1]."""
    lists = pa.ListArray.from_arrays(pa.array(starts, pa.int32()), tokens)
    return pc.binary_join(lists, SEPARATOR)


def _field_cells(tokens: pa.Array, starts: np.ndarray, columns: Sequence[str] | None
                 ) -> tuple[dict[str, pa.Array], np.ndarray]:
    """The ``field_<n>`` cells of a block's ``field:idx:val`` tokens (`starts`: each line's
    first token), and the block's sorted field numbers, int64."""
    parts = pc.list_flatten(pc.split_pattern(tokens, WEIGHT_SEPARATOR, max_splits=1))
    field = pc.cast(parts.take(pa.array(np.arange(0, len(parts), 2))), pa.int64())
    fields = np.sort(pc.unique(field).to_numpy())
    field = field.to_numpy()
    names = [field_column(f) for f in fields] if columns is None else \
        [name for name in columns if name != LABEL]
    wanted = np.unique(np.array([int(name[len(FIELD_PREFIX):]) for name in names
                                 if _FIELD_COLUMN.fullmatch(name)], np.int64))
    lines = len(starts) - 1
    rank = np.searchsorted(wanted, field)  # each token's column among `wanted`
    found = rank < len(wanted)
    found[found] = wanted[rank[found]] == field[found]
    line = np.repeat(np.arange(lines), np.diff(starts))
    order = np.flatnonzero(found)[  # (column, line) order; a radix sort of int16 ranks
        np.argsort(rank[found].astype(np.int16 if len(wanted) < 2**15 else np.int64),
                   kind="stable")]
    group = rank[order] * lines + line[order]
    group_starts = np.zeros(len(wanted) * lines + 1, np.int64)
    np.cumsum(np.bincount(group, minlength=len(wanted) * lines), out=group_starts[1:])
    joined = _joined(parts.take(pa.array(2 * order + 1)), group_starts)
    return {field_column(f): joined.slice(i * lines, lines) for i, f in enumerate(wanted)}, fields


def _short(text: str) -> str:
    return text if len(text) <= 60 else text[:57] + "..."
