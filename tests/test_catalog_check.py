"""catalog_check: the excluded ids outside a recall export's catalog, counted as read."""

import numpy as np
import pyarrow as pa
import tensorflow as tf

import pytest

from fm_keras import catalog_check
from fm_keras.arrow_text import split_keys
from fm_keras.catalog_check import EXAMPLES, UnknownIds


@pytest.mark.parametrize("kind", ["ids", "item_keys"])
@pytest.mark.parametrize("checked", [10_000, 23])
def test_counts_equal_a_python_set_reference(monkeypatch, checked, kind):
    # The first `checked` non-empty ids in reading order (rows, then columns) are looked up,
    # as strings (`count`) or as item keys cut from the '|' lists (`count_keys`).
    monkeypatch.setattr(catalog_check, "CHECKED", checked)
    rng = np.random.default_rng(0)
    catalog = np.array([f"i{j}".encode() for j in range(50)], dtype=object)
    tally = UnknownIds(catalog, by_item_keys=kind == "item_keys")
    known, total, excluded, unknown, seen = set(catalog.tolist()), 0, 0, 0, []
    for _ in range(20):
        rows = rng.integers(1, 6)
        width = rng.integers(1, 8)
        pool = [f"i{j}" for j in range(60)] + ["é1", "x y", "I1", "longer-than-8"]  # unknown
        ids = np.array([[rng.choice(pool) if rng.random() < 0.7 else "" for _ in range(width)]
                        for _ in range(rows)], dtype=object)
        if kind == "ids":
            out = tally.count(tf.constant(ids))
            assert out.numpy().tolist() == [[v.encode() for v in row] for row in ids.tolist()]
        else:
            lists = pa.array(["|".join(row) for row in ids.tolist()])
            keys = split_keys(lists)
            assert tally.count_keys(keys, lists) is keys
        for value in ids.ravel():
            total += bool(value)
            if value and excluded < checked:
                excluded += 1
                if value.encode() not in known:
                    unknown += 1
                    seen += [value] if value not in seen else []
    assert total > 23 and excluded == min(checked, total) and unknown > 3
    assert (tally.checked, tally.unknown) == (excluded, unknown)
    assert tally.examples == seen[:EXAMPLES]
    assert tally.summary() == {"excluded_ids_checked": excluded,
                               "excluded_ids_not_in_catalog": unknown,
                               "not_in_catalog_examples": seen[:EXAMPLES]}


def test_nothing_unknown_no_warning(capsys):
    tally = UnknownIds(np.array([b"a", b"b"], dtype=object))
    tally.count(tf.constant([["a", ""], ["b", "a"]]))
    tally.count(tf.zeros([0, 0], tf.string))
    assert tally.summary() == {"excluded_ids_checked": 3, "excluded_ids_not_in_catalog": 0,
                               "not_in_catalog_examples": []}
    assert capsys.readouterr().err == ""


def test_count_keys_quotes_unknown_ids_of_lists_with_another_separator():
    """The examples are cut from the lists with their own separator (',' here): the ids that
    were looked up, not the whole cell."""
    tally = UnknownIds(np.array([b"a", b"b"], dtype=object), by_item_keys=True)
    lists = pa.array(["a,nope", "b"])
    tally.count_keys(split_keys(lists, ","), lists, ",")
    assert (tally.checked, tally.unknown, tally.examples) == (3, 1, ["nope"])
