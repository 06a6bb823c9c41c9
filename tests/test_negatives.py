"""training.negatives: catalog negatives drawn in tf.data, fresh each epoch, never a positive."""

import os

import numpy as np
import pytest

from retrieval_testlib import implicit_experiment
from fm_keras._tf import keras
from fm_keras.config import experiment_from_dict
from fm_keras.data import load_data_split
from fm_keras.errors import ConfigError
from fm_keras.features import fit_features
from fm_keras.model import build_model
from fm_keras.negatives import SampledNegatives

PER = 3


def _setup(data, sampler="uniform"):
    config = experiment_from_dict(implicit_experiment(
        data, task="binary", negatives={"per_positive": PER, "sampler": sampler}),
        base_dir=data)
    train = load_data_split(config.data, "train", config.features, "binary")
    model = build_model(fit_features(config.features, train), config.model, config.training)
    return config, train, model, SampledNegatives(config, model.encoder, train)


def _epoch(negatives, model, train):
    ids, values = model.encoder.encode_numpy(train.features)
    ds = negatives.dataset(ids, values, train.labels, np.ones(len(train), np.float32), 50, 1)
    return [(f["ids"].numpy(), f["values"].numpy(), y.numpy(), w.numpy()) for f, y, w in ds]


def test_each_positive_gets_n_catalog_negatives_with_its_query_features(implicit_data):
    keras.utils.set_random_seed(0)
    config, train, model, negatives = _setup(implicit_data)
    enc = model.encoder
    cat_ids, _ = enc.encode_numpy(negatives.catalog.columns, names=enc.side_names(False))
    query = enc.slot_query_side
    pairs = set(negatives.positive_pairs.tolist())
    seen_weights = []
    for ids, values, y, w in _epoch(negatives, model, train):
        positives = int((y == 1).sum())
        assert len(y) == positives * (1 + PER) and (y[positives:] == 0).all()
        neg = ids[positives:]
        np.testing.assert_array_equal(neg[:, query], np.repeat(ids[:positives][:, query], PER, 0))
        # the item slots of a negative are one catalog item's slots
        rows = {tuple(r) for r in cat_ids.tolist()}
        assert all(tuple(r) in rows for r in neg[:, ~query].tolist())
        seen_weights.append(w[positives:])
    weights = np.concatenate(seen_weights)
    assert set(np.unique(weights)) <= {0.0, 1.0} and weights.mean() > 0.7
    assert len(pairs) > 0


def test_a_sampled_positive_gets_weight_zero(implicit_data):
    keras.utils.set_random_seed(1)
    _, train, model, negatives = _setup(implicit_data)
    ids, values = model.encoder.encode_numpy(train.features)
    n = len(negatives.catalog)
    item_of = {tuple(r): i for i, r in enumerate(model.encoder.encode_numpy(
        negatives.catalog.columns, names=model.encoder.side_names(False))[0].tolist())}
    key_of = {tuple(r): k for r, k in zip(ids[:, model.encoder.slot_query_side].tolist(),
                                          negatives.train_keys)}
    pairs = set(negatives.positive_pairs.tolist())
    checked = 0
    for b_ids, _, y, w in _epoch(negatives, model, train):
        p = int((y == 1).sum())
        for row, weight in zip(b_ids[p:], w[p:]):
            q = model.encoder.slot_query_side
            pair = key_of[tuple(row[q])] * n + item_of[tuple(row[~q])]
            assert weight == (0.0 if pair in pairs else 1.0)
            checked += 1
    assert checked > 100


def test_fresh_negatives_every_epoch(implicit_data):
    keras.utils.set_random_seed(2)
    _, train, model, negatives = _setup(implicit_data)
    ids, values = model.encoder.encode_numpy(train.features)
    ds = negatives.dataset(ids, values, train.labels, np.ones(len(train), np.float32), 10_000, 1)
    first, second = ([f["ids"].numpy() for f, _, _ in ds][0] for _ in range(2))
    assert first.shape == second.shape and not np.array_equal(first, second)


def test_popularity_sampler_weights_are_positives_plus_one(implicit_data):
    _, train, model, uniform = _setup(implicit_data)
    _, _, _, popular = _setup(implicit_data, "popularity")
    ids = popular.catalog.ids.tolist()
    counts = np.bincount([ids.index(i) for i in train.features["item_id"]], minlength=len(ids))
    np.testing.assert_allclose(np.exp(popular.sampling_logits), counts + 1, rtol=1e-5)
    assert np.ptp(uniform.sampling_logits) == 0


def test_validation_negatives_fixed_and_not_positives(implicit_data):
    config, train, model, negatives = _setup(implicit_data)
    valid = load_data_split(config.data, "valid", config.features, "binary")
    a, b = negatives.with_negatives(valid, 5), negatives.with_negatives(valid, 5)
    np.testing.assert_array_equal(a.features["item_id"], b.features["item_id"])
    added = slice(len(valid), None)
    assert (a.labels[added] == 0).all() and len(a) > len(valid) * 2
    own = set(zip(valid.features["user_id"], valid.features["item_id"]))
    assert not own & set(zip(a.features["user_id"][added], a.features["item_id"][added]))
    # item features of a negative come from the catalog
    genre = dict(zip(negatives.catalog.ids, negatives.catalog.columns["genre"]))
    assert all(genre[i] == g for i, g in zip(a.features["item_id"][added],
                                             a.features["genre"][added]))


def test_item_id_must_be_an_item_feature(implicit_data):
    raw = implicit_experiment(implicit_data, task="binary", negatives={"per_positive": 2})
    raw["data"]["item_id"] = "genre_code"
    config = experiment_from_dict(raw, base_dir=implicit_data)
    train = load_data_split(config.data, "train", config.features, "binary")
    model = build_model(fit_features(config.features, train), config.model, config.training)
    with pytest.raises(ConfigError, match="data: item_id: training: negatives needs"):
        SampledNegatives(config, model.encoder, train)


def test_epoch_labels_are_what_an_epoch_trains_on(implicit_data):
    from fm_keras.convergence import base_loss

    _, train, model, negatives = _setup(implicit_data)
    batches = _epoch(negatives, model, train)
    y = np.concatenate([b[2] for b in batches])
    w = np.concatenate([b[3] for b in batches])
    labels, weights = negatives.epoch_labels(train.labels, np.ones(len(train)))
    assert sorted(labels.tolist()) == sorted(y.tolist())
    assert weights.sum() >= w.sum() > 0.8 * weights.sum()  # weight 0: a draw hit a positive
    # An implicit log is all positives: its own base rate would make the warmup never end.
    assert base_loss("binary", train.labels) == 0.0
    assert base_loss("binary", labels, weights) == pytest.approx(
        -(0.25 * np.log(0.25) + 0.75 * np.log(0.75)))  # 1 positive per PER = 3 negatives


def test_binary_training_with_negatives_has_a_validation_auc(implicit_data, tmp_path, capsys):
    from fm_keras.evaluation import evaluate_run
    from fm_keras.training import train

    raw = implicit_experiment(implicit_data, task="binary", epochs=2,
                              negatives={"per_positive": 2})
    record = train(experiment_from_dict(raw, base_dir=implicit_data), str(tmp_path / "run"),
                   verbose=0)
    assert record["metrics"]["valid"]["auc"] > 0.6
    assert os.path.exists(tmp_path / "run" / "run.json")
    # The test split gets its own fixed draw (it was all positives: auc None, observed rate 1).
    test = record["metrics"]["test"]
    assert test["auc"] > 0.6 and test["observed_rate"] == pytest.approx(1 / 3, abs=0.05)
    assert test["negatives"]["per_positive"] == 2 and test["negatives"]["sampler"] == "uniform"
    assert test["negatives"]["seed"] != record["metrics"]["valid"]["negatives"]["seed"]
    assert test["negatives"]["rows"] == test["rows"] - int(test["observed_rate"] * test["rows"])
    # evaluate on the implicit test log itself: one class, said in a warning naming the fix
    capsys.readouterr()
    logged = evaluate_run(str(tmp_path / "run"), os.path.join(implicit_data, "test.csv"))
    assert logged["auc"] is None
    assert "every row has label 1, so AUC is undefined (null) and logloss and ECE measure one " \
           "class; the run was trained with training.negatives (an implicit log): evaluate it " \
           "with 'fm-keras evaluate --items' (Recall@K)" in capsys.readouterr().err


def test_no_test_metrics_without_a_positive_to_draw_for(implicit_data, tmp_path, capsys):
    import shutil

    import pandas as pd

    from fm_keras.training import train

    (tmp_path / "data").mkdir()
    for name in ("train", "valid", "items"):
        shutil.copy(os.path.join(implicit_data, f"{name}.csv"), tmp_path / "data")
    pd.read_csv(os.path.join(implicit_data, "test.csv")).assign(click=0).to_csv(
        tmp_path / "data" / "test.csv", index=False)
    raw = implicit_experiment(str(tmp_path / "data"), task="binary", epochs=1,
                              negatives={"per_positive": 2})
    record = train(experiment_from_dict(raw, base_dir=str(tmp_path / "data")),
                   str(tmp_path / "run"), verbose=0)
    assert "test" not in record["metrics"]
    assert "warning: no test metrics: no sampled negative could be drawn for the test split " \
           "(0 positive rows); evaluate it with 'fm-keras evaluate --items'" in capsys.readouterr().err
