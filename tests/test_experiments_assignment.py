"""Assignment: the hash is the documented one, splits match the weights, arms are stable
across processes, and salts are independent."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from scipy import stats

from fm_keras.errors import DataError
from fm_keras.experiments.analysis import srm_check
from fm_keras.experiments.assignment import Assigner, assign_file, bucket, buckets_of
from fm_keras.experiments.config import ABExperiment, Arm

UNITS = [f"user-{i}" for i in range(100_000)]


def experiment(weights=(0.5, 0.5), salt="exp-1") -> ABExperiment:
    return ABExperiment(name="t", unit="user_id", salt=salt, control="a", arms=tuple(
        Arm(name=n, model="ctr", version=i + 1, weight=w)
        for i, (n, w) in enumerate(zip("abc", weights))))


def test_bucket_is_sha256_of_salt_colon_unit_mod_10000():
    digest = hashlib.sha256(b"exp-1:user-7").hexdigest()
    assert bucket("exp-1", "user-7") == int(digest[:16], 16) % 10_000
    assert buckets_of("exp-1", ["user-7", 7]).tolist() == [bucket("exp-1", "user-7"),
                                                          bucket("exp-1", "7")]


def test_arms_own_contiguous_bucket_ranges_in_file_order():
    assigner = Assigner(experiment((0.3, 0.5, 0.2)))
    assert assigner.bounds.tolist() == [3000, 8000, 10_000]
    units = UNITS[:5000]
    b = buckets_of("exp-1", units)
    expected = np.where(b < 3000, "a", np.where(b < 8000, "b", "c"))
    assert (assigner.assign(units) == expected).all()
    assert assigner.arm(units[0]) == expected[0]


@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.9, 0.1)])
def test_100k_users_pass_the_srm_test(weights):
    arms = Assigner(experiment(weights)).assign(UNITS)
    counts = {a: int((arms == a).sum()) for a in "ab"}
    result = srm_check(counts, dict(zip("ab", weights)))
    assert result["p_value"] > 0.01, result


def test_the_same_unit_gets_the_same_arm_in_another_process():
    units = UNITS[:2000]
    script = ("import json, sys\n"
              "from fm_keras.experiments.assignment import Assigner\n"
              "from fm_keras.experiments.config import ABExperiment, Arm\n"
              "e = ABExperiment(name='t', unit='user_id', salt='exp-1', control='a', arms=(\n"
              "    Arm(name='a', model='ctr', version=1, weight=0.5),\n"
              "    Arm(name='b', model='ctr', version=2, weight=0.5)))\n"
              "print(json.dumps(Assigner(e).assign(json.load(sys.stdin)).tolist()))\n")
    env = {**os.environ, "PYTHONHASHSEED": "12345",  # str hash() differs; ours must not
           "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", script], input=json.dumps(units), env=env,
                         capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(out.stdout) == Assigner(experiment()).assign(units).tolist()


def test_two_salts_split_independently():
    first = Assigner(experiment(salt="exp-1")).assign(UNITS)
    second = Assigner(experiment(salt="exp-2")).assign(UNITS)
    table = pd.crosstab(first, second).to_numpy()
    _, p, _, _ = stats.chi2_contingency(table)
    assert p > 0.01, table
    # The test can fail: the same salt is perfectly dependent.
    _, p_same, _, _ = stats.chi2_contingency(pd.crosstab(first, first).to_numpy())
    assert p_same < 1e-100


def test_assign_file_writes_each_distinct_unit_once(tmp_path):
    users = tmp_path / "users.csv"
    pd.DataFrame({"user_id": ["u1", "u2", "u1", "u3"], "x": 1}).to_csv(users, index=False)
    out = tmp_path / "arms.parquet"
    summary = assign_file(experiment(), [str(users)], str(out))
    table = pd.read_parquet(out)
    assert table["user_id"].tolist() == ["u1", "u2", "u3"]
    assert table["arm"].tolist() == Assigner(experiment()).assign(["u1", "u2", "u3"]).tolist()
    assert summary["units"] == 3 and sum(summary["arms"].values()) == 3


def test_assign_file_without_the_unit_column_names_it(tmp_path):
    users = tmp_path / "users.csv"
    pd.DataFrame({"uid": ["u1"]}).to_csv(users, index=False)
    with pytest.raises(DataError, match=r"users.csv: column 'user_id' \(the experiment's unit\)"):
        assign_file(experiment(), [str(users)], str(tmp_path / "arms.csv"))
    assert not (tmp_path / "arms.csv").exists()


@pytest.mark.parametrize("ids, message", [
    (pd.array([7, None], dtype="Int64"), "column 'user_id': 1 empty unit ids"),
    ([7.0, 8.0], "column 'user_id': unit ids are floating point"),
])
def test_assign_file_rejects_empty_and_float_unit_ids(tmp_path, ids, message):
    # Both used to be assigned silently: '' as a unit, and 7.0 as '7.0' (another arm than 7).
    users = tmp_path / "users.parquet"
    pd.DataFrame({"user_id": ids}).to_parquet(users, index=False)
    with pytest.raises(DataError, match=message):
        assign_file(experiment(), [str(users)], str(tmp_path / "arms.csv"))
    assert not (tmp_path / "arms.csv").exists()


def test_assign_file_to_an_unwritable_output_is_a_data_error(tmp_path):
    users = tmp_path / "users.csv"
    pd.DataFrame({"user_id": ["u1"]}).to_csv(users, index=False)
    with pytest.raises(DataError, match="arms.csv: cannot write"):
        assign_file(experiment(), [str(users)], str(users / "arms.csv"))


@pytest.mark.parametrize("unit", [None, "", " ", 7.0, np.float64(7), True])
def test_a_request_without_a_usable_unit_id_is_refused(unit):
    # They were routed as 'None', '', '7.0' (another arm than 7), 'True'.
    with pytest.raises(ValueError, match="a unit id must be a non-empty string or an integer"):
        Assigner(experiment()).arm(unit)
    assert Assigner(experiment()).arm(7) == Assigner(experiment()).arm("7")


def test_assign_file_names_the_line_of_an_empty_unit_id(tmp_path):
    # `ab assign` named the 0-based data row ("first at row 2") of the id on line 5
    users = tmp_path / "users.csv"
    users.write_text('user_id,country\nu1,de\nu2,"multi\nline"\n"",fr\n')
    with pytest.raises(DataError, match=r"users.csv: column 'user_id': 1 empty unit ids "
                       r"\(first at line 5\)"):
        assign_file(experiment(), [str(users)], str(tmp_path / "arms.csv"))
    assert not (tmp_path / "arms.csv").exists()


@pytest.mark.parametrize("units, message", [
    ([7.0, None, ""], "got 7.0 at position 0"),
    (["u1", None], "got None at position 1"),
    (["u1", "u2", " "], "got ' ' at position 2"),
    (["u1", True], "got True at position 1"),
    (["u1", pd.Timestamp(0)], r"got Timestamp\('1970-01-01 00:00:00'\) at position 1"),
    (np.array([7.0, 8.0]), "got 7.0 at position 0"),
    (np.array([True]), "got True at position 0"),
    (np.array(["u1", ""]), "got '' at position 1"),
    (np.array(["u1", None], dtype=object), "got None at position 1"),
    (pd.Series(["u1", None], dtype="string"), "got <NA> at position 1"),
    (pd.Series([7, None], dtype="Int64"), "got <NA> at position 1"),
    (pa.array(["u1", None]), "got None at position 1"),
    (pa.chunked_array([["u1"], [" "]]), "got ' ' at position 1"),
    (pa.array([7.5]), "got 7.5 at position 0"),
])
def test_assign_refuses_the_ids_that_arm_refuses(units, message):
    # Issue 19: assign([7.0, None, '']) returned three arms although arm() refuses each.
    with pytest.raises(ValueError, match=rf"a unit id must be a non-empty string or an "
                       rf"integer, {message}"):
        Assigner(experiment()).assign(units)


def test_assign_of_an_array_is_the_assign_of_its_ids_as_text():
    assigner = Assigner(experiment())
    expected = assigner.assign([f"user-{i}" for i in range(1000)])
    texts = [f"user-{i}" for i in range(1000)]
    for units in (np.array(texts), pa.array(texts), pa.array(texts).dictionary_encode(),
                  pd.Series(texts), pd.Series(texts, dtype="string"), iter(texts)):
        assert (assigner.assign(units) == expected).all()
    numbers = assigner.assign([str(i) for i in range(1000)])
    for units in (np.arange(1000), np.arange(1000, dtype=np.uint32), pa.array(range(1000)),
                  pd.Series(range(1000)), list(range(1000))):
        assert (assigner.assign(units) == numbers).all()
    assert assigner.assign([]).shape == (0,)


@pytest.mark.parametrize("unit", [pd.Timestamp(0), np.datetime64(0, "s"),
                                  np.bool_(True), pd.NA])
def test_a_date_or_time_or_na_is_not_a_unit_id_either(unit):
    # As in the event files: a date's text depends on its type, and pd.NA was routed as '<NA>'.
    with pytest.raises(ValueError, match="a unit id must be a non-empty string or an integer"):
        Assigner(experiment()).arm(unit)


@pytest.mark.parametrize("ids", [[True, False], pd.to_datetime([1, 2], unit="s")])
def test_assign_file_rejects_bool_and_temporal_unit_ids(tmp_path, ids):
    # Issue 19: they were assigned as their text ('True'), while arm() refuses a bool.
    users = tmp_path / "users.parquet"
    pd.DataFrame({"user_id": ids}).to_parquet(users, index=False)
    with pytest.raises(DataError, match=r"users.parquet: column 'user_id': unit ids are "
                       r"(bool|timestamp)"):
        assign_file(experiment(), [str(users)], str(tmp_path / "arms.csv"))
    assert not (tmp_path / "arms.csv").exists()
