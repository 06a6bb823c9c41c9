"""Batch scoring and recommend: same numbers as the signatures, streamed, atomic, clear errors."""

import functools
import os

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from fm_keras import scoring
from fm_keras.arrow_text import split_keys
from fm_keras.config import FeatureConfig
from fm_keras.data import load_split
from fm_keras.errors import DataError, ExportError
from fm_keras.scoring import (Progress, export_list_columns, read_batches, recommend,
                              run_signature)
from fm_keras.servables import export_metadata, load_export


@functools.cache
def _load(path):
    """`load_export` of a session export, once in this module (seconds a load): the tests only
    call its signatures; the functions under test load the export themselves."""
    return load_export(path)


def _expected(exports, frame, signature="serving_default"):
    _, loaded, _ = _load(exports["ranking"])
    fn = loaded.signatures[signature]
    feed = {n: tf.constant(frame[n].to_numpy(np.float32) if s.dtype == tf.float32
                           else frame[n].astype(str).to_numpy())
            for n, s in fn.structured_input_signature[1].items()}
    return {k: v.numpy() for k, v in fn(**feed).items()}


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_scores_equal_the_signature_in_small_batches(exports, small_synth, tmp_path, suffix):
    test_csv = os.path.join(small_synth[0], "test.csv")
    out = str(tmp_path / f"scores{suffix}")
    summary = run_signature(exports["ranking"], [test_csv], out, batch_size=333,
                            progress=False)
    frame = pd.read_csv(test_csv, dtype={"hour": str})
    got = pd.read_csv(out) if suffix == ".csv" else pd.read_parquet(out)
    assert summary["rows"] == len(frame) == len(got)
    assert list(got.columns) == ["user_id", "item_id", "logit", "probability",
                                 "raw_probability"]
    assert list(got["user_id"].astype(str)) == list(frame["user_id"])
    expected = _expected(exports, frame)
    for name in ("logit", "probability", "raw_probability"):
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6)
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []


def test_vector_signatures_and_kept_columns(exports, small_synth, tmp_path):
    items_csv = os.path.join(small_synth[0], "items.csv")
    out = str(tmp_path / "items.csv")
    run_signature(exports["ranking"], [items_csv], out, signature="item_tower",
                  keep=["item_id", "item_category"], progress=False)
    got = pd.read_csv(out)
    assert list(got.columns[:2]) == ["item_id", "item_category"]
    assert [c for c in got.columns if c.startswith("item_vector_")] == \
        [f"item_vector_{j}" for j in range(11)]
    expected = _expected(exports, pd.read_csv(items_csv, dtype=str), "item_tower")
    np.testing.assert_allclose(got.filter(like="item_vector_").to_numpy(),
                               expected["item_vector"], rtol=1e-5, atol=1e-6)
    out = str(tmp_path / "items.parquet")
    run_signature(exports["ranking"], [items_csv], out, signature="item_tower", progress=False)
    vectors = np.stack(pd.read_parquet(out)["item_vector"].to_numpy())
    np.testing.assert_allclose(vectors, expected["item_vector"], rtol=1e-5, atol=1e-6)


def test_kept_columns_keep_their_parquet_types(exports, small_synth, tmp_path):
    """--keep click of a Parquet file was written as text ("Cannot perform reduction 'mean'
    with string dtype" in pandas): a Parquet file's numeric and boolean kept columns keep
    their types, text columns (and every CSV column: an id "007" stays "007") stay text."""
    frame = pd.read_csv(os.path.join(small_synth[0], "test.csv"), dtype=str).head(50)
    frame["click"] = frame["click"].astype("int64")
    frame["weight"] = np.where(np.arange(50) % 7 == 0, np.nan, 0.5)
    frame["seen"] = np.arange(50) % 2 == 0
    frame["code"] = "007"
    path = str(tmp_path / "rows.parquet")
    frame.to_parquet(path, index=False)
    keep = ["click", "weight", "seen", "code", "user_id"]
    out = str(tmp_path / "scores.parquet")
    run_signature(exports["ranking"], [path], out, keep=keep, progress=False)
    schema = pq.read_schema(out)
    assert [str(schema.field(c).type) for c in keep] == ["int64", "double", "bool", "string",
                                                         "string"]
    got = pd.read_parquet(out)
    for c in keep:
        assert got[c].tolist() == frame[c].tolist() or c == "weight", c
    np.testing.assert_array_equal(got["weight"], frame["weight"])  # NaN: a null, read as NaN
    csv = str(tmp_path / "rows.csv")
    frame.to_csv(csv, index=False)
    run_signature(exports["ranking"], [csv], out, keep=["click", "code"], progress=False)
    got = pd.read_parquet(out)
    assert got["click"].tolist() == frame["click"].astype(str).tolist()
    assert set(got["code"]) == {"007"}
    # A column int64 in one file and text in another is text, whichever file comes first (it
    # was an error naming the second file, a regression of the typed --keep).
    texts = str(tmp_path / "texts.parquet")
    frame.assign(click=frame["click"].astype(str).radd("c")).to_parquet(texts, index=False)
    for files in ([path, texts], [texts, path]):
        run_signature(exports["ranking"], files, out, keep=["click"], progress=False)
        assert str(pq.read_schema(out).field("click").type) == "string"
        assert sorted(pd.read_parquet(out)["click"])[:2] == ["0", "0"]
    run_signature(exports["ranking"], [path, path], out, keep=["click"], progress=False)
    assert str(pq.read_schema(out).field("click").type) == "int64"


def test_recommend_long_format_and_exclusions(exports, small_synth, tmp_path,
                                               monkeypatch):
    test = pd.read_csv(os.path.join(small_synth[0], "test.csv"), dtype=str)
    users = test.drop_duplicates("user_id").head(40).copy()
    users["seen"] = users["item_id"] + "|i0"
    users_csv = str(tmp_path / "users.csv")
    users.to_csv(users_csv, index=False)
    out = str(tmp_path / "recs.csv")
    summary = recommend(exports["scann"], [users_csv], out, k=5, progress=False)
    assert summary["users_fewer_than_k"] == 0 and summary["k"] == 5
    plain = pd.read_csv(out)
    assert len(plain) == 40 * 5
    assert list(plain.columns) == ["user_id", "rank", "item_id", "score", "probability"]
    assert list(plain["rank"][:5]) == [1, 2, 3, 4, 5]
    assert (plain.groupby("user_id")["score"].apply(lambda s: s.is_monotonic_decreasing)).all()
    recommend(exports["scann"], [users_csv], out, k=5, exclude_column="seen", progress=False)
    excluded = pd.read_csv(out)
    seen = dict(zip(users["user_id"], users["seen"].str.split("|")))
    assert not any(item in seen[u] for u, item in zip(excluded["user_id"], excluded["item_id"]))
    # batches of ~400 bytes of the file (the first half that): many batches, the same rows
    monkeypatch.setattr(scoring, "EXCLUSION_BATCH_BYTES", 400)
    calls = []
    monkeypatch.setattr(scoring, "read_batches", lambda *a: calls.append(a[3:]) or
                        read_batches(*a))
    recommend(exports["scann"], [users_csv], out, k=5, exclude_column="seen", progress=False)
    (rows, _, _, first_rows, _), = calls  # batch_size, derived, lists, first_rows, padding
    assert 1 < rows < len(users) / 2 and first_rows == rows // 2
    pd.testing.assert_frame_equal(pd.read_csv(out), excluded)
    with pytest.raises(ExportError, match="--k must be between 1 and 20 \\(the k this recall "
                                          "model was indexed with; rebuild"):
        recommend(exports["scann"], [users_csv], out, k=21)
    with pytest.raises(DataError, match="missing column 'seeen', the lists of item ids to "
                                        "exclude \\(--exclude-column\\) \\(did you mean "
                                        "'seen'\\?; ") as info:
        recommend(exports["scann"], [users_csv], out, k=5, exclude_column="seeen")
    # A new user's trial: the message listed 'seeen' among the columns "the signature needs".
    assert "signature needs" not in str(info.value)


def test_score_refuses_the_exclusion_signatures_naming_recommend(exports, small_synth,
                                                                   tmp_path):
    """Regression (trial): ``score --signature exclude_seen_keys`` failed with a TypeError
    (its int64 input warmed up with ""), ``exclude_seen`` with a TF shape error: their lists
    are `recommend --exclude-column`'s."""
    test_csv = os.path.join(small_synth[0], "test.csv")
    out = str(tmp_path / "out.csv")
    for signature, name in [("exclude_seen", "exclude_item_ids"),
                            ("exclude_seen_keys", "exclude_item_keys")]:
        with pytest.raises(ExportError, match=f"signature '{signature}' takes {name} as lists "
                                              r"\[rows, n\]; .*recommend --exclude-column"):
            run_signature(exports["scann"], [test_csv], out, signature=signature,
                          progress=False)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("seed", range(5))
def test_padding_bounded_ranges_cover_the_rows_within_the_budget(seed):
    """Consecutive ranges covering every row, each within the budget (a row over it alone),
    none that could take its next row (greedy), one range when everything fits."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 50, 200)
    lengths[rng.choice(200, 4)] = [500, 900, 3000, 120]  # a few very long lists
    budget = 1000
    parts = scoring.padding_bounded(lengths, budget)
    assert parts[0][0] == 0 and parts[-1][1] == 200
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    for begin, end in parts:
        widest = lengths[begin:end].max()
        assert (end - begin) * widest <= budget or end - begin == 1
        if end < 200:  # the next row would not have fitted
            assert (end + 1 - begin) * max(widest, lengths[end]) > budget
    assert scoring.padding_bounded(lengths, 200 * 3000) == [(0, 200)]
    assert scoring.padding_bounded(np.zeros(0, np.int64), 10) == [(0, 0)]


def test_one_users_long_list_does_not_widen_the_whole_batch(exports, small_synth, tmp_path,
                                                            monkeypatch):
    """A batch's lists are padded to the longest: a user excluding the whole catalog (5,000
    ids, ~30 KB) among 40 users of 2 ids makes a part of at most 2 rows, not 40 x 5,000
    slots, and the output is the same as unbounded."""
    items = pd.read_csv(os.path.join(small_synth[0], "items.csv"), dtype=str)["item_id"]
    test = pd.read_csv(os.path.join(small_synth[0], "test.csv"), dtype=str)
    users = test.drop_duplicates("user_id").head(40).copy()
    users["seen"] = users["item_id"] + "|i0"
    users.iloc[17, users.columns.get_loc("seen")] = "|".join(items)
    users_csv = str(tmp_path / "users.csv")
    users.to_csv(users_csv, index=False)
    monkeypatch.setattr(scoring, "EXCLUSION_PADDED_BYTES", None)
    whole = str(tmp_path / "whole.csv")
    recommend(exports["scann"], [users_csv], whole, k=5, exclude_column="seen", progress=False)
    widths = []
    monkeypatch.setattr(scoring, "EXCLUSION_PADDED_BYTES", 60_000)
    # The export's ids are short: `recommend` cuts the lists as item keys (`split_keys`).
    monkeypatch.setattr(scoring, "split_keys", lambda a: (
        keys := split_keys(a), widths.append((len(a), int(keys.shape[1]))))[0])
    out = str(tmp_path / "bounded.csv")
    summary = recommend(exports["scann"], [users_csv], out, k=5, exclude_column="seen",
                        progress=False)
    assert sum(rows for rows, _ in widths) == 40 and len(widths) > 1
    assert max(r * w for r, w in widths) <= 2 * len(items)  # unbounded: 40 x 5,000
    assert summary["users_fewer_than_k"] == 1
    pd.testing.assert_frame_equal(pd.read_csv(out), pd.read_csv(whole))


def test_errors_leave_nothing_behind(exports, small_synth, tmp_path):
    test_csv = os.path.join(small_synth[0], "test.csv")
    frame = pd.read_csv(test_csv, dtype=str)
    bad = tmp_path / "bad.csv"
    frame.assign(item_price=["oops"] + list(frame["item_price"][1:])).to_csv(bad, index=False)
    out = tmp_path / "out.csv"
    with pytest.raises(DataError, match="bad.csv: column 'item_price': non-numeric value "
                                        "'oops' at data row 1"):
        run_signature(exports["ranking"], [str(bad)], str(out), progress=False)
    frame.drop(columns=["device"]).to_csv(bad, index=False)
    with pytest.raises(DataError, match="missing column 'device'") as info:
        run_signature(exports["ranking"], [str(bad)], str(out), keep=["ts", "user_id"],
                      progress=False)
    # the columns the signature needs in the feature spec's order, not a protobuf map's (new
    # in each process), and not the columns kept ("ts": a new user's trial)
    spec = [e["config"]["name"] for e in export_metadata(exports["ranking"])[1]["features"]]
    assert str(info.value).endswith(f"; the signature needs {spec})"), str(info.value)
    with pytest.raises(DataError, match="test.csv: missing column 'nope', one to pass through "
                                        "to the output \(--keep\) \(the file has") as info:
        run_signature(exports["ranking"], [test_csv], str(out), keep=["nope"], progress=False)
    assert "signature needs" not in str(info.value)
    assert os.listdir(tmp_path) == ["bad.csv"]
    with pytest.raises(ExportError, match="does not exist"):
        run_signature(exports["ranking"], [test_csv], str(tmp_path / "no" / "x.csv"))
    with pytest.raises(ExportError, match="unknown format"):
        run_signature(exports["ranking"], [test_csv], str(tmp_path / "x.json"))
    with pytest.raises(ExportError, match="no signature 'nope'"):
        run_signature(exports["ranking"], [test_csv], str(out), signature="nope")
    # Regression (trial): --output naming an input replaced the input with the scores.
    before = (tmp_path / "bad.csv").read_bytes()
    for given in (str(bad), str(tmp_path / "." / "bad.csv"), str(tmp_path / "b*.csv")):
        with pytest.raises(DataError, match=r"bad.csv: --output: is the input .*bad.csv, which "
                                            "it would overwrite; write elsewhere"):
            run_signature(exports["ranking"], [given], str(bad), progress=False)
    with pytest.raises(DataError, match="--output: is the input"):
        recommend(exports["scann"], [str(bad)], str(bad), k=5, progress=False)
    assert (tmp_path / "bad.csv").read_bytes() == before
    assert os.listdir(tmp_path) == ["bad.csv"]
    os.chmod(tmp_path, 0o500)
    try:
        if not os.access(tmp_path, os.W_OK):  # root can write anywhere
            with pytest.raises(ExportError, match="not writable"):
                run_signature(exports["ranking"], [test_csv], str(out))
    finally:
        os.chmod(tmp_path, 0o700)


def _quirky_rows(small_synth, tmp_path, name="quirky.csv"):
    """Test rows with the inputs of issue 13 that `score` once rejected or misread: NA, null,
    None and "" numeric cells, a quoted field with a line break, multi-hot tokens with ':'."""
    frame = pd.read_csv(os.path.join(small_synth[0], "test.csv"), dtype=str,
                        keep_default_na=False).head(60).copy()
    frame.loc[0:3, "item_price"] = ["NA", "null", "None", ""]
    frame.loc[4, "user_id"] = "u1\nu2"  # pandas quotes it; the record spans two lines
    frame.loc[5, "item_tags"] = "tag:t81|tag:t9"
    frame.loc[6, "item_tags"] = "t8:0.5|t9"
    path = str(tmp_path / name)
    frame.to_csv(path, index=False, lineterminator="\r\n")
    return path


def test_score_reads_quirky_cells_as_training_does(exports, small_synth, tmp_path):
    path = _quirky_rows(small_synth, tmp_path)
    out = str(tmp_path / "scores.csv")
    summary = run_signature(exports["ranking"], [path], out, batch_size=16, progress=False)
    assert summary["rows"] == 60
    _, loaded, _ = _load(exports["ranking"])
    fn = loaded.signatures["serving_default"]
    specs = fn.structured_input_signature[1]
    # Training's reader (load_split) gives the signature its inputs: the same numbers.
    split = load_split([path], [FeatureConfig(n, "numeric" if s.dtype == tf.float32
                                              else "categorical", "user")
                                for n, s in specs.items()], None, passthrough=["user_id"])
    assert np.isnan(split.features["item_price"][:4]).all()
    assert split.passthrough["user_id"][4] == "u1\nu2"
    expected = {k: v.numpy() for k, v in fn(**{n: tf.constant(split.features[n])
                                                for n in specs}).items()}
    got = pd.read_csv(out, dtype={"user_id": str}, keep_default_na=False)
    assert got["user_id"][4] == "u1\nu2"
    for name in ("logit", "probability"):
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6)


def test_recommend_reads_quirky_user_files_as_training_does(exports, small_synth, tmp_path):
    path = _quirky_rows(small_synth, tmp_path, "users.csv")
    out = str(tmp_path / "recs.csv")
    recommend(exports["scann"], [path], out, k=3, progress=False)
    got = pd.read_csv(out, dtype={"user_id": str}, keep_default_na=False)
    assert len(got) == 60 * 3
    assert got["user_id"][12] == "u1\nu2"
    _, loaded, _ = _load(exports["scann"])
    fn = loaded.signatures["serving_default"]
    specs = fn.structured_input_signature[1]
    split = load_split([path], [FeatureConfig(n, "numeric" if s.dtype == tf.float32
                                              else "categorical", "user")
                                for n, s in specs.items()], None)
    expected = fn(**{n: tf.constant(split.features[n]) for n in specs})
    want = expected["item_ids"].numpy()[:, :3].reshape(-1).astype(str)
    assert got["item_id"].tolist() == want.tolist()


def test_progress_writes_whole_lines_to_a_log_and_redraws_a_terminal(capsys, monkeypatch):
    bar = Progress(total_bytes=100)  # stderr is captured: not a terminal
    for done in (10, 20, 30):
        bar.update(rows=5, done_bytes=done)
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err and err.count("\n") == 1 and "100.0% 15 rows" in err
    monkeypatch.setattr(Progress, "LOG_INTERVAL_SECONDS", 0.0)  # a long job: a line per update
    bar = Progress(total_bytes=100)
    bar.update(rows=5, done_bytes=50)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("] ")[1].split(" rows")[0].strip() for line in lines] == [
        "50.0% 5", "100.0% 5"]
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    bar = Progress(total_bytes=100)
    bar.update(rows=5, done_bytes=50)
    bar.close()
    err = capsys.readouterr().err
    assert err.startswith("\rfm-keras: [") and err.count("\r") == 2 and err.endswith("\n")


def test_score_reads_a_parquet_list_column_of_a_multi_hot_feature(exports, small_synth,
                                                                   tmp_path):
    """item_tags stored as a pandas list column scores as its "a|b" text does: the export's
    metadata says it is multi-hot and with which separator."""
    test_csv = os.path.join(small_synth[0], "test.csv")
    frame = pd.read_csv(test_csv, dtype=str, keep_default_na=False).head(500)
    text = str(tmp_path / "text.parquet")
    frame.to_parquet(text)
    lists = str(tmp_path / "lists.parquet")
    frame.assign(item_tags=[t.split("|") if t else [] for t in frame["item_tags"]]
                 ).to_parquet(lists)
    for path in (text, lists):
        run_signature(exports["ranking"], [path], path + ".out.csv", progress=False)
    np.testing.assert_array_equal(pd.read_csv(lists + ".out.csv")["logit"],
                                  pd.read_csv(text + ".out.csv")["logit"])
    # recommend: a recall export's multi-hot features are its ranking export's
    ranking = export_list_columns(export_metadata(exports["ranking"])[1])
    assert ranking["item_tags"] == "|"
    assert export_list_columns(export_metadata(exports["scann"])[1]) == ranking
