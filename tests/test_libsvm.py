"""libSVM / libFFM text input: the parse against a Python reference, every command's read path
reading the same cells and encoded ids, and the one-line errors (file, line, token).

The reference reads a file the obvious way (a loop over lines and tokens); the parser under test
works on a block's lines with pyarrow's kernels. Generated files carry the quirks a real one can: a
byte-order mark, CRLF, tabs and runs of spaces, unicode (also unicode spaces) and numeric-looking
ids (``007`` stays ``"007"``), numbers as ``+4``, ``.5``, ``1e3``.
"""

import itertools
import os
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fm_keras._tf import tf
from fm_keras.config import FeatureConfig
from fm_keras.data import iter_blocks, load_split
from fm_keras.errors import DataError
from fm_keras.features import FeatureEncoder, fit_features
from fm_keras.fitting import NUMBER
from fm_keras.libsvm import check_features, is_column, parse_lines, text_format
from fm_keras.pipeline.config import InputConfig, SplitConfig
from fm_keras.pipeline.examplegen import run_examplegen
from fm_keras.reading import missing_columns, read_header, record_batches
from fm_keras.scoring import read_batches
from reading_testlib import ReadableFile

SPACE = " \t\v\f\r"  # what separates tokens (ASCII only: a unicode space is part of an idx)
NUMBER_TEXTS = ["1", "-2.5", "1e3", ".5", "+4", "007", "0", "3.", "1E-2", "-0", "2e+2"]


def reference(text: str, fmt: str) -> dict[str, list[str]]:
    """The columns of a libSVM/libFFM text, read line by line (the module's rules)."""
    lines = re.split("\r\n|\r|\n", text.removeprefix("\ufeff"))
    if lines[-1] == "":
        lines.pop()
    columns: dict[str, list[str]] = {"label": []}
    rows = []
    for line in lines:
        tokens = [t for t in re.split(f"[{re.escape(SPACE)}]+", line) if t]
        columns["label"].append(tokens[0])
        rows.append(tokens[1:])
    if fmt == "libsvm":
        columns["features"] = ["|".join(r) for r in rows]
        return columns
    fields = sorted({int(t.split(":")[0]) for r in rows for t in r})
    for f in fields:
        columns[f"field_{f}"] = ["|".join(t.split(":", 1)[1] for t in r
                                          if int(t.split(":")[0]) == f) for r in rows]
    return columns


ids = st.text(st.characters(blacklist_categories=("Cs", "Cc"),
                            blacklist_characters=":|\x1f\u2028\u2029\x85"),
              min_size=1, max_size=4).filter(lambda s: not any(c in SPACE for c in s))
numbers_text = st.one_of(st.sampled_from(NUMBER_TEXTS),
                         st.floats(-1e30, 1e30, allow_nan=False).map(repr))
gaps = st.sampled_from([" ", "  ", "\t", " \t "])
labels = st.sampled_from(["0", "1", "1.0", "+1", "0e0", "1."])


@st.composite
def files(draw, fmt):
    """(text, bom) of a generated libSVM/libFFM file. A libFFM file's first line has fields 0,
    1 and 2 (so that every path, ExampleGen's Parquet too, has those columns); every line
    ends with a token of its own (ExampleGen drops duplicate rows)."""
    lines = []
    for i in range(draw(st.integers(2, 10))):
        tokens = []
        fields = [0, 1, 2] if i == 0 and fmt == "libffm" else []
        count = draw(st.integers(0, 4))
        fields += draw(st.lists(st.integers(0, 3), min_size=count, max_size=count))
        for field in fields if fmt == "libffm" else range(count):
            token = f"{draw(ids)}:{draw(numbers_text)}"
            if fmt == "libffm":
                token = f"{draw(st.sampled_from(['', '0', '00']))}{field}:{token}"
            tokens.append(token)
        tokens.append(f"{'3:' if fmt == 'libffm' else ''}line{i}:1")
        lead, trail = draw(st.sampled_from(["", " ", "\t"])), draw(st.sampled_from(["", " "]))
        lines.append(lead + draw(labels) + "".join(draw(gaps) + t for t in tokens) + trail)
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    return newline.join(lines) + draw(st.sampled_from([newline, ""])), draw(st.booleans())


def _write(path, text, bom=False):
    with open(path, "wb") as f:
        f.write((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))


def _through_every_path(path, features, tmp):
    """{command's read path: DataFrame of label (float32) and the feature columns}, each in
    file order, except Beam's and ExampleGen's (returned sorted by every column)."""
    from fm_keras.beam_scoring import read_rows

    names = [f.name for f in features]
    out = {}
    split = load_split([path], features, "label")
    out["train/evaluate"] = pd.DataFrame({"label": split.labels, **split.features})
    blocks = list(iter_blocks([path], features, "label", block_rows=3))
    out["out-of-core"] = pd.DataFrame(
        {"label": np.concatenate([b.labels for b in blocks]),
         **{n: np.concatenate([b.features[n] for b in blocks]) for n in names}})
    sig = {"label": tf.float32, **{n: tf.string for n in names}}
    batches = list(read_batches(path, sig, [], batch_size=4))
    frame = pd.DataFrame({n: np.concatenate([b[n].numpy() for b in batches]) for n in sig})
    out["score/recommend"] = frame.assign(**{n: [v.decode() for v in frame[n]] for n in names})
    beam = read_rows(ReadableFile(path), {"label": "float32", **dict.fromkeys(names, "string")},
                     [], chunk_rows=5)
    out["beam"] = pd.DataFrame([values for _, values in beam])
    gen = os.path.join(tmp, "examplegen")
    run_examplegen(InputConfig(input=(path,), label="label",
                               split=SplitConfig(by="hash", column="label", eval_fraction=0.5)),
                   [path], gen)
    parts = [load_split([os.path.join(gen, f"{s}.parquet")], features, "label")
             for s in ("train", "eval") if len(pd.read_parquet(os.path.join(gen, f"{s}.parquet")))]
    out["examplegen"] = pd.concat(
        [pd.DataFrame({"label": p.labels, **p.features}) for p in parts])
    for name in ("beam", "examplegen"):
        out[name] = _sorted(out[name])
    return {k: v.astype({"label": np.float32}).reset_index(drop=True) for k, v in out.items()}


def _sorted(frame):
    return frame.sort_values(list(frame.columns)).reset_index(drop=True)


def _check_every_path(path, fmt, text, tmp):
    want = reference(text, fmt)
    names = ["features"] if fmt == "libsvm" else ["field_0", "field_1", "field_2"]
    features = [FeatureConfig(n, "multi_hot", "user" if i % 2 else "item")
                for i, n in enumerate(names)]
    expected = pd.DataFrame({"label": np.float32([float(v) for v in want["label"]]),
                             **{n: want[n] for n in names}})
    encoder = FeatureEncoder(fit_features(features, load_split([path], features, "label")))

    def encoded(frame):
        ids, values = encoder({n: tf.constant(frame[n].tolist()) for n in names})
        return ids.numpy(), values.numpy()

    for name, frame in _through_every_path(path, features, tmp).items():
        want_frame = _sorted(expected) if name in ("beam", "examplegen") else expected
        assert frame[list(want_frame.columns)].equals(want_frame), name
        for got, wanted in zip(encoded(frame), encoded(want_frame)):
            np.testing.assert_array_equal(got, wanted, err_msg=name)


PROPERTY = settings(max_examples=3, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


def _write_and_check(tmp_path_factory, fmt, generated, name):
    text, bom = generated
    tmp = str(tmp_path_factory.mktemp(fmt))
    path = os.path.join(tmp, name)
    _write(path, text, bom)
    _check_every_path(path, fmt, text, tmp)


# The quirks in one file each (a few generated files besides): a byte-order mark, CRLF, no last
# line end, tabs, runs of spaces, spaces around a line, a unicode space inside an idx, unicode and
# numeric-looking ids, every form of number, a line of a label only; libFFM fields written with
# leading zeros and lines without some fields.
QUIRKS = {
    "libsvm": ("\t1  007:1\ta\u00a0b:.5 \u00e9:+4  line0:1 \r\n"
               "0e0 7:1e3 x:3.\ty:1E-2\t z:-0 w:2e+2 line1:1\r\n"
               "1.0 v:-2.5 line2:1\r\n"
               "0\r\n", True),
    "libffm": ("1 0:u1:1 1:i007:.5 2:t\u00e9:+4 3:line0:1\n"
               "0e0\t00:u2:1e3  2:t1:3.\t2:t\u00a0b:1E-2 3:line1:1 \n"
               " 1. 1:i7:-0 3:line2:1", False),
}


@PROPERTY
@given(generated=files("libsvm"))
@example(generated=QUIRKS["libsvm"])
def test_every_command_reads_a_libsvm_file_alike(tmp_path_factory, generated):
    _write_and_check(tmp_path_factory, "libsvm", generated, "logs.libsvm")


@PROPERTY
@given(generated=files("libffm"))
@example(generated=QUIRKS["libffm"])
def test_every_command_reads_a_libffm_file_alike(tmp_path_factory, generated):
    _write_and_check(tmp_path_factory, "libffm", generated, "logs.ffm")


@settings(max_examples=40, deadline=None)
@given(generated=st.one_of(files("libsvm").map(lambda g: ("libsvm", g[0])),
                           files("libffm").map(lambda g: ("libffm", g[0]))),
       block=st.integers(1, 7))
def test_parse_matches_the_reference_in_any_blocks(generated, block):
    """The parse of a file cut into blocks of any size equals the reference, with line
    numbers counted across the blocks."""
    fmt, text = generated
    lines = re.split("\r\n|\r|\n", text)
    lines = lines[:-1] if lines[-1] == "" else lines
    want = reference(text, fmt)
    got: dict[str, list[str]] = {}
    for at in range(0, len(lines), block):
        batch, _ = parse_lines(pa.array(lines[at:at + block]), fmt, list(want), "f", at + 1)
        for name in want:
            got.setdefault(name, []).extend(batch.column(name).to_pylist())
    assert got == want


def test_values_are_read_by_the_multi_hot_weight_rule():
    """Every short string over the characters of numbers is a value exactly when
    `fm_keras.fitting.NUMBER` (the encoder's weight rule) matches it: the parser's fast
    path (Arrow's RE2 match of the line, its float32 cast where a number has an exponent)
    accepts the same strings as Python's regex."""
    pattern = re.compile(NUMBER)
    for size in range(1, 5):
        for chars in itertools.product("01.eE+-", repeat=size):
            value = "".join(chars)
            line = pa.array([f"1 3:{value}"])
            try:
                parse_lines(line, "libsvm", None, "f", 1)
                accepted = True
            except DataError:
                accepted = False
            assert accepted == bool(pattern.fullmatch(value)), value


def test_header_and_columns(tmp_path):
    svm, ffm = tmp_path / "a.svm", tmp_path / "b.libffm"
    _write(svm, "1 3:1\n")
    _write(ffm, "1 4:x:1 0:y:1\n0 07:z:2\n")
    assert read_header(str(svm)) == ["label", "features"]
    assert read_header(str(ffm)) == ["label", "field_0", "field_4", "field_7"]
    # Any field_<n> is a column of a libFFM file (empty where a line lacks the field).
    assert missing_columns(str(ffm), ["label", "field_9", "field_09", "feature"]) == \
        ["field_09", "feature"]
    assert missing_columns(str(svm), ["features", "field_0"]) == ["field_0"]
    (_, batch), = record_batches(str(ffm), ["field_9", "field_7"])
    assert batch.to_pydict() == {"field_9": ["", ""], "field_7": ["", "z:2"]}
    assert (text_format("x.libsvm"), text_format("x.ffm"), text_format("x.csv")) == \
        ("libsvm", "libffm", None)
    assert is_column("libffm", "field_12") and not is_column("libffm", "field_-1")


@pytest.mark.parametrize("name, text, message", [
    ("a.libsvm", "1 3:1\n\n0 4:1\n", "a.libsvm: line 2: blank line"),
    ("a.libsvm", "1 3:1\n0 4:1\n   \n", "a.libsvm: line 3: blank line"),
    ("a.libsvm", "1 3:1\n0 4\n", "a.libsvm: line 2: token '4' is not idx:val"),
    ("a.libsvm", "1 3:1\n0 4:x\n", "a.libsvm: line 2: token '4:x': value 'x' is not a finite"),
    ("a.libsvm", "1 3:1e39\n", "line 1: token '3:1e39': value '1e39' is not a finite number"),
    ("a.libsvm", "1 3:1e3\n1 4:" + "9" * 39 + "\n", "line 2: token '4:999999999999999999"),
    ("a.ffm", "1 0:3:1\n1e39 0:3:1\n", "a.ffm: line 2: label '1e39' is not a finite number"),
    ("a.libsvm", "1 3:1\r\nyes 4:1\r\n", "a.libsvm: line 2: label 'yes' is not a finite number"),
    ("a.libsvm", "NA 4:1\n", "line 1: label 'NA' is not a finite number"),
    ("a.libsvm", "1 a|b:1\n", "line 1: token 'a|b:1' holds '|', the multi-hot separator"),
    ("a.libsvm", "1 :1\n", "line 1: token ':1' is not idx:val"),
    ("a.libsvm", "1 3:1:2\n", "line 1: token '3:1:2' is not idx:val"),
    ("a.libsvm", "1 3:1\n0 4:\x1f1\n", "a.libsvm: line 2: holds the control character"),
    ("a.ffm", "1 0:3:1\n0 3:0.5\n", "a.ffm: line 2: token '3:0.5' is not field:idx:val"),
    ("a.ffm", "1 a:3:1\n", "line 1: token 'a:3:1': field 'a' is not a non-negative integer"),
    ("a.ffm", "1 -1:3:1\n", "line 1: token '-1:3:1': field '-1' is not a non-negative"),
    ("a.ffm", "1 1::1\n", "line 1: token '1::1' is not field:idx:val"),
    ("a.ffm", "1 1:2:y\n", "line 1: token '1:2:y': value 'y' is not a finite number"),
    # SVMrank's query ids were read as the feature 'qid' of weight N
    ("a.libsvm", "1 3:1\n2 qid:7 3:1 4:0.5\n", "a.libsvm: line 2: token 'qid:7': qid: ranking "
     "files are not supported; drop the qid:N tokens"),
    ("a.libsvm", "1\tqid:1\t3:1\n", "line 1: token 'qid:1': qid: ranking files are not"),
    ("a.ffm", "1 0:3:1\n0 qid:2 0:3:1\n", "a.ffm: line 2: token 'qid:2': qid: ranking files"),
])
def test_bad_input_names_file_line_and_token(tmp_path, name, text, message):
    path = tmp_path / name
    _write(path, text)
    with pytest.raises(DataError, match=re.escape(message)) as raised:
        list(record_batches(str(path)))
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


def test_the_first_problem_is_the_one_reported(tmp_path):
    """A problem in a later block, or a later token, never hides an earlier one."""
    path = tmp_path / "a.libsvm"
    _write(path, "1 3:1\n" * 50_000 + "1 4:x 5\n" + "0 a:1\n" * 10 + "bad\n")
    with pytest.raises(DataError, match=r"line 50001: token '4:x': value 'x'"):
        list(record_batches(str(path)))


def test_a_libsvm_column_must_be_a_weighted_multi_hot_feature(tmp_path):
    path = tmp_path / "a.libsvm"
    _write(path, "1 3:1\n0 4:2\n")
    check_features(str(path), [FeatureConfig("features", "multi_hot", "user"),
                               FeatureConfig("label", "numeric", "user")])
    for wrong in (FeatureConfig("features", "categorical", "user"),
                  FeatureConfig("features", "multi_hot", "user", separator=",")):
        with pytest.raises(DataError, match="a.libsvm: feature 'features': a libSVM column "
                                            "holds weighted multi-hot text"):
            load_split([str(path)], [wrong], "label")
    with pytest.raises(DataError, match=r"a.libsvm: missing column 'feature' \(did you mean "
                                        r"'features'\?"):
        load_split([str(path)], [FeatureConfig("feature", "multi_hot", "user")], "label")


def _ffm_logs(path, rows, seed):
    """A small libFFM click log: field 0 the user, 1 the item (weighted), 2 two context tags;
    clicks from the user's and the item's biases. Returns the lines."""
    rng = np.random.default_rng(seed)
    user, item = rng.integers(0, 30, rows), rng.integers(0, 30, rows)
    logit = (user % 3 - 1.0) + (item % 4 - 1.5)
    click = rng.random(rows) < 1 / (1 + np.exp(-logit))
    lines = [f"{int(c)} 0:u{u}:1 1:i{i}:{1 + i % 2} 2:t{i % 5}:1 2:t{u % 7}:0.5"
             for c, u, i in zip(click, user, item)]
    _write(path, "\n".join(lines) + "\n")
    return lines


def test_train_evaluate_and_score_a_libffm_log(tmp_path, capsys):
    """fm-keras train, evaluate and score on libFFM files; score gives the same outputs for
    the libFFM file and for a CSV file of the same cells."""
    import json

    from fm_keras.cli import main

    for name, rows, seed in (("train", 3000, 1), ("valid", 600, 2), ("test", 600, 3)):
        _ffm_logs(tmp_path / f"{name}.ffm", rows, seed)
    (tmp_path / "exp.yaml").write_text(
        "data: {train: train.ffm, valid: valid.ffm, test: test.ffm, label: label}\n"
        "features:\n"
        "  - {name: field_0, kind: multi_hot, tower: user}\n"
        "  - {name: field_1, kind: multi_hot, tower: item}\n"
        "  - {name: field_2, kind: multi_hot, tower: context}\n"
        "training: {epochs: 2, batch_size: 256, learning_rate: 0.05}\n")
    run = str(tmp_path / "run")
    assert main(["train", "--config", str(tmp_path / "exp.yaml"), "--out", run, "--quiet"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert main(["evaluate", "--run", run, "--data", str(tmp_path / "test.ffm")]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["rows"] == 600
    assert evaluated["auc"] == pytest.approx(trained["metrics"]["test"]["auc"], abs=1e-5)
    assert main(["export", "--run", run, "--name", "ctr", "--base", str(tmp_path / "m")]) == 0
    capsys.readouterr()
    cells = next(record_batches(str(tmp_path / "test.ffm"), ["field_0", "field_1", "field_2"],
                                None))[1]
    pd.DataFrame(cells.to_pydict()).to_csv(tmp_path / "test.csv", index=False)
    out = str(tmp_path / "scores.csv")  # one score of both files: rows of test.ffm, then test.csv
    assert main(["score", "--model", str(tmp_path / "m" / "ctr"), "--input",
                 str(tmp_path / "test.ffm"), str(tmp_path / "test.csv"), "--output", out,
                 "--quiet"]) == 0
    scores = pd.read_csv(out)
    assert len(scores) == 1200
    pd.testing.assert_frame_equal(scores.iloc[:600].reset_index(drop=True),
                                  scores.iloc[600:].reset_index(drop=True))
    # --keep label (the README's way to compute metrics from the output): a number, not text.
    kept = str(tmp_path / "kept.parquet")
    assert main(["score", "--model", str(tmp_path / "m" / "ctr"), "--input",
                 str(tmp_path / "test.ffm"), "--output", kept, "--keep", "label",
                 "--quiet"]) == 0
    labels = next(record_batches(str(tmp_path / "test.ffm"), ["label"], None))[1]
    got = pd.read_parquet(kept)["label"]
    assert got.dtype == np.float64
    assert got.tolist() == [float(x) for x in labels.column(0).to_pylist()]


def test_a_bad_line_stops_train_with_one_line(tmp_path, capsys):
    from fm_keras.cli import main

    _write(tmp_path / "train.libsvm", "1 a:1 b:2\n0 a:1\n1 b:0.5 c\n")
    (tmp_path / "exp.yaml").write_text(
        "data: {train: train.libsvm, label: label}\n"
        "features: [{name: features, kind: multi_hot, tower: user}]\n")
    assert main(["train", "--config", str(tmp_path / "exp.yaml"), "--out",
                 str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"fm-keras: error: {tmp_path / 'train.libsvm'}: line 3: token 'c' is not idx:val "
        "(a libSVM line is 'label idx:val idx:val ...')")
    assert not (tmp_path / "run").exists()


def test_a_binary_task_on_labels_minus_one_says_to_map_them_to_zero(tmp_path):
    """libSVM's -1/+1 labels: the error said to use task: regression."""
    path = tmp_path / "train.libsvm"
    _write(path, "+1 a:1\n-1 b:1\n-1 a:1 b:2\n")
    with pytest.raises(DataError, match=re.escape(
            f"{path}: label column 'label': task 'binary' needs labels in {{0, 1}}, found "
            "[-1.0] (first at data row 2); map the label -1 to 0")):
        load_split([str(path)], [FeatureConfig("features", "multi_hot", "user")], "label")


@pytest.mark.parametrize("data, message", [
    (b"1 3:1\n0 4:caf\xe9\n", "a.libsvm: line 2: not UTF-8 (byte 0xe9); re-encode the file"),
    # The line pyarrow rejects (it holds the delimiter \x1f) is not UTF-8 either: its
    # invalid-row callback could not decode it (Python printed "Exception ignored") and the
    # error named no line.
    (b"1 3:1\n0 4:\xe9\x1f1\n", "a.libsvm: line 2: holds the control character \\x1f"),
])
def test_bytes_that_are_not_utf8_name_the_line_without_noise(tmp_path, monkeypatch, data,
                                                              message):
    unraisable = []
    monkeypatch.setattr("sys.unraisablehook", unraisable.append)
    path = tmp_path / "a.libsvm"
    path.write_bytes(data)
    with pytest.raises(DataError, match=re.escape(message)):
        list(record_batches(str(path)))
    assert not unraisable, [u.exc_value for u in unraisable]
