"""Interaction logs joined to the catalog: label <= 0 dropped, unknown items warned, query keys."""

import os

import numpy as np
import pandas as pd
import pytest

from retrieval_testlib import implicit_experiment, write_implicit
from fm_keras.config import experiment_from_dict
from fm_keras.data import Split
from fm_keras.errors import DataError
from fm_keras.interactions import (ITEM_INDEX, WEIGHT, item_counts, load_catalog,
                                   load_interactions, query_keys)


@pytest.fixture()
def data(tmp_path):
    return write_implicit(str(tmp_path / "d"), users=20, items=10, per_user=4)


def _config(data):
    return experiment_from_dict(implicit_experiment(data), base_dir=data)


def test_item_features_come_from_the_catalog_and_label_zero_rows_are_dropped(data):
    log = pd.read_csv(os.path.join(data, "train.csv"))
    log.loc[:2, "click"] = 0
    log.drop(columns=["genre"]).to_csv(os.path.join(data, "train.csv"), index=False)
    config = _config(data)
    catalog = load_catalog(os.path.join(data, "items.csv"), config.features, "item_id")
    split = load_interactions(config.data.train, config, catalog)
    assert split.dropped["label<=0"] == 3 and len(split) == len(log) - 3
    genre = dict(zip(catalog.ids, catalog.columns["genre"]))
    assert [genre[i] for i in split.features["item_id"]] == list(split.features["genre"])
    np.testing.assert_array_equal(catalog.ids[split.passthrough[ITEM_INDEX]],
                                  split.features["item_id"])


def test_weight_column_is_read_and_checked_per_row(data):
    path = os.path.join(data, "train.csv")
    log = pd.read_csv(path)
    log["recency"] = 0.5 ** (np.arange(len(log)) / 10.0)
    log.loc[0, "click"] = 0  # dropped with its weight
    log.to_csv(path, index=False)
    raw = implicit_experiment(data)
    raw["data"]["weight"] = "recency"
    config = experiment_from_dict(raw, base_dir=data)
    catalog = load_catalog(os.path.join(data, "items.csv"), config.features, "item_id")
    split = load_interactions(config.data.train, config, catalog)
    np.testing.assert_allclose(split.passthrough[WEIGHT], log["recency"][1:], rtol=1e-6)
    assert split.passthrough[WEIGHT].dtype == np.float32 and "recency" not in split.features
    for bad in ("-1", "", "inf", "often"):
        log["recency"] = log["recency"].astype(object)
        log.loc[3, "recency"] = bad
        log.to_csv(path, index=False)
        with pytest.raises(DataError, match=r"train.csv: column 'recency' \(data: weight\): .*"
                                            "data row 4"):
            load_interactions(config.data.train, config, catalog)


def test_catalog_missing_training_ids_warns_once_with_the_count(data, capsys):
    items = pd.read_csv(os.path.join(data, "items.csv"))
    items[~items["item_id"].isin(["i0", "i1"])].to_csv(os.path.join(data, "items.csv"),
                                                       index=False)
    config = _config(data)
    catalog = load_catalog(os.path.join(data, "items.csv"), config.features, "item_id")
    split = load_interactions(config.data.train, config, catalog)
    warning = [line for line in capsys.readouterr().err.splitlines()
               if "not in the catalog" in line]
    train = pd.read_csv(os.path.join(data, "train.csv"))
    gone = train["item_id"].isin(["i0", "i1"])
    assert len(warning) == 1 and warning[0].startswith("fm-keras: warning: ")
    assert f"{train.loc[gone, 'item_id'].nunique()} item ids ({int(gone.sum())} rows)" \
        in warning[0]
    assert split.dropped["not_in_catalog"] == int(gone.sum()) and len(split) == int((~gone).sum())


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_catalog_empty_item_id_names_its_data_row(data, suffix):
    items = pd.read_csv(os.path.join(data, "items.csv"), dtype=str)
    items.loc[2, "item_id"] = ""
    path = os.path.join(data, f"items.{suffix}")
    items.to_csv(path, index=False) if suffix == "csv" else items.to_parquet(path, index=False)
    with pytest.raises(DataError, match=f"items.{suffix}: column 'item_id': empty item id at "
                                        "data row 3; every item needs one"):
        load_catalog(path, _config(data).features, "item_id")


def test_no_positives_is_a_data_error(data):
    path = os.path.join(data, "train.csv")
    pd.read_csv(path).assign(click=0).to_csv(path, index=False)
    config = _config(data)
    catalog = load_catalog(os.path.join(data, "items.csv"), config.features, "item_id")
    with pytest.raises(DataError, match="train.csv: no positive interactions"):
        load_interactions(config.data.train, config, catalog)
    every = load_interactions(config.data.train, config, catalog, use_label=False)
    assert len(every) == len(pd.read_csv(path))


def test_query_keys_match_across_splits():
    a = Split({"u": np.array(["x", "y", "x"], object), "h": np.array([1.0, 2.0, np.nan])}, None, 3)
    b = Split({"u": np.array(["y", "x"], object), "h": np.array([2.0, np.nan])}, None, 2)
    ka, kb = query_keys([a, b], ["u", "h"])
    assert ka[0] != ka[2] and kb[0] == ka[1] and kb[1] == ka[2]


def test_item_counts():
    split = Split({"u": np.array(["a"] * 4, object)}, None, 4,
                  passthrough={ITEM_INDEX: np.array([2, 0, 2, 2])})
    np.testing.assert_array_equal(item_counts(split, 4), [1, 0, 3, 0])
