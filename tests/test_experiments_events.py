"""The event schema: CSV and Parquet read the same; bad files fail naming file and column."""

import re

import pandas as pd
import pytest

from fm_keras.errors import DataError
from fm_keras.experiments.config import ABExperiment, Arm
from fm_keras.experiments.assignment import Assigner
from fm_keras.experiments.events import per_unit, read_events, write_table

EXPERIMENT = ABExperiment(name="t", unit="user_id", salt="s", control="a", arms=(
    Arm(name="a", model="ctr", version=1, weight=0.5),
    Arm(name="b", model="ctr", version=2, weight=0.5)))

EVENTS = pd.DataFrame({"user_id": ["u1", "u1", "u2", "u3"], "arm": ["a", "a", "b", "b"],
                       "timestamp": [30, 10, 20, 40], "impressions": [10, 10, 10, 5],
                       "clicks": [1, 2, 0, 5], "pre_period": [4.0, 4.0, 0.0, 1.0]})


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_csv_and_parquet_read_the_same_and_sum_per_unit(tmp_path, suffix):
    path = str(tmp_path / f"events{suffix}")
    write_table(EVENTS, path)
    events = read_events([str(tmp_path / f"*{suffix}")], EXPERIMENT)
    assert events["unit"].tolist() == ["u1", "u1", "u2", "u3"]
    assert events["clicks"].dtype == "int64" and events["pre_period"].dtype == "float64"
    table = per_unit(events).set_index("unit")
    assert table.loc["u1", ["events", "impressions", "clicks", "first_timestamp"]].tolist() == \
        [2, 20, 3, 10]
    assert table.loc["u1", "pre_period"] == 4.0 and table.loc["u3", "arm"] == "b"


def test_pre_period_is_optional(tmp_path):
    path = tmp_path / "e.csv"
    EVENTS.drop(columns="pre_period").to_csv(path, index=False)
    assert "pre_period" not in per_unit(read_events([str(path)], EXPERIMENT)).columns


@pytest.mark.parametrize("change, message", [
    (lambda f: f.drop(columns="user_id"), r"column 'user_id' \(the experiment's unit\) is missing"),
    (lambda f: f.drop(columns="clicks"), "column 'clicks' is missing"),
    (lambda f: f.assign(clicks=[1, 2, 11, 0]), "column 'clicks': 1 rows have more clicks"),
    (lambda f: f.assign(impressions=[10, -1, 10, 5]), "column 'impressions': must be whole"),
    (lambda f: f.assign(timestamp=["x", 1, 2, 3]), "column 'timestamp': not a number: 'x'"),
    (lambda f: f.assign(arm=["a", "a", "b", "z"]), r"column 'arm': \['z'\] are not arms"),
    # Out-of-range counts used to be cast to int64 garbage (a wrong error, or a silent result).
    (lambda f: f.assign(impressions=["10", "1e30", "10", "5"]),
     r"column 'impressions': must be whole numbers in 0..2,147,483,647, got '1e30' "
     r"\(first at line 3\)"),
    (lambda f: f.assign(impressions=["inf", "10", "10", "5"]), "'impressions': .* got 'inf'"),
    (lambda f: f.assign(impressions=[10, 10, 10, 2**40], clicks=[1, 2, 0, 2**40]),
     "column 'impressions': must be whole numbers"),
    (lambda f: f.assign(timestamp=[1e20, 1, 2, 3]), "column 'timestamp': must be whole numbers"),
    (lambda f: f.assign(pre_period=[4.0, float("inf"), 0.0, 1.0]),
     "column 'pre_period': must be a finite number"),
    (lambda f: f.assign(pre_period=[4.0, 1e308, 0.0, 1.0]),
     "column 'pre_period': must be a finite number"),
    (lambda f: f.assign(user_id=["u1", "", "u2", "u3"]),
     r"column 'user_id': 1 empty unit ids \(first at line 3\)"),
])
def test_bad_events_name_the_file_and_column(tmp_path, change, message):
    path = tmp_path / "bad.csv"
    change(EVENTS).to_csv(path, index=False)
    with pytest.raises(DataError, match=message) as info:
        read_events([str(path)], EXPERIMENT)
    assert str(info.value).startswith(str(path))


def test_write_table_wants_a_known_extension_and_leaves_nothing_half_written(tmp_path):
    with pytest.raises(DataError, match=".csv or .parquet"):
        write_table(EVENTS, str(tmp_path / "e.json"))
    assert list(tmp_path.iterdir()) == []


def test_float_unit_ids_in_parquet_are_an_error(tmp_path):
    # A null in an integer id column makes pandas write float64: the ids lose their text.
    path = tmp_path / "e.parquet"
    EVENTS.assign(user_id=[7.0, 7.0, 8.0, 9.0]).to_parquet(path, index=False)
    with pytest.raises(DataError, match=r"e.parquet: column 'user_id': unit ids are floating"):
        read_events([str(path)], EXPERIMENT)
    EVENTS.assign(user_id=pd.array([7, 7, None, 9], dtype="Int64")).to_parquet(path, index=False)
    with pytest.raises(DataError, match="column 'user_id': 1 empty unit ids"):
        read_events([str(path)], EXPERIMENT)


def test_an_integer_id_is_the_same_unit_in_csv_and_parquet_and_007_is_not_7(tmp_path):
    frame = EVENTS.assign(user_id=[7, 7, 8, 9], arm="a")
    frame.to_csv(tmp_path / "e.csv", index=False)
    frame.to_parquet(tmp_path / "e.parquet", index=False)
    ids_csv = read_events([str(tmp_path / "e.csv")], EXPERIMENT)["unit"].tolist()
    ids_parquet = read_events([str(tmp_path / "e.parquet")], EXPERIMENT)["unit"].tolist()
    assert ids_csv == ids_parquet == ["7", "7", "8", "9"]
    (tmp_path / "z.csv").write_text("user_id,arm,timestamp,impressions,clicks\n007,a,1,1,0\n")
    assert read_events([str(tmp_path / "z.csv")], EXPERIMENT)["unit"].tolist() == ["007"]
    assigner = Assigner(EXPERIMENT)
    assert assigner.arm(7) == assigner.arm("7")
    assert [assigner.arm(u) for u in ("007", "7", "7.0")] != [assigner.arm("7")] * 3


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_float_looking_unit_ids_are_text_in_csv_as_in_a_parquet_string_column(tmp_path, suffix):
    """A CSV has no column types: the cell ``1.0`` is the unit '1.0', never merged with '1'
    (pinned after a new user's events with ids 1.0, 2.0 were taken silently), exactly as
    the same text in a Parquet string column; only a Parquet float column is an error."""
    from fm_keras.experiments.assignment import assign_file, bucket

    path = tmp_path / f"e{suffix}"
    frame = EVENTS.drop(columns="pre_period").assign(user_id=["1.0", "1", "2.0", "2.0"],
                                                     arm=["a", "a", "b", "b"])
    frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path, index=False)
    if suffix == ".csv":
        assert path.read_text().splitlines()[1].startswith("1.0,a,")  # written as a bare 1.0
    events = read_events([str(path)], EXPERIMENT)
    assert events["unit"].tolist() == ["1.0", "1", "2.0", "2.0"]
    assert per_unit(events)["unit"].tolist() == ["1.0", "1", "2.0"]
    summary = assign_file(EXPERIMENT, [str(path)], str(tmp_path / "assigned.csv"))
    assert summary["units"] == 3
    assigned = pd.read_csv(tmp_path / "assigned.csv", dtype=str)
    assert assigned["user_id"].tolist() == ["1.0", "1", "2.0"]
    assert assigned["bucket"].astype(int).tolist() == [bucket("s", u) for u in ("1.0", "1", "2.0")]


def test_cuped_needs_pre_period_in_every_row(tmp_path):
    path = tmp_path / "e.csv"
    EVENTS.assign(pre_period=[4.0, None, 0.0, 1.0]).to_csv(path, index=False)
    assert "pre_period" not in read_events([str(path)], EXPERIMENT).columns  # not CUPED: fine
    with pytest.raises(DataError, match=r"e.csv: column 'pre_period': 1 empty cells"):
        read_events([str(path)], EXPERIMENT, need_pre_period=True)
    EVENTS.drop(columns="pre_period").to_csv(path, index=False)
    with pytest.raises(DataError, match=r"e.csv: column 'pre_period' is missing"):
        read_events([str(path)], EXPERIMENT, need_pre_period=True)


def test_write_table_to_an_unwritable_path_is_a_data_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="cannot write"):
        write_table(EVENTS, str(tmp_path / "file" / "e.csv"))  # was a FileExistsError
    (tmp_path / "d.csv").mkdir()
    with pytest.raises(DataError, match="cannot write"):
        write_table(EVENTS, str(tmp_path / "d.csv"))  # a directory: was an IsADirectoryError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.csv", "file"]
    assert list((tmp_path / "d.csv").iterdir()) == []


def test_a_file_matched_twice_is_read_once(tmp_path):
    path = tmp_path / "e.csv"
    EVENTS.to_csv(path, index=False)  # used to be summed twice: every unit's clicks doubled
    events = read_events([str(path), str(tmp_path / "*.csv"), str(tmp_path / "." / "e.csv")],
                         EXPERIMENT)
    assert len(events) == len(EVENTS)


def test_a_pre_period_that_differs_within_a_unit_is_an_error(tmp_path):
    path = tmp_path / "e.csv"
    EVENTS.assign(pre_period=[4.0, 5.0, 0.0, 1.0]).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"e.csv: column 'pre_period': 1 units have different "
                                        r"values on different rows \(e.g. 'u1': 4 and 5\)"):
        read_events([str(path)], EXPERIMENT)


BAD_LINE_5 = {  # the bad cell of each file is on line 5: data row 3 (0-based), after a blank line
    "imp_empty.csv": ("u4,b,50,,0", r"column 'impressions': 1 empty cells \(first at line 5\)"),
    "ts_text.csv": ("u4,b,soon,5,0",
                    r"column 'timestamp': not a number: 'soon' \(first at line 5\)"),
    "clicks.csv": ("u4,b,50,5,6", r"column 'clicks': 1 rows have more clicks than "
                   r"impressions \(first at line 5\)"),
    "neg.csv": ("u4,b,50,-5,0",
                r"column 'impressions': must be whole .* got '-5' \(first at line 5\)"),
    "arm.csv": ("u4,z,50,5,0", r"column 'arm': \['z'\] are not arms .*; first at line 5\)"),
    "unit.csv": (",b,50,5,0", r"column 'user_id': 1 empty unit ids \(first at line 5\)"),
}


@pytest.mark.parametrize("name", sorted(BAD_LINE_5))
def test_a_bad_cell_is_named_by_its_file_line_as_the_reader_does(tmp_path, name):
    """`ab report` said "(first at row 3)" (0-based data row) for a cell on line 5, and the
    empty-cell and not-a-number errors named no place at all."""
    row, message = BAD_LINE_5[name]
    path = tmp_path / name
    path.write_text("user_id,arm,timestamp,impressions,clicks\nu1,a,10,10,1\n\nu2,a,20,10,2\n"
                    f"{row}\nu3,b,40,5,5\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: {message}"):
        read_events([str(path)], EXPERIMENT)


def test_a_bad_cell_of_a_parquet_file_is_named_by_its_data_row(tmp_path):
    path = tmp_path / "e.parquet"
    EVENTS.assign(impressions=[10, 10, 10, None]).to_parquet(path, index=False)
    with pytest.raises(DataError, match=r"column 'impressions': 1 empty cells \(first at data "
                       r"row 4\)"):
        read_events([str(path)], EXPERIMENT)


def test_an_empty_pre_period_with_cuped_names_its_line(tmp_path):
    path = tmp_path / "e.csv"
    EVENTS.assign(pre_period=[4.0, 4.0, None, 1.0]).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"column 'pre_period': 1 empty cells \(first at line 4\)"):
        read_events([str(path)], EXPERIMENT, need_pre_period=True)
    EVENTS.assign(pre_period=[4.0, 4.0, 1e300, 1.0]).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"'pre_period': must be a finite .*\(first at line 4\)"):
        read_events([str(path)], EXPERIMENT)


@pytest.mark.parametrize("ids, kind", [
    ([True, True, False, False], "bool"),
    (pd.to_datetime([1, 1, 2, 3], unit="s"), "timestamp"),
    (pd.to_datetime([1, 1, 2, 3], unit="D").date, "date32"),
    (pd.to_timedelta([1, 1, 2, 3], unit="s"), "duration"),
])
def test_bool_and_temporal_unit_ids_in_parquet_are_an_error(tmp_path, ids, kind):
    # Issue 19: a bool column was hashed as 'True'/'False' (2 units) and a timestamp as its
    # text, while ExperimentClient refused a bool id; ids are text or integers everywhere.
    path = tmp_path / "e.parquet"
    EVENTS.assign(user_id=list(ids)).to_parquet(path, index=False)
    with pytest.raises(DataError, match=rf"e.parquet: column 'user_id': unit ids are {kind}"):
        read_events([str(path)], EXPERIMENT)


def test_a_nan_pre_period_is_an_error_in_csv_and_parquet_and_a_null_is_an_empty_cell(tmp_path):
    # Issue 19 found "Parquet NaN treated as empty": the file held a null (pandas writes NaN as
    # a Parquet null, and as an empty CSV cell). One rule for both formats: an empty cell or
    # null drops the column (an error with --cuped), a NaN value is not finite: an error.
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(EVENTS, preserve_index=False)
    column = table.schema.get_field_index("pre_period")
    for name, cell in (("nan.parquet", float("nan")), ("null.parquet", None)):
        values = pa.array([4.0, 4.0, cell, 1.0], type=pa.float64(), from_pandas=False)
        pq.write_table(table.set_column(column, "pre_period", values), tmp_path / name)
    (tmp_path / "nan.csv").write_text(EVENTS.to_csv(index=False).replace(",0.0\n", ",nan\n"))
    (tmp_path / "null.csv").write_text(EVENTS.to_csv(index=False).replace(",0.0\n", ",\n"))
    for name, where in (("nan.csv", "line 4"), ("nan.parquet", "data row 3")):
        with pytest.raises(DataError, match=rf"{name}: column 'pre_period': not a number: 'nan' "
                           rf"\(first at {where}\)"):
            read_events([str(tmp_path / name)], EXPERIMENT)
    for name in ("null.csv", "null.parquet"):
        assert "pre_period" not in read_events([str(tmp_path / name)], EXPERIMENT).columns
        with pytest.raises(DataError, match=rf"{name}: column 'pre_period': 1 empty cells"):
            read_events([str(tmp_path / name)], EXPERIMENT, need_pre_period=True)
