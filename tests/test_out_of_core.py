"""Out-of-core training: the choice, shards that hold exactly the encoded rows, a full run
(same features as in memory, resume, export parity) and nothing half-written on failure."""

import dataclasses
import json
import os

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from fm_keras import out_of_core
from fm_keras.config import load_experiment
from fm_keras.data import load_split
from fm_keras.errors import ConfigError, DataError
from fm_keras.features import FeatureEncoder, fit_features
from fm_keras.training import train


def _config(synth_dir, **data):
    config = load_experiment(os.path.join(synth_dir, "experiment.yaml"))
    training = dataclasses.replace(config.training, epochs=1, batch_size=1000,
                                   steps_per_execution=8, learning_rate=0.02, pos_weight=4.0,
                                   neg_sample_rate=0.5)
    return dataclasses.replace(config, training=training, data=dataclasses.replace(
        config.data, **{"out_of_core": "true", "test": (), **data}))


def test_choice_auto_by_bytes_forced_and_unsupported(small_synth):
    synth_dir, _ = small_synth
    assert out_of_core.choose(_config(synth_dir, out_of_core="auto", out_of_core_mb=0.1))[0]
    ok, why = out_of_core.choose(_config(synth_dir, out_of_core="auto"))
    assert not ok and "<= data.out_of_core_mb 256" in why
    assert not out_of_core.choose(_config(synth_dir, out_of_core="false"))[0]
    ok, why = out_of_core.choose(_config(synth_dir, out_of_core="auto", out_of_core_mb=0.1,
                                         valid=()))
    assert not ok and "needs data.valid" in why
    with pytest.raises(ConfigError, match="out_of_core: it needs data.valid files"):
        out_of_core.choose(_config(synth_dir, valid=()))


def test_choice_auto_takes_a_parquet_files_uncompressed_size(small_synth, tmp_path):
    """Parquet is several times smaller on disk than its rows once read: auto decided by the
    bytes on disk and a Parquet user could run out of memory."""
    synth_dir, _ = small_synth
    path = str(tmp_path / "train.parquet")
    pd.read_csv(os.path.join(synth_dir, "train.csv"), dtype=str).to_parquet(path)
    meta = pq.ParquetFile(path).metadata
    uncompressed = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    on_disk = os.path.getsize(path)
    assert on_disk < uncompressed  # the file this test needs
    threshold = (on_disk + uncompressed) / 2 / 2**20
    ok, why = out_of_core.choose(_config(synth_dir, train=(path,), out_of_core="auto",
                                         out_of_core_mb=threshold))
    assert ok, why
    assert why == (f"training files {uncompressed / 2**20:,.1f} MiB (Parquet: uncompressed size "
                   f"from the file metadata; {on_disk / 2**20:,.1f} MiB on disk) > "
                   f"data.out_of_core_mb {threshold:g}")


def test_shards_hold_exactly_the_encoded_rows(small_synth, tmp_path):
    synth_dir, _ = small_synth
    config = _config(synth_dir, filters=())
    config = dataclasses.replace(config, training=dataclasses.replace(
        config.training, neg_sample_rate=1.0, batch_size=600))  # 600 % 256: records of 200
    fit = out_of_core.fit_pass(config, block_rows=8000)
    split = load_split(config.data.train, config.features, "click")
    assert fit.features == fit_features(config.features, split)
    encoder = FeatureEncoder(fit.features)
    shards = out_of_core.write_shards(config, encoder, str(tmp_path / "s"), fit, block_rows=8000)
    assert shards.manifest["chunk_rows"] == 200 and shards.rows == len(split)
    ids, values = encoder.encode_numpy(split.features)
    got = [(f["ids"].numpy(), f["values"].numpy(), y.numpy(), w.numpy())
           for f, y, w in out_of_core.shard_dataset(shards, config.training, seed=1)]
    assert max(len(g[2]) for g in got) == 600
    got_ids, got_values, got_y, got_w = (np.concatenate(x) for x in zip(*got))
    assert len(got_y) == len(split)  # every row once, the padding dropped

    def rows(i, v, y):  # in a canonical order; values to 4 decimals for the order only
        order = np.lexsort([*np.round(v, 4).T[::-1], y, *i.T[::-1]])
        return i[order], v[order], y[order]

    expected, got_rows = rows(ids, values, split.labels), rows(got_ids, got_values, got_y)
    np.testing.assert_array_equal(got_rows[0], expected[0])
    np.testing.assert_array_equal(got_rows[2], expected[2])
    # log1p's vectorized and scalar kernels differ in the last bits: batches differ here.
    np.testing.assert_allclose(got_rows[1], expected[1], rtol=1e-6)
    np.testing.assert_array_equal(got_w, np.where(got_y > 0.5, 4.0, 1.0))
    np.testing.assert_array_equal(shards.counts, np.bincount(ids[values != 0],
                                                             minlength=encoder.num_ids))
    # The ids looked up with x = 0 (multi-hot padding): with the counted ones, the trained rows.
    np.testing.assert_array_equal(shards.zero_value_ids, np.unique(ids[values == 0]))
    assert len(shards.zero_value_ids)
    assert shards.labels.tolist() == [0.0, 1.0]
    assert shards.label_counts.tolist() == np.bincount(split.labels.astype(int)).tolist()
    again = out_of_core.write_shards(config, encoder, str(tmp_path / "s"), fit)
    assert again.manifest == shards.manifest  # complete shards are reused
    os.remove(tmp_path / "s" / out_of_core.ZERO_VALUE_IDS)  # shards of an older version
    assert out_of_core.Shards.open(str(tmp_path / "s")).zero_value_ids is None


def test_resume_takes_pass_1_from_complete_shards_of_unchanged_files(small_synth, tmp_path,
                                                                      monkeypatch, capsys):
    """`train --resume` read the whole training CSV again (pass 1) before it reused the
    shards; with the shards complete and the files unchanged it must not read them."""
    synth_dir, _ = small_synth
    train_csv = tmp_path / "train.csv"
    train_csv.write_bytes((synth_dir / "train.csv").read_bytes())
    config = _config(synth_dir, train=(str(train_csv),))
    run_dir = str(tmp_path / "run")
    fit = out_of_core.fit_pass(config, block_rows=8000)
    assert out_of_core.resumed_fit(config, run_dir, fit.features) is None  # no shards yet
    directory = out_of_core.shard_directory(config, run_dir, fit)
    assert directory == os.path.join(run_dir, "shards")
    out_of_core.write_shards(config, FeatureEncoder(fit.features), directory, fit,
                             block_rows=8000)
    capsys.readouterr()

    def read_again(*args, **kwargs):
        raise AssertionError("the training files were read again")

    monkeypatch.setattr(out_of_core, "iter_blocks", read_again)
    again = out_of_core.resumed_fit(config, run_dir, fit.features)
    assert again is not None
    # pass 1's counts, not the shards' (negatives were downsampled at rate 0.5 there)
    assert (again.features, again.rows, again.rows_read, again.dropped, again.files) == \
        (fit.features, fit.rows, fit.rows_read, fit.dropped, fit.files)
    np.testing.assert_array_equal(again.labels, fit.labels)
    np.testing.assert_array_equal(again.label_counts, fit.label_counts)
    assert f"reusing encoded shards {directory}: the training files are unchanged (size, " \
        "mtime): pass 1 over 1 file(s) skipped" in capsys.readouterr().err

    seed = config.training.seed
    other = dataclasses.replace(config, training=dataclasses.replace(config.training,
                                                                     seed=seed + 1))
    assert out_of_core.resumed_fit(other, run_dir, fit.features) is None
    assert f"seed was {seed} when they were written, now {seed + 1}" in capsys.readouterr().err
    stat = os.stat(train_csv)
    os.utime(train_csv, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file changed
    assert out_of_core.resumed_fit(config, run_dir, fit.features) is None
    assert (f"{train_csv} changed since they were written (size or mtime); reading the "
            "training files again") in capsys.readouterr().err
    manifest = json.loads((tmp_path / "run" / "shards" / "shards.json").read_text())
    del manifest["input"]  # shards of an older version
    (tmp_path / "run" / "shards" / "shards.json").write_text(json.dumps(manifest))
    os.utime(train_csv, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert out_of_core.resumed_fit(config, run_dir, fit.features) is None
    assert "record no fingerprint of their input" in capsys.readouterr().err


def test_a_run_trains_resumes_and_exports(small_synth, tmp_path, monkeypatch):
    from fm_keras.export import export_run

    synth_dir, _ = small_synth
    config = _config(synth_dir, shard_dir=str(tmp_path / "cache"))
    run_dir = str(tmp_path / "run")
    record = train(config, run_dir, verbose=0)
    assert record["out_of_core"]["enabled"] and record["out_of_core"]["reason"] == \
        "data.out_of_core is true"
    assert record["out_of_core"]["shards"].startswith(str(tmp_path / "cache"))
    in_memory = fit_features(config.features, load_split(
        config.data.train, config.features, "click", config.data.filters))
    with open(os.path.join(run_dir, "features.json")) as f:
        assert json.load(f) == json.loads(json.dumps([x.to_dict() for x in in_memory]))
    assert record["rows"]["train"] < record["rows"]["train_read"] * 0.6  # negatives halved
    assert record["logit_correction"] == pytest.approx(np.log(0.5) - np.log(4.0))
    assert record["metrics"]["valid"]["auc"] > 0.55
    # Resume an unfinished run for a second epoch: the cached shards are reused, and the
    # training files are not read again (pass 1 comes from the shards' manifest).
    os.remove(os.path.join(run_dir, "run.json"))

    def fit_pass(*args, **kwargs):
        raise AssertionError("pass 1 read the training files again")

    monkeypatch.setattr(out_of_core, "fit_pass", fit_pass)
    more = dataclasses.replace(config, training=dataclasses.replace(config.training, epochs=2))
    record = train(more, run_dir, resume=True, verbose=0)
    assert record["epochs_run"] == 2 and record["out_of_core"]["enabled"]
    version = export_run(run_dir, "ctr", base=str(tmp_path / "models"), parity_rows=500)
    with open(os.path.join(version, "assets.extra", "fm_keras.json")) as f:
        assert json.load(f)["parity"]["max_abs_diff"] <= 1e-4


def test_bad_input_or_a_failed_pass_leaves_nothing(small_synth, tmp_path, monkeypatch):
    synth_dir, _ = small_synth
    frame = pd.read_csv(os.path.join(synth_dir, "train.csv"), dtype=str)
    last = int(np.flatnonzero(frame["is_cached"] == "0")[-1])  # a row the filter keeps
    frame.loc[last, "item_price"] = "cheap"
    frame.to_csv(tmp_path / "bad.csv", index=False)
    run_dir = tmp_path / "run"
    with pytest.raises(DataError, match=r"bad.csv: column 'item_price' \(numeric feature\): "
                                        rf"non-numeric value 'cheap' at data row {last + 1}"):
        train(_config(synth_dir, train=(str(tmp_path / "bad.csv"),)), str(run_dir), verbose=0)
    assert not run_dir.exists()

    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) > 1:
            raise OSError("No space left on device")
        return real(*args)

    real = out_of_core._records
    monkeypatch.setattr(out_of_core, "_records", failing)
    monkeypatch.setattr(out_of_core, "NUM_FILES", 2)
    config = _config(synth_dir)
    fit = out_of_core.fit_pass(config, block_rows=4000)
    with pytest.raises(OSError, match="No space"):
        out_of_core.write_shards(config, FeatureEncoder(fit.features), str(run_dir / "shards"),
                                 fit, block_rows=4000)
    assert os.listdir(run_dir) == []  # no shards, no temp directory


def test_a_cluster_reader_takes_its_files_in_whole_batches_of_static_shape(small_synth, tmp_path):
    """Regression: synchronous workers all-gather sparse gradients; a batch shortened by a
    record's padding on one worker only aborted the collective ("Shape mismatch")."""
    synth_dir, _ = small_synth
    config = _config(synth_dir, filters=())
    config = dataclasses.replace(config, training=dataclasses.replace(
        config.training, neg_sample_rate=1.0, batch_size=600))  # records of 200 rows
    fit = out_of_core.fit_pass(config)
    shards = out_of_core.write_shards(config, FeatureEncoder(fit.features), str(tmp_path / "s"),
                                      fit, num_files=3)
    assert [f["rows"] % 200 for f in shards.manifest["files"]] != [0, 0, 0]  # padded records
    for worker, files in ((0, [0, 2]), (1, [1])):
        data = out_of_core.shard_dataset(shards, config.training, seed=1, batch_size=400,
                                         shard_index=worker, num_shards=2, repeat=True)
        assert data.element_spec[0]["ids"].shape == (400, shards.manifest["slots"])
        rows = sum(shards.manifest["files"][i]["rows"] for i in files)
        labels = np.concatenate([y.numpy() for _, y, _ in data.take(3 * rows // 400 + 1)])
        assert not np.isnan(labels).any() and len(labels) > 3 * rows  # endless, no padding
    with pytest.raises(DataError, match="reader 3 has no rows.*--shards 4"):
        out_of_core.shard_dataset(shards, config.training, batch_size=200, shard_index=3,
                                  num_shards=4, repeat=True)
    with pytest.raises(ConfigError, match="300 rows per batch per worker is not a multiple of "
                                          "the 200 rows per record"):
        out_of_core.shard_dataset(shards, config.training, batch_size=300, num_shards=2)


def test_compiled_steps_train_from_shards_as_keras_steps_do(small_synth, tmp_path):
    # Shard batches hold up to batch_size rows (fewer where a record has padding): the
    # compiled steps pad them and train the same run.
    synth_dir, _ = small_synth
    records = {}
    for mode in ("always", "never"):
        config = _config(synth_dir, shard_dir=str(tmp_path / "cache"))
        config = dataclasses.replace(config, training=dataclasses.replace(
            config.training, epochs=2, compiled_steps=mode))
        records[mode] = train(config, str(tmp_path / mode), verbose=0)
    assert records["always"]["compiled_steps"]["enabled"]
    assert not records["never"]["compiled_steps"]["enabled"]
    for a, b in zip(records["always"]["history"], records["never"]["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["val_auc"] == pytest.approx(b["val_auc"], abs=1e-4)
