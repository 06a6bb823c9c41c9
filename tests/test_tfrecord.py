"""TFRecord Examples as input: read back as the same rows, typed from the spec; bad files fail
with the file named."""

import os

import numpy as np
import pytest
import tensorflow as tf

from fm_keras.config import load_experiment
from fm_keras.data import load_split
from fm_keras.errors import DataError
from fm_keras.tfrecord import example_spec, is_tfrecord, read_examples


def _write_examples(path, split, features, label):
    """One Example per row, typed as TFX's ExampleGen writes CSV columns of this spec."""
    with tf.io.TFRecordWriter(path) as writer:
        for i in range(len(split)):
            feature = {}
            for f in features:
                value = split.features[f.name][i]
                feature[f.name] = (tf.train.Feature(float_list=tf.train.FloatList(value=[value]))
                                   if f.kind == "numeric" else tf.train.Feature(
                                       bytes_list=tf.train.BytesList(value=[str(value).encode()])))
            feature[label] = tf.train.Feature(float_list=tf.train.FloatList(
                value=[split.labels[i]]))
            writer.write(tf.train.Example(
                features=tf.train.Features(feature=feature)).SerializeToString())


@pytest.fixture(scope="module")
def examples(small_synth, tmp_path_factory):
    synth_dir, _ = small_synth
    config = load_experiment(os.path.join(synth_dir, "experiment.yaml"))
    csv = load_split([os.path.join(synth_dir, "valid.csv")], config.features, "click")
    out = tmp_path_factory.mktemp("tfr")
    halves = np.array_split(np.arange(len(csv)), 2)
    for i, rows in enumerate(halves):
        _write_examples(str(out / f"part-{i}.tfrecord"), csv.take(rows), config.features, "click")
    return config, csv, str(out)


def test_examples_read_back_as_the_rows(examples):
    config, csv, out = examples
    back = load_split([os.path.join(out, "*.tfrecord")], config.features, "click")
    assert back.files == [os.path.join(out, f"part-{i}.tfrecord") for i in range(2)]
    np.testing.assert_array_equal(back.labels, csv.labels)
    for f in config.features:
        if f.kind == "numeric":  # a missing number travels as NaN
            np.testing.assert_array_equal(back.features[f.name], csv.features[f.name])
        else:
            assert list(back.features[f.name]) == list(csv.features[f.name]), f.name


def test_spec_types_and_missing_defaults(examples):
    config, _, _ = examples
    spec = example_spec(config.features, "click")
    for f in config.features:
        assert spec[f.name].dtype == (tf.float32 if f.kind == "numeric" else tf.string), f.name
    assert spec["click"].dtype == tf.float32
    assert is_tfrecord("a/b.tfrecord") and is_tfrecord("b.tfrecords") and not is_tfrecord("b.csv")


def test_files_that_are_not_examples_of_the_spec_name_the_file(examples, tmp_path):
    config, _, out = examples
    bad = tmp_path / "bad.tfrecord"
    bad.write_bytes(b"not a tfrecord at all")
    with pytest.raises(DataError, match="bad.tfrecord: cannot read as TFRecord Examples"):
        read_examples([str(bad)], config.features, "click")
    with pytest.raises(DataError, match="cannot read as TFRecord Examples"):  # no such label
        read_examples([os.path.join(out, "part-0.tfrecord")], config.features, "clicked")


def test_commands_that_read_only_text_and_parquet_name_a_tfrecord_file(examples, tmp_path,
                                                                       capsys):
    # A new user's trial: `score` and `convert` read a .tfrecord file as CSV and said "not
    # UTF-8 ... re-encode the file as UTF-8, e.g. iconv".
    from fm_keras.cli import main
    from fm_keras.reading import read_header, record_batches

    config, _, out = examples
    path = os.path.join(out, "part-0.tfrecord")
    message = "part-0.tfrecord: a TFRecord file of tf.train.Example rows: train and evaluate"
    with pytest.raises(DataError, match=message):
        read_header(path)  # score, recommend: the kept columns
    with pytest.raises(DataError, match=message):
        next(record_batches(path))  # score, recommend, convert, ExampleGen: the rows
    code = main(["convert", "--config", config.source, "--input", path,
                 "--out", str(tmp_path / "shards")])
    errors = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and errors[-1].startswith("fm-keras: error: ") and message in errors[-1]
    assert not (tmp_path / "shards").exists()
