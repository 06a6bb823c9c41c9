"""fm-keras convert: the encoded shard directory, checked against the experiment that trains from
it; one machine trains from it out of core (a cluster: tests/test_distributed.py)."""

import dataclasses
import json
import os

import pytest

from fm_keras.config import load_experiment
from fm_keras.convert import converted_shards, convert
from fm_keras.data import load_split
from fm_keras.errors import ConfigError, DataError
from fm_keras.features import fit_features
from fm_keras.out_of_core import MANIFEST


def _config(synth_dir, **training):
    config = load_experiment(os.path.join(synth_dir, "experiment.yaml"))
    return dataclasses.replace(config, training=dataclasses.replace(
        config.training, **{"epochs": 1, "batch_size": 1000, "steps_per_execution": 8,
                            "learning_rate": 0.02, **training}), data=dataclasses.replace(
        config.data, test=()))


@pytest.fixture(scope="module")
def converted(small_synth, tmp_path_factory):
    synth_dir, _ = small_synth
    config = _config(synth_dir)
    out = str(tmp_path_factory.mktemp("convert") / "shards")
    manifest = convert(config, [os.path.join(synth_dir, "train.csv")], out, shards=3)
    trains = dataclasses.replace(config, data=dataclasses.replace(
        config.data, train=(os.path.join(out, MANIFEST),)))
    return config, trains, out, manifest


def test_shards_hold_the_filtered_rows_and_the_fitted_features(converted, small_synth):
    config, _, out, manifest = converted
    csv = load_split([os.path.join(small_synth[0], "train.csv")], config.features,
                     config.data.label, config.data.filters)
    assert sorted(f for f in os.listdir(out) if f.endswith(".bin")) == [
        f"part-0000{i}-of-00003.bin" for i in range(3)]
    assert manifest["rows"] == len(csv) == sum(f["rows"] for f in manifest["files"])
    assert max(f["rows"] for f in manifest["files"]) - min(f["rows"] for f in manifest["files"]) \
        <= 3 * manifest["chunk_rows"]  # every block spread over all files
    assert manifest["dropped"] == csv.dropped and csv.dropped["cached_exposures"] > 0
    assert manifest["rows_read"] == csv.rows_read
    assert (manifest["label"], manifest["task"], manifest["neg_sample_rate"]) == \
        ("click", "binary", 1.0)
    with open(os.path.join(out, "features.json")) as f:
        stored = json.load(f)
    assert stored == json.loads(json.dumps([x.to_dict() for x in fit_features(
        config.features, csv)]))


def test_the_experiment_must_match_what_was_converted(converted, tmp_path):
    config, trains, out, _ = converted
    assert converted_shards(config) is None  # CSV training files: nothing converted
    assert converted_shards(trains).rows == converted[3]["rows"]
    other = tuple(dataclasses.replace(f, l2=1.0) if f.name == "item_category" else f
                  for f in trains.features)
    with pytest.raises(ConfigError, match="first: 'item_category'.*convert again"):
        converted_shards(dataclasses.replace(trains, features=other))
    with pytest.raises(ConfigError, match=r"neg_sample_rate: 0\.5, but .* converted with 1\.0"):
        converted_shards(dataclasses.replace(trains, training=dataclasses.replace(
            trains.training, neg_sample_rate=0.5)))
    with pytest.raises(ConfigError, match="needs validation files"):
        converted_shards(dataclasses.replace(trains, data=dataclasses.replace(
            trains.data, valid=())))
    with pytest.raises(ConfigError, match=f"is a shard directory; name its manifest: .*{MANIFEST}"):
        converted_shards(dataclasses.replace(trains, data=dataclasses.replace(
            trains.data, train=(out,))))


def test_one_machine_trains_from_the_converted_shards(converted, tmp_path):
    from fm_keras.training import train

    _, trains, out, manifest = converted
    record = train(trains, str(tmp_path / "run"), verbose=0)
    assert record["out_of_core"]["enabled"] and record["out_of_core"]["shards"] == out
    assert "shard directory of 'fm-keras convert'" in record["out_of_core"]["reason"]
    assert record["rows"]["train"] == manifest["rows"]
    assert record["rows"]["dropped"] == manifest["dropped"]
    assert record["metrics"]["valid"]["auc"] > 0.55
    assert not os.path.exists(tmp_path / "run" / "shards")  # read in place, not copied
    # A batch size the records do not divide: one line naming the experiment file and the fix
    odd = manifest["chunk_rows"] + 1
    with pytest.raises(ConfigError, match=rf"^{trains.source}: training: batch_size: {odd} rows "
                                          r"per batch is not a multiple of the \d+ rows per "
                                          r"record .*write the shards again"):
        train(dataclasses.replace(trains, training=dataclasses.replace(
            trains.training, batch_size=odd)), str(tmp_path / "odd"), verbose=0)
    assert not os.path.exists(tmp_path / "odd")
    with open(tmp_path / "run" / "features.json") as f, open(os.path.join(out, "features.json")) as g:
        assert json.load(f) == json.load(g)


def test_convert_refuses_a_used_directory_bad_shards_and_retrieval(converted, small_synth,
                                                                   tmp_path):
    config, _, out, _ = converted
    train_csv = os.path.join(small_synth[0], "train.csv")
    with pytest.raises(DataError, match="not empty"):
        convert(config, [train_csv], out, shards=2)
    with pytest.raises(DataError, match="more than the"):
        convert(config, [train_csv], str(tmp_path / "x"), shards=10**7)
    for bad in (0, True, "2"):
        with pytest.raises(DataError, match="positive number"):
            convert(config, [train_csv], str(tmp_path / "y"), shards=bad)
    retrieval = dataclasses.replace(
        config, model=dataclasses.replace(config.model, task="retrieval"),
        data=dataclasses.replace(config.data, items=os.path.join(small_synth[0], "items.csv")))
    with pytest.raises(ConfigError, match="trains in memory"):
        convert(retrieval, [train_csv], str(tmp_path / "z"), shards=2)
    assert not any(os.path.exists(tmp_path / d) for d in "xyz")
