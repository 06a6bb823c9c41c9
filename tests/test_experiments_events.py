"""The event schema: CSV and Parquet read the same; bad files fail naming file and column."""

import pandas as pd
import pytest

from fm_keras.errors import DataError
from fm_keras.experiments.config import ABExperiment, Arm
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
