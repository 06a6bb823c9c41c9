"""Parquet list columns as multi-hot text: joined as a Python reference joins them; nested
columns that are not multi-hot values are one-line errors naming the file and column."""

import pyarrow as pa
import pytest

from fm_keras.errors import DataError
from fm_keras.list_columns import check_schema, join_lists

LISTS = [["a", "b:0.5"], None, [], ["c", None], ["日本", "d"], ["e"]]


def _reference(cells, sep):
    return ["" if cell is None else sep.join("" if v is None else str(v) for v in cell)
            for cell in cells]


@pytest.mark.parametrize("kind", [pa.list_(pa.string()), pa.large_list(pa.large_string()),
                                  pa.list_(pa.int64())])
@pytest.mark.parametrize("start", [0, 1, 3])
def test_join_matches_a_python_reference_on_sliced_batches(kind, start):
    cells = LISTS if not pa.types.is_integer(kind.value_type) else \
        [[1, 2], None, [], [3, None], [40, 5], [6]]
    batch = pa.RecordBatch.from_arrays([pa.array(cells, kind), pa.array(range(6))],
                                       names=["tags", "n"]).slice(start)
    got = join_lists(batch, {"tags": ";"}, "f.parquet")
    assert got.column("tags").to_pylist() == _reference(cells[start:], ";")
    assert got.column("n").to_pylist() == list(range(start, 6))


def test_an_element_holding_the_separator_names_the_data_row():
    batch = pa.RecordBatch.from_arrays([pa.array([["a"], ["b", "x|y"]])], names=["tags"])
    with pytest.raises(DataError, match=r"^f.parquet: column 'tags': the list element 'x\|y' "
                                        r"at data row 12 holds the multi-hot separator '\|'$"):
        join_lists(batch, {"tags": "|"}, "f.parquet", first_row=10)


@pytest.mark.parametrize("kind, message", [
    (pa.struct([("a", pa.string())]), "a Parquet struct<a: string> column cannot be read"),
    (pa.map_(pa.string(), pa.int64()), "column cannot be read; store it as text"),
    (pa.list_(pa.float64()), "a list of double cannot be multi-hot values"),
    (pa.list_(pa.list_(pa.string())), "a list of list<item: string> cannot be multi-hot"),
])
def test_other_nested_columns_are_one_line_errors(kind, message):
    schema = pa.schema([("user_id", pa.string()), ("tags", kind)])
    with pytest.raises(DataError, match=r"^f.parquet: column 'tags': ") as err:
        check_schema("f.parquet", schema, {"tags": "|"})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_list_column_of_a_feature_that_is_not_multi_hot_is_an_error():
    schema = pa.schema([("tags", pa.list_(pa.string()))])
    with pytest.raises(DataError, match="f.parquet: column 'tags': a list column .* is read only "
                                        "for a multi_hot feature"):
        check_schema("f.parquet", schema, {})
    # a multi-hot one is read; only the columns stored as lists are joined
    assert check_schema("f.parquet", schema, {"tags": "|"}) == {"tags": "|"}
    text = pa.schema([("tags", pa.string()), ("genres", pa.large_list(pa.string()))])
    assert check_schema("f.parquet", text, {"tags": "|", "genres": ";"}) == {"genres": ";"}
