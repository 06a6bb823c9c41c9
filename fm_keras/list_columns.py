"""Parquet list columns (pandas' list cells) read as multi-hot text.

A multi-hot feature is one text cell of ``separator``-joined values (``"a|b|c"``). A Parquet
``list<string>`` (or ``large_list``, or a list of integers) column of a multi-hot feature holds
the same values as a list; `fm_keras.reading` joins each list with the feature's separator, so
``["a", "b", "c"]`` is the cell ``"a|b|c"`` for every command (a null list or an empty one is
``""``, a null element an empty token, which the feature skips). Any other nested column
(struct, map, a list of floats, a list for a feature that is not multi-hot) is a `DataError`
naming the file and the column.
"""

from __future__ import annotations

from collections.abc import Mapping

import pyarrow as pa
import pyarrow.compute as pc

from fm_keras.errors import DataError


def check_schema(path: str, schema: pa.Schema, lists: Mapping[str, str]) -> dict[str, str]:
    """The list columns of `schema` to join, after checking every nested column.

    Args:
        path: the file, for the message.
        schema: the columns to be read.
        lists: column -> multi-hot separator of the columns that may be lists.

    Returns:
        column -> separator of the columns of `schema` that are lists (for `join_lists`;
        empty when the file stores every multi-hot column as text).

    Raises:
        DataError: a nested column that is not a list of text or integers, or a list column
            that is not in `lists` (not a multi-hot feature); the message names the fix.
    """
    found = {}
    for name, kind in zip(schema.names, schema.types):
        if not pa.types.is_nested(kind):
            continue
        where = f"{path}: column {name!r}"
        if not _is_list(kind):
            raise DataError(f"{where}: a Parquet {kind} column cannot be read; store it as text "
                            "(or as numbers)")
        if name not in lists:
            raise DataError(f"{where}: a list column ({kind}) is read only for a multi_hot "
                            "feature; declare the feature kind: multi_hot, or store the column "
                            "as text")
        element = kind.value_type
        if not (pa.types.is_string(element) or pa.types.is_large_string(element)
                or pa.types.is_integer(element)):
            raise DataError(f"{where}: a list of {element} cannot be multi-hot values; store "
                            "the elements as strings (or integer ids)")
        found[name] = lists[name]
    return found


def join_lists(batch: pa.RecordBatch, lists: Mapping[str, str], path: str,
               first_row: int = 0) -> pa.RecordBatch:
    """The batch with each list column in `lists` as text: each list's elements joined with
    the column's separator (``["a", "b"]`` -> ``"a|b"``), ``""`` for a null or empty list.

    Args:
        batch: columns already checked by `check_schema`.
        lists: column -> multi-hot separator.
        path, first_row: the file and the 0-based data row of the batch's first row, for the
            message.

    Raises:
        DataError: an element holds the separator (it would read as two values), naming the
            file, column and 1-based data row.
    """
    columns = []
    for name, column in zip(batch.schema.names, batch.columns):
        if _is_list(column.type) and name in lists:
            column = _joined(column, lists[name], f"{path}: column {name!r}", first_row)
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names)


def _joined(array: pa.Array, sep: str, where: str, first_row: int) -> pa.Array:
    # A null list's offsets span no values, so it joins to "" (no validity bitmap needed).
    offsets = array.offsets.to_numpy(zero_copy_only=False)
    offsets = offsets - offsets[0]  # a sliced array's offsets start inside its values
    values = array.values.slice(int(array.offsets[0].as_py()), int(offsets[-1]))
    values = pc.fill_null(pc.cast(values, pa.string()), "")
    holds = pc.match_substring(values, sep)
    if len(values) and pc.any(holds).as_py():
        index = int(pc.index(holds, True).as_py())
        row = int((offsets[1:] > index).argmax())
        raise DataError(f"{where}: the list element {values[index].as_py()!r} at data row "
                        f"{first_row + row + 1} holds the multi-hot separator {sep!r}")
    kind = pa.LargeListArray if pa.types.is_large_list(array.type) else pa.ListArray
    return pc.binary_join(kind.from_arrays(pa.array(offsets, array.offsets.type), values), sep)


def _is_list(kind: pa.DataType) -> bool:
    return pa.types.is_list(kind) or pa.types.is_large_list(kind)
