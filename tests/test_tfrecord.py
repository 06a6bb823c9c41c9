"""fm-keras convert: TFRecord shards that read back as the same rows, typed from the spec."""

import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from fm_keras.config import load_experiment
from fm_keras.data import load_split
from fm_keras.errors import DataError
from fm_keras.features import FittedFeature, fit_features
from fm_keras.model import build_model
from fm_keras.tfrecord import convert, read_split, training_dataset


@pytest.fixture(scope="module")
def converted(small_synth, tmp_path_factory):
    synth_dir, _ = small_synth
    config = load_experiment(os.path.join(synth_dir, "experiment.yaml"))
    out = str(tmp_path_factory.mktemp("tfr") / "shards")
    manifest = convert(config, [os.path.join(synth_dir, "train.csv")], out, shards=3)
    return config, out, manifest


def test_shards_read_back_as_the_filtered_rows(converted, small_synth):
    config, out, manifest = converted
    csv = load_split([os.path.join(small_synth[0], "train.csv")], config.features,
                     config.data.label, config.data.filters)
    files = sorted(os.path.join(out, f) for f in os.listdir(out) if f.endswith(".tfrecord"))
    assert [os.path.basename(f) for f in files] == [
        f"part-0000{i}-of-00003.tfrecord" for i in range(3)]
    assert manifest["rows"] == len(csv) == sum(s["rows"] for s in manifest["shards"])
    assert manifest["dropped"] == csv.dropped and csv.dropped["cached_exposures"] > 0
    back = load_split([os.path.join(out, "*.tfrecord")], config.features, config.data.label)
    np.testing.assert_array_equal(back.labels, csv.labels)
    for f in config.features:
        if f.kind == "numeric":
            np.testing.assert_array_equal(back.features[f.name], csv.features[f.name])
        else:
            assert list(back.features[f.name]) == list(csv.features[f.name]), f.name


def test_examples_are_typed_from_the_feature_spec(converted):
    config, out, _ = converted
    record = next(iter(tf.data.TFRecordDataset(os.path.join(out, "part-00000-of-00003.tfrecord"))))
    example = tf.train.Example.FromString(record.numpy()).features.feature
    for f in config.features:
        assert example[f.name].WhichOneof("kind") == (
            "float_list" if f.kind == "numeric" else "bytes_list"), f.name
    assert example["click"].WhichOneof("kind") == "float_list"
    assert "is_cached" not in example  # filters were applied, their columns are not needed


def test_fitted_features_travel_with_the_shards(converted):
    config, out, _ = converted
    with open(os.path.join(out, "features.json")) as f:
        stored = [FittedFeature.from_dict(d) for d in json.load(f)]
    refit = fit_features(config.features, read_split(
        [os.path.join(out, n) for n in sorted(os.listdir(out)) if n.endswith(".tfrecord")],
        config.features, config.data.label))
    assert tuple(stored) == refit


def test_training_dataset_shards_files_per_worker_and_weights_positives(converted):
    config, out, manifest = converted
    files = sorted(os.path.join(out, f) for f in os.listdir(out) if f.endswith(".tfrecord"))
    with open(os.path.join(out, "features.json")) as f:
        features = [FittedFeature.from_dict(d) for d in json.load(f)]
    model = build_model(features, config.model, config.training)
    training = dataclasses.replace(config.training, pos_weight=4.0)
    seen = []
    for worker in range(2):
        data = training_dataset(files, model.encoder, "click", training, 256,
                                shard_index=worker, num_shards=2, seed=1)
        slots, labels, weights = next(iter(data))
        assert slots["ids"].shape == (256, model.encoder.num_slots)
        np.testing.assert_array_equal(weights.numpy(), np.where(labels.numpy() > 0.5, 4.0, 1.0))
        seen.append(files[worker::2])
    assert seen == [files[0::2], files[1::2]]
    with pytest.raises(DataError, match="convert with --shards >= 4"):
        training_dataset(files, model.encoder, "click", training, 256, shard_index=3,
                         num_shards=4)


def test_convert_refuses_a_used_directory_and_too_many_shards(converted, small_synth, tmp_path):
    config, out, _ = converted
    train_csv = os.path.join(small_synth[0], "train.csv")
    with pytest.raises(DataError, match="not empty"):
        convert(config, [train_csv], out, shards=2)
    with pytest.raises(DataError, match="more than the"):
        convert(config, [train_csv], str(tmp_path / "x"), shards=10**7)
    with pytest.raises(DataError, match="positive number"):
        convert(config, [train_csv], str(tmp_path / "y"), shards=0)
