"""One reader: every command's read path gives the same cells, and the cells the file holds.

The property test writes generated quirky CSV files (quoting, BOM, CRLF, missing tokens,
unicode, numeric-looking ids, multi-line quoted records, ':' inside multi-hot tokens) and reads
each through the read path of every command: train and evaluate (`load_split`), out-of-core
training (`iter_blocks` in small blocks), score and recommend (`scoring.read_batches`), Beam
scoring (`beam_scoring.read_rows`) and the pipeline's ExampleGen (its Parquet output read back).
"""

import gzip
import math
import os
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fm_keras._tf import tf
from fm_keras.config import FeatureConfig
from fm_keras.data import iter_blocks, load_split
from fm_keras.errors import DataError
from fm_keras.features import FeatureEncoder, fit_features
from fm_keras.pipeline.config import InputConfig, SplitConfig
from fm_keras.pipeline.examplegen import run_examplegen
from fm_keras.reading import MISSING_TOKENS, numbers, read_header, record_batches
from fm_keras.scoring import read_batches
from reading_testlib import ReadableFile

FEATURES = (FeatureConfig("user_id", "categorical", "user"),
            FeatureConfig("tags", "multi_hot", "item"),
            FeatureConfig("price", "numeric", "item"))
TEXT = ("user_id", "tags")

QUIRKY_TEXT = ["007", "1e3", "0x1F", "NA", "null", "None", "", " spaced ", "a,b", 'say "hi"',
               "two\nlines", "crlf\r\ninside", "café", "日本語", "😀", "tag:t81|tag:t9",
               "a:0.5|b:2", "t1|t2|t3"]
QUIRKY_NUMBERS = ["1", "-2.5", " 3 ", "1e3", ".5", "+4", "007", "NA", "null", "None", "",
                  "nan", "NaN"]


def _expected_number(cell: str) -> float:
    cell = cell.strip()
    return math.nan if cell in MISSING_TOKENS else float(np.float32(float(cell)))


def _write_csv(path, header, rows, *, bom, newline, quote_all):
    def field(cell):
        if quote_all or any(c in cell for c in ',"\r\n'):
            return '"' + cell.replace('"', '""') + '"'
        return cell

    text = newline.join(",".join(field(c) for c in row) for row in [header, *rows]) + newline
    with open(path, "wb") as f:
        f.write((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))


text_cells = st.one_of(st.sampled_from(QUIRKY_TEXT),
                       st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=5))
number_cells = st.one_of(st.sampled_from(QUIRKY_NUMBERS),
                         st.floats(-1e30, 1e30, allow_nan=False).map(repr))
rows_strategy = st.lists(st.tuples(text_cells, text_cells, number_cells, st.sampled_from("01")),
                         min_size=2, max_size=12)


def _through_every_path(path, tmp):
    """{path name: DataFrame of row, user_id, tags, price (float32), ordered by row}."""
    from fm_keras.beam_scoring import read_rows

    out = {}
    split = load_split([path], FEATURES, "click", passthrough=["row"])
    out["train/evaluate"] = pd.DataFrame({"row": split.passthrough["row"], **split.features})
    blocks = list(iter_blocks([path], FEATURES, "click", passthrough=["row"], block_rows=3))
    out["out-of-core"] = pd.DataFrame(
        {"row": np.concatenate([b.passthrough["row"] for b in blocks]),
         **{f.name: np.concatenate([b.features[f.name] for b in blocks]) for f in FEATURES}})
    sig = {"user_id": tf.string, "tags": tf.string, "price": tf.float32}
    batches = list(read_batches(path, sig, ["row"], batch_size=4))
    out["score/recommend"] = pd.DataFrame(
        {n: np.concatenate([b[n].numpy() for b in batches]) for n in ["row", *sig]})
    for n in ("row", *TEXT):
        out["score/recommend"][n] = [v.decode("utf-8") for v in out["score/recommend"][n]]
    beam = list(read_rows(ReadableFile(path), {"user_id": "string", "tags": "string",
                                                "price": "float32"}, ["row"], chunk_rows=5))
    out["beam"] = pd.DataFrame([{"row": key[0], **values} for key, values in beam])
    gen = os.path.join(tmp, "examplegen")
    run_examplegen(InputConfig(input=(path,), label="click", dedup_keys=("row",),
                               split=SplitConfig(by="hash", column="row", eval_fraction=0.5)),
                   [path], gen)
    parts = [load_split([os.path.join(gen, f"{s}.parquet")], FEATURES, "click",
                        passthrough=["row"]) for s in ("train", "eval")
             if len(pd.read_parquet(os.path.join(gen, f"{s}.parquet")))]
    out["examplegen"] = pd.concat(
        [pd.DataFrame({"row": p.passthrough["row"], **p.features}) for p in parts])
    return {k: v.assign(row=v["row"].astype(int)).sort_values("row").reset_index(drop=True)
            for k, v in out.items()}


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(rows=rows_strategy, bom=st.booleans(), newline=st.sampled_from(["\n", "\r\n"]),
       quote_all=st.booleans())
@example(rows=[("007", "", "1", "0")] * 2, bom=False, newline="\n", quote_all=False)  # no tags
def test_every_command_reads_quirky_csv_alike(tmp_path_factory, rows, bom, newline, quote_all):
    tmp = str(tmp_path_factory.mktemp("quirky"))
    path = os.path.join(tmp, "logs.csv")
    header = ["row", "user_id", "tags", "price", "click"]
    _write_csv(path, header, [(str(i), *r) for i, r in enumerate(rows)], bom=bom,
               newline=newline, quote_all=quote_all)
    frames = _through_every_path(path, tmp)

    expected = pd.DataFrame({"row": range(len(rows)), "user_id": [r[0] for r in rows],
                             "tags": [r[1] for r in rows],
                             "price": [_expected_number(r[2]) for r in rows]})
    fitted = fit_features(FEATURES, load_split([path], FEATURES, "click"))
    encoder = FeatureEncoder(fitted)

    def encoded(frame):
        ids, values = encoder({"user_id": tf.constant(frame["user_id"].tolist()),
                               "tags": tf.constant(frame["tags"].tolist()),
                               "price": tf.constant(frame["price"].to_numpy(np.float32))})
        return ids.numpy(), values.numpy()

    want_ids, want_values = encoded(expected)
    for name, frame in frames.items():
        assert frame["row"].tolist() == expected["row"].tolist(), name
        for column in TEXT:
            assert frame[column].tolist() == expected[column].tolist(), (name, column)
        np.testing.assert_array_equal(frame["price"].to_numpy(np.float32),
                                      expected["price"].to_numpy(np.float32), err_msg=name)
        ids, values = encoded(frame)
        np.testing.assert_array_equal(ids, want_ids, err_msg=name)
        np.testing.assert_array_equal(values, want_values, err_msg=name)


def test_numbers_rule_matches_a_python_reference():
    cells = [*QUIRKY_NUMBERS, "1e-3", "-0", "3.4e38"]
    got = numbers(pa.array(cells), "f.csv: column 'x'")
    want = np.array([_expected_number(c) for c in cells], np.float32)
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.float32
    parquet = numbers(pa.array([1, None, 3], pa.int64()), "f.parquet: column 'x'")
    np.testing.assert_array_equal(parquet, np.array([1, np.nan, 3], np.float32))


@pytest.mark.parametrize("cells, message", [
    (["1", "2", "x1", "4"], "f.csv: column 'x': non-numeric value 'x1' at data row 13"),
    (["1", "1,5"], "non-numeric value '1,5' at data row 12"),
    (["1", "inf"], "f.csv: column 'x': infinite value at data row 12"),
    (["1e400"], "infinite value at data row 11"),
])
def test_numbers_errors_name_the_cell_and_data_row(cells, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        numbers(pa.array(cells), "f.csv: column 'x'", rows=10)


def test_csv_errors_name_the_line(tmp_path):
    extra = tmp_path / "extra.csv"
    extra.write_bytes(b'a,b\n1,x\n2,"quoted\nnewline"\n3,y,z\n')
    with pytest.raises(DataError, match=r"extra.csv: line 5: 3 fields where the header has 2"):
        list(record_batches(str(extra)))
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"a,b\n1,ok\n2,caf\xe9\n")
    with pytest.raises(DataError, match=r"latin.csv: line 3: not UTF-8 \(byte 0xe9 at column "
                                        r"'b'\); re-encode the file as UTF-8"):
        list(record_batches(str(latin)))
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(DataError, match="the file is empty"):
        read_header(str(tmp_path / "empty.csv"))
    for name, text in (("header.csv", b"a,b\r\n"), ("header_no_eol.csv", b"a,b")):
        # without a line end after the header pyarrow said "Empty CSV file or block"
        (tmp_path / name).write_bytes(text)
        with pytest.raises(DataError, match=f"{name}: the file has a header but no rows$"):
            list(record_batches(str(tmp_path / name)))


def _read_through(command, path, tmp):
    """`path` read by one command's read path, to its end."""
    from fm_keras.beam_scoring import read_rows

    features = (FeatureConfig("user_id", "categorical", "user"),
                FeatureConfig("item_id", "categorical", "item"))
    if command == "header":
        read_header(path)
    elif command == "train/evaluate":
        load_split([path], features, "click")
    elif command == "out-of-core":
        list(iter_blocks([path], features, "click", block_rows=100))
    elif command == "score/recommend":
        list(read_batches(path, {"user_id": tf.string, "item_id": tf.string}, [],
                          batch_size=100))
    elif command == "beam":
        list(read_rows(ReadableFile(path), {"user_id": "string", "item_id": "string"}, []))
    elif command == "examplegen":
        run_examplegen(InputConfig(input=(path,), label="click"), [path],
                       os.path.join(tmp, "examplegen"))


@pytest.mark.parametrize("command", ["train/evaluate", "out-of-core", "score/recommend", "beam",
                                     "examplegen"])
@pytest.mark.parametrize("corruption, message", [
    # A latin-1 byte in a cell of a truncated last row: pyarrow's invalid-row callback could
    # not decode the row (Python printed "Exception ignored ... UnicodeDecodeError" from
    # read_header's lambda) and the error named no line.
    (b"u9,caf\xe9", r"line 1202: not UTF-8 \(byte 0xe9 at column 'item_id'\); re-encode the "
                    r"file as UTF-8"),
    (b"u\xff9,i9,1\nu10,i1", r"line 1202: not UTF-8 \(byte 0xff at column 'user_id'\)"),
    (b"u9,i9,1\nu10,i1", r"line 1203: 2 fields where the header has 3 \('u10,i1'"),
    # A NUL at the end of an id: NumPy's str arrays drop it, so '82' and '82\x00' were one
    # value twice in a vocabulary and `fm-keras train` ended in a Keras traceback.
    (b"u9,i9,1\n82\x00,i1,0\n", r"line 1203: a NUL byte in column 'user_id'; remove it$"),
])
def test_a_corrupted_csv_is_one_line_naming_line_and_column_on_every_path(
        tmp_path, monkeypatch, command, corruption, message):
    """A file cut short, with bytes that are not UTF-8, seen by a new user's `fm-keras train`:
    every command that reads CSV names the line (and column), and Python prints nothing."""
    unraisable = []
    monkeypatch.setattr("sys.unraisablehook", unraisable.append)
    path = tmp_path / "train.csv"
    rows = "".join(f'u{i},"i\n{i}",{i % 2}\n' for i in range(600))  # 2 lines a row
    path.write_bytes(b"user_id,item_id,click\n" + rows.encode() + corruption)
    with pytest.raises(DataError) as info:
        _read_through(command, str(path), str(tmp_path))
    assert str(info.value).startswith(f"{path}: "), str(info.value)
    assert re.search(message, str(info.value)) and "\n" not in str(info.value), str(info.value)
    read_header(str(path))  # the header is fine: the rows are not read for it
    assert not unraisable, [u.exc_value for u in unraisable]


def test_a_nul_byte_in_a_parquet_or_libsvm_text_cell_names_the_row(tmp_path):
    parquet = tmp_path / "nul.parquet"
    pq.write_table(pa.table({"user_id": ["1", "82\x00", "3"], "n": [1, 2, 3]}), parquet)
    with pytest.raises(DataError, match=r"nul.parquet: data row 2: a NUL byte in column "
                                        r"'user_id'; remove it$"):
        list(record_batches(str(parquet), block_rows=1))
    assert sum(b.num_rows for _, b in record_batches(str(parquet), ["n"])) == 3
    libsvm = tmp_path / "nul.libsvm"
    libsvm.write_bytes(b"1 3:1\n0 4:1\n0 4\x00:1\n")
    with pytest.raises(DataError, match=r"nul.libsvm: line 3: a NUL byte in column "
                                        r"'features'; remove it$"):
        list(record_batches(str(libsvm)))


def test_a_header_that_is_not_utf8_names_its_line(tmp_path):
    path = tmp_path / "h.csv"
    path.write_bytes(b"\n\"user\nid\",caf\xe9\n1,2\n")
    with pytest.raises(DataError, match=r"h.csv: line 3: not UTF-8 \(byte 0xe9 in the header\)"):
        read_header(str(path))
    path.write_bytes(b'\xef\xbb\xbf\r\n"user\r\nid","a ""b"""\r\n1,2\r\n')
    assert read_header(str(path)) == ["user\r\nid", 'a "b"']
    gz = tmp_path / "ok.csv.gz"  # was "not UTF-8 (byte 0x8b in the header) ... iconv -f latin1"
    gz.write_bytes(gzip.compress(b"user_id,click\n1,0\n"))
    with pytest.raises(DataError, match=r"ok.csv.gz: the file is gzip-compressed; decompress "
                                        r"it first, e.g. gunzip$"):
        load_split([str(gz)], (FeatureConfig("user_id", "categorical", "user"),), "click")


def test_batches_hold_block_rows_and_count_data_rows(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("a,b\n" + "".join(f'{i},"x\n{i}"\n' for i in range(10)))
    got = [(first, batch.num_rows) for first, batch in record_batches(str(path), ["b"], 4)]
    assert got == [(0, 4), (4, 4), (8, 2)]
    shorter_first = record_batches(str(path), ["b"], 4, first_rows=1)
    assert [(first, batch.num_rows) for first, batch in shorter_first] == \
        [(0, 1), (1, 4), (5, 4), (9, 1)]
    parquet = tmp_path / "rows.parquet"
    pd.DataFrame({"b": [str(i) for i in range(10)]}).to_parquet(parquet)
    got = [(first, batch.column("b")[0].as_py()) for first, batch in
           record_batches(str(parquet), ["b"], 6, first_rows=3)]
    assert got == [(0, "0"), (3, "3"), (9, "9")]
    whole = [batch for _, batch in record_batches(str(path), None, None)]
    assert len(whole) == 1 and whole[0].column("b")[9].as_py() == "x\n9"
    assert read_header(str(path)) == ["a", "b"]


def test_a_parquet_list_column_reads_as_its_multi_hot_text_on_every_path(tmp_path):
    """A pandas list column of a multi-hot feature is the cell "a|b" to train/evaluate,
    out-of-core training, score/recommend and Beam scoring (it crashed them with Arrow's
    "Unsupported cast from list<element: string> to utf8")."""
    from fm_keras.beam_scoring import read_rows
    from fm_keras.scoring import export_list_columns

    tags = [["t1", "t2"], None, [], ["t3", None], ["tag:t81", "a:0.5"]]
    path = str(tmp_path / "logs.parquet")
    pd.DataFrame({"row": [str(i) for i in range(5)], "user_id": list("uvwxy"), "tags": tags,
                  "price": [1.0, 2.0, None, 4.0, 5.0], "click": [0, 1, 0, 1, 1]}
                 ).to_parquet(path)
    want = ["t1|t2", "", "", "t3|", "tag:t81|a:0.5"]
    assert load_split([path], FEATURES, "click").features["tags"].tolist() == want
    blocks = list(iter_blocks([path], FEATURES, "click", block_rows=2))
    assert np.concatenate([b.features["tags"] for b in blocks]).tolist() == want
    meta = {"features": [{"config": {"name": f.name, "kind": f.kind, "tower": f.tower}}
                         for f in FEATURES]}  # an export's metadata
    lists = export_list_columns(meta)
    assert lists == {"tags": "|"}
    sig = {"user_id": tf.string, "tags": tf.string, "price": tf.float32}
    scored = [v.decode() for b in read_batches(path, sig, [], 2, lists=lists)
              for v in b["tags"].numpy()]
    assert scored == want
    beam = read_rows(ReadableFile(path), {"tags": "string"}, ["row"], 2, lists=lists)
    assert [values["tags"] for _, values in beam] == want
    gen = str(tmp_path / "examplegen")
    run_examplegen(InputConfig(input=(path,), label="click", dedup_keys=("row",),
                               split=SplitConfig(by="hash", column="row", eval_fraction=0.5)),
                   [path], gen, lists)
    parts = pd.concat([pd.read_parquet(os.path.join(gen, f"{s}.parquet")) for s in
                       ("train", "eval")]).assign(row=lambda f: f["row"].astype(int))
    assert parts.sort_values("row")["tags"].tolist() == want


def test_a_parquet_list_column_of_a_feature_that_is_not_multi_hot_is_a_one_line_error(tmp_path):
    path = str(tmp_path / "logs.parquet")
    pd.DataFrame({"user_id": [["u1"], ["u2"]], "tags": ["a", "b"], "price": [1.0, 2.0],
                  "click": [0, 1]}).to_parquet(path)
    with pytest.raises(DataError, match=r"logs.parquet: column 'user_id': a list column "
                                        r"\(list<element: string>\) is read only for a "
                                        "multi_hot feature"):
        load_split([path], FEATURES, "click")
    sig = {"user_id": tf.string, "tags": tf.string, "price": tf.float32}
    with pytest.raises(DataError, match="column 'user_id': a list column"):
        list(read_batches(path, sig, [], 2, lists={"tags": "|"}))


def test_a_duplicated_column_name_is_a_one_line_error(tmp_path):
    """A header naming a column twice trained silently on the first of them."""
    csv = tmp_path / "dup.csv"
    csv.write_text("user_id,tags,price,click,tags\nu1,a,1,0,b\nu2,c,2,1,d\n")
    message = (r"dup.(csv|parquet): column 'tags' appears twice in the header; rename one of "
               r"them \(a reader would take only the first\)$")
    with pytest.raises(DataError, match=message):
        load_split([str(csv)], FEATURES, "click")
    sig = {"user_id": tf.string, "tags": tf.string, "price": tf.float32}
    with pytest.raises(DataError, match=message):
        list(read_batches(str(csv), sig, [], 2))
    parquet = str(tmp_path / "dup.parquet")
    pq.write_table(pa.table([pa.array(["u1"]), pa.array(["a"]), pa.array([1.0]),
                             pa.array([0]), pa.array(["b"])],
                            names=["user_id", "tags", "price", "click", "tags"]), parquet)
    with pytest.raises(DataError, match=message):
        load_split([parquet], FEATURES, "click")
    with pytest.raises(DataError, match=message):
        list(record_batches(parquet))


@pytest.mark.parametrize("name, data, rows", [
    ("empty.csv", b"", False),
    ("header.csv", b"a,b\n", False),
    ("header_blank_lines.csv", b'"a\nx",b\r\n\r\n\n', False),
    ("header_no_eol.csv", b"a,b", False),
    ("one_row.csv", b"a,b\n1,2", True),
    ("blank.libsvm", b"\n\n", False),
    ("one.libsvm", b"1 3:1\n", True),
    ("latin_header.csv", b"caf\xe9\n", True),  # not decided here: its reader says what is wrong
])
def test_has_rows_tells_empty_part_files(tmp_path, name, data, rows):
    from fm_keras.reading import has_rows

    (tmp_path / name).write_bytes(data)
    assert has_rows(str(tmp_path / name)) is rows
    pq.write_table(pa.table({"a": pa.array([], pa.string())}), tmp_path / "none.parquet")
    pq.write_table(pa.table({"a": ["x"]}), tmp_path / "one.parquet")
    assert not has_rows(str(tmp_path / "none.parquet")) and has_rows(str(tmp_path / "one.parquet"))
