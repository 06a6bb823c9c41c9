"""Reading logs: checked columns, filters with counts, weights and downsampling."""

import numpy as np
import pandas as pd
import pytest

from fm_keras.config import DataConfig, FeatureConfig, FilterConfig, TrainingConfig
from fm_keras.data import (check_disjoint_splits, downsample_negatives, load_split,
                           require_both_classes, sample_weights, single_class)
from fm_keras.errors import DataError

FEATURES = [FeatureConfig("user", "categorical", "user"),
            FeatureConfig("price", "numeric", "item")]
CACHED = FilterConfig("cached_exposures", "is_cached", "==", 1)


def _csv(tmp_path, name="a.csv", **overrides):
    frame = pd.DataFrame({"user": ["u1", "u2", "u3", "u4"], "price": ["1.5", "", "3", "4"],
                          "is_cached": [0, 1, 0, 1], "click": [1, 0, 0, 1], **overrides})
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return str(path)


def test_reads_filters_and_counts(tmp_path):
    split = load_split([_csv(tmp_path)], FEATURES, "click", [CACHED])
    assert split.rows_read == 4 and len(split) == 2
    assert split.dropped == {"cached_exposures": 2}
    assert split.features["user"].tolist() == ["u1", "u3"]
    assert split.labels.tolist() == [1.0, 0.0]


def test_missing_numeric_is_nan_and_parquet_and_globs(tmp_path):
    _csv(tmp_path, "part-0.csv")
    pd.read_csv(_csv(tmp_path, "x.csv")).to_parquet(tmp_path / "part-1.parquet")
    split = load_split([str(tmp_path / "part-*")], FEATURES, "click")
    assert len(split) == 8 and len(split.files) == 2
    assert np.isnan(split.features["price"][1])
    assert split.features["user"][4] == "u1"


def test_sharding_takes_every_nth_file(tmp_path):
    for i in range(4):
        _csv(tmp_path, f"part-{i}.csv")
    split = load_split([str(tmp_path / "part-*.csv")], FEATURES, "click", shard_index=1, num_shards=2)
    assert [f[-10:] for f in split.files] == ["part-1.csv", "part-3.csv"]


@pytest.mark.parametrize("overrides,message", [
    ({"price": ["1", "2", "abc", "4"]}, "a.csv: column 'price' \\(numeric feature\\): non-numeric value 'abc' at data row 3"),
    ({"click": [0, 1, 2, 0]}, "a.csv: label column 'click': task 'binary' needs labels in \\{0, 1\\}, found \\[2.0\\] \\(first at data row 3\\)"),
    ({"click": [0, 1, "", 0]}, "a.csv: label column 'click': missing label at data row 3"),
    ({"click": [1, -1, -1, 1]}, r"a.csv: label column 'click': task 'binary' needs labels in "
     r"\{0, 1\}, found \[-1.0\] \(first at data row 2\); map the label -1 to 0 \(the negative "
     r"class, as libSVM files often write it\)$"),
    ({"click": [1, -1, 2, 1]}, r"found \[-1.0, 2.0\] .*; use task: regression for real-valued"),
])
def test_bad_values_name_file_and_column(tmp_path, overrides, message):
    with pytest.raises(DataError, match=message):
        load_split([_csv(tmp_path, **overrides)], FEATURES, "click")


def test_missing_column(tmp_path):
    path = _csv(tmp_path)
    with pytest.raises(DataError, match="a.csv: missing column 'country'"):
        load_split([path], [*FEATURES, FeatureConfig("country", "categorical", "user")], "click")


def test_empty_file_header_only_and_no_match(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text("user,price,click\n")
    with pytest.raises(DataError, match="empty.csv: the file is empty"):
        load_split([str(tmp_path / "empty.csv")], FEATURES, "click")
    with pytest.raises(DataError, match="header.csv: the file has a header but no rows"):
        load_split([str(tmp_path / "header.csv")], FEATURES, "click")
    with pytest.raises(DataError, match="no file matches"):
        load_split([str(tmp_path / "nothing-*.csv")], FEATURES, "click")


def test_a_misspelt_file_name_suggests_the_file_beside_it(tmp_path):
    """A new user's trial: ``data: {train: trian.csv}`` said only "trian.csv: no such file"."""
    path = _csv(tmp_path)  # a.csv
    with pytest.raises(DataError, match="b.csv: no such file \\(did you mean 'a.csv'\\?\\)$"):
        load_split([path.replace("a.csv", "b.csv")], FEATURES, "click")
    with pytest.raises(DataError, match="zzz-other.txt: no such file$"):
        load_split([str(tmp_path / "zzz-other.txt")], FEATURES, "click")
    with pytest.raises(DataError, match="nodir/a.csv: no such file$"):
        load_split([str(tmp_path / "nodir" / "a.csv")], FEATURES, "click")


def test_filter_ops(tmp_path):
    path = _csv(tmp_path)
    cases = [("in", ["u1", "u2"], 2), ("!=", 1, 2), (">=", 3, 2), ("is_null", None, 1)]
    for op, value, dropped in cases:
        column = "price" if op in (">=", "is_null") else ("user" if op == "in" else "is_cached")
        flt = FilterConfig("f", column, op, value)
        assert load_split([path], FEATURES, "click", [flt]).dropped == {"f": dropped}, op
    # Text orders text (ISO dates); ordering numbers against a word is a mistake, not a filter.
    assert load_split([path], FEATURES, "click", [FilterConfig("f", "user", ">=", "u2")]
                      ).dropped == {"f": 3}
    with pytest.raises(DataError, match=r"a\.csv: filter 'f': column 'price' holds numbers but "
                                        r"the filter orders it against the text 'abc'"):
        load_split([path], FEATURES, "click", [FilterConfig("f", "price", ">=", "abc")])


def test_sample_weights():
    labels = np.array([0, 1, 1, 0], np.float32)
    assert sample_weights(labels, TrainingConfig(pos_weight=5.0)).tolist() == [1, 5, 5, 1]
    weights = sample_weights(labels, TrainingConfig(class_weight={0: 0.5, 1: 2.0}))
    assert weights.tolist() == [0.5, 2, 2, 0.5]


def test_downsample_keeps_all_positives_and_rate_of_negatives():
    labels = (np.arange(100_000) % 20 == 0).astype(np.float32)
    keep = downsample_negatives(labels, 0.25, seed=0)
    assert keep[labels == 1].all()
    assert keep[labels == 0].mean() == pytest.approx(0.25, abs=0.01)


def test_single_class_training_labels_are_an_error(tmp_path):
    split = load_split([_csv(tmp_path, click=[0, 0, 0, 0])], FEATURES, "click")
    assert single_class(split.labels) == 0.0
    with pytest.raises(DataError, match=r"a\.csv: label column 'click': every training row has "
                                        r"label 0; a binary model needs both"):
        require_both_classes(split, "click")
    split.labels[1] = 1.0  # two classes: fine
    assert single_class(split.labels) is None
    require_both_classes(split, "click")


def test_missing_column_lists_the_files_header_and_a_close_match(tmp_path):
    path = _csv(tmp_path)
    with pytest.raises(DataError) as err:
        load_split([path], FEATURES, "clik")
    message = str(err.value)
    assert "missing column 'clik' (did you mean 'click'?" in message
    assert "'click']" in message  # the header as written, not only the columns asked for


def test_missing_column_hints_only_a_close_match(tmp_path):
    """A new user's trial: 'genres' missing from a log with 'gender' was answered "did you
    mean 'gender'?" (difflib's default cutoff)."""
    from fm_keras.config import FeatureConfig

    path = _csv(tmp_path, gender=["f", "m", "f", "m"])
    with pytest.raises(DataError) as err:
        load_split([path], [FeatureConfig("genres", "categorical", "item")], "click")
    message = str(err.value)
    assert "missing column 'genres' (the file has ['user', 'price'" in message
    assert "did you mean" not in message


def test_parquet_float_ids_read_like_csv_and_score(tmp_path):
    # pandas stores an int id column with a null as float: 900.0 must be the id '900', as in
    # a CSV and as `score` (Arrow) reads it, not '900.0' (an OOV id at evaluation).
    path = str(tmp_path / "a.parquet")
    pd.DataFrame({"user": [900.0, 7.0, None, 1.5], "price": [1.5, 2.0, 3.0, 4.0],
                  "click": [1, 0, 0, 1]}).to_parquet(path)
    split = load_split([path], FEATURES, "click")
    assert list(split.features["user"]) == ["900", "7", "", "1.5"]
    np.testing.assert_allclose(split.features["price"], [1.5, 2.0, 3.0, 4.0])


def test_a_glob_skips_empty_part_files_but_a_named_empty_file_is_an_error(tmp_path, capsys):
    """Spark/Hive write 0-byte or header-only part files for empty partitions."""
    from fm_keras.data import expand_paths, skipped_empty_files

    _csv(tmp_path, "part-0.csv")
    (tmp_path / "part-1.csv").write_bytes(b"")
    (tmp_path / "part-2.csv").write_bytes(b"user,price,is_cached,click\r\n\r\n")
    pd.DataFrame({"user": pd.Series([], dtype=str)}).to_parquet(tmp_path / "part-3.parquet")
    split = load_split([str(tmp_path / "part-*")], FEATURES, "click")
    assert len(split) == 4 and [f[-10:] for f in split.files] == ["part-0.csv"]
    assert capsys.readouterr().err.count("warning: skipped 3 empty file(s)") == 1
    assert skipped_empty_files([str(tmp_path / "part-*")]) == [
        str(tmp_path / n) for n in ("part-1.csv", "part-2.csv", "part-3.parquet")]
    with pytest.raises(DataError, match="part-1.csv: the file is empty"):
        load_split([str(tmp_path / "part-1.csv")], FEATURES, "click")
    assert expand_paths([str(tmp_path / "part-[12].csv")]) == [
        str(tmp_path / "part-1.csv"), str(tmp_path / "part-2.csv")]  # all empty: kept
    with pytest.raises(DataError, match="part-2.csv: the file has a header but no rows"):
        load_split([str(tmp_path / "part-2.csv")], FEATURES, "click")


@pytest.mark.parametrize("train,role", [("*.csv", "valid"), ("t*.csv", "test"),
                                        ("./valid.csv", "valid"), ("logs-*.csv", None)])
def test_a_validation_or_test_file_in_the_training_files_is_an_error(tmp_path, monkeypatch,
                                                                      train, role):
    """data.train: '*.csv' beside valid.csv and test.csv trained on the validation and test
    rows without a word (early stopping, calibration and test metrics then measure them)."""
    monkeypatch.chdir(tmp_path)
    for name in ("logs-1.csv", "valid.csv", "test.csv"):
        _csv(tmp_path, name)
    data = DataConfig(train=(train,), label="click", valid=("valid.csv",), test=("test.csv",))
    if role is None:
        check_disjoint_splits(data, "exp.yaml")
        return
    with pytest.raises(DataError) as err:
        check_disjoint_splits(data, "exp.yaml")
    assert str(err.value) == (f"exp.yaml: data: {role} file {role}.csv is also a training file "
                              f"(data.train ['{train}'] names it), so its rows would be trained "
                              "on; keep it out of data.train")
