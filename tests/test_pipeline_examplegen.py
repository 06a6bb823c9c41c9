"""ExampleGen: filters with counts, de-duplication, time and hash splits."""

import dataclasses
import json
import os

import pandas as pd
import pytest

from fm_keras.config import FilterConfig
from fm_keras.errors import DataError
from fm_keras.pipeline.config import InputConfig, SplitConfig
from fm_keras.pipeline.examplegen import run_examplegen, split_mask
from pipeline_testlib import write_small_span


def _logs(tmp_path):
    rows = [{"ts": 100 + i, "user_id": f"u{i % 7}", "item_id": f"i{i % 5}",
             "is_cached": int(i % 10 == 0), "click": int(i % 3 == 0)} for i in range(100)]
    rows += rows[:6]  # exact duplicates (a replayed log file)
    (tmp_path / "a.csv").write_text(pd.DataFrame(rows[:60]).to_csv(index=False))
    (tmp_path / "b.csv").write_text(pd.DataFrame(rows[60:]).to_csv(index=False))
    return str(tmp_path / "*.csv")


def test_filters_dedup_and_time_split(tmp_path):
    data = InputConfig(input=(_logs(tmp_path),), label="click",
                       filters=(FilterConfig("cached_exposures", "is_cached", "==", 1),),
                       dedup_keys=("ts", "user_id", "item_id"),
                       split=SplitConfig(by="time", column="ts", eval_fraction=0.2))
    counts = run_examplegen(data, data.input, str(tmp_path / "out"))
    assert counts["rows_read"] == 106
    assert counts["dropped"] == {"cached_exposures": 11}  # 10 + the replayed row 0
    assert counts["duplicates"] == 5
    assert counts["dedup_keys_missing"] == []
    assert counts["rows"] == 90 and counts["train_rows"] + counts["eval_rows"] == 90
    train = pd.read_parquet(tmp_path / "out" / "train.parquet")
    evaluation = pd.read_parquet(tmp_path / "out" / "eval.parquet")
    assert train["ts"].astype(int).max() < evaluation["ts"].astype(int).min()
    assert counts["eval_rows"] == pytest.approx(18, abs=2)
    assert json.load(open(tmp_path / "out" / "counts.json"))["duplicates"] == 5


def test_hash_split_keeps_a_key_on_one_side():
    frame = pd.DataFrame({"user_id": [f"u{i % 50}" for i in range(2000)]})
    mask = split_mask(frame, "hash", "user_id", 0.3)
    by_user = pd.Series(mask).groupby(frame["user_id"]).agg(["min", "max"])
    assert (by_user["min"] == by_user["max"]).all()
    assert 0.1 < mask.mean() < 0.5
    assert (split_mask(frame, "hash", "user_id", 0.3) == mask).all()  # stable


def test_missing_filter_column_is_a_data_error(tmp_path):
    data = InputConfig(input=(_logs(tmp_path),), label="click",
                       filters=(FilterConfig("f", "nope", "==", 1),))
    with pytest.raises(DataError, match="filter 'f': missing column 'nope'"):
        run_examplegen(data, data.input, str(tmp_path / "out"))


def test_parquet_input_and_hash_split(tmp_path):
    frame = pd.DataFrame({"ts": range(500), "user_id": [f"u{i % 40}" for i in range(500)],
                          "price": [1.5] * 500, "click": [i % 2 for i in range(500)]})
    frame.to_parquet(tmp_path / "part-0.parquet", index=False)
    data = InputConfig(input=(str(tmp_path / "*.parquet"),), label="click",
                       split=SplitConfig(by="hash", column="user_id", eval_fraction=0.25))
    counts = run_examplegen(data, data.input, str(tmp_path / "out"))
    assert counts["rows"] == 500 and counts["duplicates"] == 0
    train = pd.read_parquet(tmp_path / "out" / "train.parquet")
    evaluation = pd.read_parquet(tmp_path / "out" / "eval.parquet")
    assert not set(train["user_id"]) & set(evaluation["user_id"])
    assert list(train.columns) == ["ts", "user_id", "price", "click"]


def test_window_of_two_spans_is_one_data_set(tmp_path):
    # span 2's first 5 rows replay span 1's last 5 (same ts, user, item): one of each is kept
    write_small_span(tmp_path, 1, rows=40)
    write_small_span(tmp_path, 2, rows=40, start_ts=1035)
    (tmp_path / "span-2" / "part-0.csv").write_text(
        (tmp_path / "span-2" / "part-0.csv").read_text().replace("u2-", "u1-"))
    data = InputConfig(input=(str(tmp_path / "span-{SPAN}" / "*.csv"),), label="click",
                       dedup_keys=("ts", "user_id", "item_id"), spans=2,
                       split=SplitConfig(by="time", column="ts", eval_fraction=0.25))
    patterns = [str(tmp_path / "span-1" / "*.csv"), str(tmp_path / "span-2" / "*.csv")]
    counts = run_examplegen(data, patterns, str(tmp_path / "out"))
    assert counts["rows_read"] == 80 and len(counts["files"]) == 2
    assert counts["duplicates"] == 5 and counts["rows"] == 75
    train = pd.read_parquet(tmp_path / "out" / "train.parquet")
    evaluation = pd.read_parquet(tmp_path / "out" / "eval.parquet")
    stamps = pd.concat([train, evaluation])["ts"].astype(int)
    assert stamps.min() == 1000 and stamps.max() == 1074  # both spans' rows
    # eval: the newest rows of the window (all in span 2), train: the older ones of both
    assert evaluation["ts"].astype(int).min() > train["ts"].astype(int).max()
    assert len(evaluation) == pytest.approx(75 * 0.25, abs=1)
    assert (train["ts"].astype(int) < 1040).any() and (train["ts"].astype(int) >= 1040).any()


def test_window_error_names_the_file_and_row(tmp_path):
    write_small_span(tmp_path, 1)
    bad = write_small_span(tmp_path, 2)
    text = open(bad).read().splitlines()
    text[4] = "soon" + text[4][text[4].index(","):]  # data row 4 of span 2
    open(bad, "w").write("\n".join(text) + "\n")
    data = InputConfig(input=(str(tmp_path / "span-{SPAN}" / "*.csv"),), label="click",
                       filters=(FilterConfig("late", "ts", ">", 5000),), spans=2)
    patterns = [str(tmp_path / f"span-{s}" / "*.csv") for s in (1, 2)]
    with pytest.raises(DataError, match=f"^{bad}: split column 'ts' must be numeric time "
                                        "stamps, got 'soon' at data row 4$"):
        run_examplegen(data, patterns, str(tmp_path / "out"))
    # a filter error names the file whose values it is about, not the window's first file
    write_small_span(tmp_path, 2)
    (tmp_path / "span-1" / "part-0.csv").write_text("ts,click\n,0\n,1\n")  # no stamps
    with pytest.raises(DataError, match=f"^{bad}: filter 'late': column 'ts' holds"):
        run_examplegen(InputConfig(input=data.input, label="click",
                                   filters=(FilterConfig("late", "ts", ">", "z"),), spans=2),
                       patterns, str(tmp_path / "out"))


def test_empty_part_files_of_a_span_are_skipped_and_counted(tmp_path, capsys):
    """Spark/Hive write a 0-byte or header-only part file per empty partition: one of them
    failed the whole run ("the file is empty")."""
    span = os.path.dirname(write_small_span(str(tmp_path / "logs"), 1))
    open(os.path.join(span, "part-1.csv"), "wb").close()
    with open(os.path.join(span, "part-2.csv"), "w") as f:
        f.write("ts,user_id,item_id,is_cached,click\n")
    pattern = os.path.join(span, "part-*.csv")
    data = InputConfig(input=(pattern,), label="click",
                       split=SplitConfig(by="time", column="ts", eval_fraction=0.2))
    counts = run_examplegen(data, data.input, str(tmp_path / "out"))
    assert counts["rows_read"] == 40 and len(counts["files"]) == 1
    assert counts["empty_files_skipped"] == [os.path.join(span, "part-1.csv"),
                                             os.path.join(span, "part-2.csv")]
    warning = capsys.readouterr().err.strip()
    assert warning == (f"fm-keras: warning: skipped 2 empty file(s) (0 bytes, or a header and no "
                       f"rows) that a pattern matches: {span}/part-1.csv (and 1 more)")
    os.remove(os.path.join(span, "part-0.csv"))  # every file empty: still an error
    with pytest.raises(DataError, match="part-1.csv: the file is empty"):
        run_examplegen(data, data.input, str(tmp_path / "out2"))


def test_a_misspelt_dedup_key_is_an_error_not_a_coarser_key(tmp_path):
    """`userid` for `user_id` de-duplicated on (ts, item_id): rows of different users at the
    same time stamp were dropped as duplicates, silently (a new user's trial: 478 rows)."""
    pattern = _logs(tmp_path)
    data = InputConfig(input=(pattern,), label="click", dedup_keys=("ts", "userid", "item_id"),
                       split=SplitConfig(by="time", column="ts", eval_fraction=0.2))
    with pytest.raises(DataError, match=r"a\.csv: data: dedup_keys: 'userid' is not a column "
                       r"of the data \(did you mean 'user_id'\?\)$"):
        run_examplegen(data, data.input, str(tmp_path / "out"), schema_columns=["click"])
    assert not os.path.exists(tmp_path / "out")
    data = dataclasses.replace(data, dedup_keys=("ts", "zzz"))
    with pytest.raises(DataError, match=r"'zzz' is not a column of the data; its columns: ts, "
                       r"user_id, item_id, is_cached, click$"):
        run_examplegen(data, data.input, str(tmp_path / "out"), schema_columns=["click"])


def test_a_missing_feature_key_drops_no_duplicates_for_the_validator_to_report(tmp_path):
    """A dedup key that is a feature column and gone from the data (a renamed column) is the
    validator's `missing_column`; meanwhile no row is dropped on the remaining keys."""
    data = InputConfig(input=(_logs(tmp_path),), label="click",
                       dedup_keys=("ts", "user_id", "item_id", "item"),
                       split=SplitConfig(by="time", column="ts", eval_fraction=0.2))
    counts = run_examplegen(data, data.input, str(tmp_path / "out"),
                            schema_columns=["user_id", "item", "click"])
    assert counts["dedup_keys_missing"] == ["item"]
    assert counts["duplicates"] == 0 and counts["rows"] == 106
