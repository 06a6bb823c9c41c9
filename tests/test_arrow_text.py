"""arrow_text: Arrow text columns as string tensors, equal to Python's own reading of them."""

import numpy as np
import pyarrow as pa

from fm_keras.arrow_text import split_ids, split_keys, string_tensor
from fm_keras.exclusion import item_keys


def test_string_tensor_equals_the_cells():
    """Null cells are "", non-ASCII text stays UTF-8, a sliced array starts at its offset."""
    cells = ["a", None, "", "é ü", "x" * 300, "7"]
    for array in (pa.array(cells, pa.string()), pa.array(cells, pa.large_string()),
                  pa.array(cells, pa.string()).slice(2)):
        want = [(c or "").encode() for c in array.to_pylist()]
        assert string_tensor(array).numpy().tolist() == want


def test_split_ids_equals_python_split():
    """Random '|' lists with empty items, empty and null cells, non-ASCII ids, blanks around
    ids and sliced arrays: the rows of `split_ids` are str.split's items, stripped, without
    the empty ones, padded with "" (a new user's "i1 | i2" cells matched nothing)."""
    rng = np.random.default_rng(0)
    for trial in range(300):
        cells = [None if r < 0.1 else "" if r < 0.2 else
                 "|".join(rng.choice(["a", "bb", "", "é", "x1", " a ", "\tbb", "  ", "x y ",
                                      " é\r\n"], rng.integers(1, 5)))
                 for r in rng.random(rng.integers(0, 6))]
        array = pa.array(cells, pa.string())
        if len(cells) > 2 and trial % 2:
            array = array.slice(1)
        want = [[t.strip().encode() for t in (c or "").split("|") if t.strip()]
                for c in array.to_pylist()]
        got = split_ids(array).numpy()
        assert got.shape == (len(want), max([len(w) for w in want], default=0))
        for row, items in zip(got, want):
            assert list(row[:len(items)]) == items and all(v == b"" for v in row[len(items):])


def test_split_keys_are_the_item_keys_of_split_ids():
    """The same random lists, with ids longer than 8 bytes and NUL bytes among them:
    `split_keys` is `item_keys` of `split_ids`' items, slot by slot (0 pads, -1 for an id no
    packable catalog holds)."""
    rng = np.random.default_rng(1)
    for trial in range(300):
        cells = [None if r < 0.1 else "" if r < 0.2 else
                 "|".join(rng.choice(["a", "bb", "", "é", " x1 ", "12345678", "123456789",
                                      "a\0b", "\tbb", "  ", "ééééé"], rng.integers(1, 6)))
                 for r in rng.random(rng.integers(0, 6))]
        array = pa.array(cells, pa.string())
        if len(cells) > 2 and trial % 2:
            array = array.slice(1)
        ids = split_ids(array).numpy()
        keys = split_keys(array)
        assert keys.dtype == np.int64 and keys.shape == ids.shape
        assert keys.tolist() == item_keys(ids).tolist()
