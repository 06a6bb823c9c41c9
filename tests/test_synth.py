"""The synthetic set: files, rates, oracle."""

import json

import numpy as np
import pandas as pd
import pytest

from fm_keras.config import load_experiment
from fm_keras.errors import ConfigError
from fm_keras.synth import PlantedFM, SynthSpec, generate


def test_files_rates_and_oracle(small_synth):
    out, oracle = small_synth
    train = pd.read_csv(out / "train.csv")
    assert {p.name for p in out.iterdir()} >= {"train.csv", "valid.csv", "test.csv", "items.csv",
                                               "features.yaml", "experiment.yaml", "oracle.json"}
    assert len(train) == 16_000
    clean = train[train.is_cached == 0]
    assert 0.03 < clean.click.mean() < 0.07                 # roughly 5% positives
    assert 0.10 < train.is_cached.mean() < 0.20
    assert train.ts.is_monotonic_increasing
    assert train.item_tags.str.contains("|", regex=False).any()
    assert json.loads((out / "oracle.json").read_text())["auc"] == oracle["auc"]
    assert 0.7 < oracle["auc"] < 0.95
    items = pd.read_csv(out / "items.csv")
    assert items.item_id.is_unique and set(train.item_id) <= set(items.item_id)
    config = load_experiment(out / "experiment.yaml")        # the written config is valid
    assert config.data.filters[0].column == "is_cached"


def test_planted_fm_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    truth = PlantedFM(SynthSpec(users=5, items=5, segments=2, categories=2, tags=3), rng)
    rows = {"user_id": np.array([1]), "user_segment": np.array([0]), "item_id": np.array([2]),
            "item_category": np.array([1]), "device": np.array([0]), "hour": np.array([3])}
    tag_ids, tag_w, price = np.array([[0, 2]]), np.array([[0.5, 0.5]]), np.array([0.7])
    slots = [(n, rows[n][0], 1.0) for n in rows] + [("item_tags", 0, 0.5), ("item_tags", 2, 0.5),
                                                     ("item_price", 0, 0.7)]
    expected = sum(truth.params[n][0][i] * x for n, i, x in slots)
    for a in range(len(slots)):
        for b in range(a + 1, len(slots)):
            (na, ia, xa), (nb, ib, xb) = slots[a], slots[b]
            expected += truth.params[na][1][ia] @ truth.params[nb][1][ib] * xa * xb
    got = truth.logit(rows, tag_ids, tag_w, price)[0]
    assert abs(got - expected) < 1e-9


def test_too_few_rows_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="--rows must be at least 1000, got 10"):
        generate(str(tmp_path / "s"), rows=10)
    assert not (tmp_path / "s").exists()


def test_load_world_gives_the_true_probabilities_of_the_written_rows(small_synth, tmp_path):
    from fm_keras.evaluation import binary_metrics
    from fm_keras.synth import load_world

    synth_dir, oracle = small_synth
    world = load_world(str(synth_dir))
    frame = pd.concat([pd.read_csv(synth_dir / f"{s}.csv") for s in ("train", "valid", "test")])
    frame = frame[frame["is_cached"] == 0]
    prob = world.click_probability(
        frame["user_id"].str[1:].astype(int).to_numpy(),
        frame["item_id"].str[1:].astype(int).to_numpy(),
        frame["device"].map({d: i for i, d in enumerate(world.DEVICES)}).to_numpy(),
        frame["hour"].to_numpy())
    # The replayed bias puts the mean at the spec's target rate, as when the data was drawn,
    # and the labels agree with it within sampling error.
    assert prob.mean() == pytest.approx(world.spec.target_rate, abs=1e-3)
    assert frame["click"].mean() == pytest.approx(prob.mean(), abs=4 * np.sqrt(0.05 / len(prob)))
    test = pd.read_csv(synth_dir / "test.csv")
    test_prob = prob[-int((test["is_cached"] == 0).sum()):]
    assert binary_metrics(test[test["is_cached"] == 0]["click"].to_numpy(),
                          test_prob)["auc"] == pytest.approx(oracle["auc"], abs=1e-9)
    with pytest.raises(ConfigError, match="no oracle.json"):
        load_world(str(tmp_path))


def test_large_sets_are_written_block_by_block(tmp_path, monkeypatch):
    from fm_keras import synth
    from fm_keras.evaluation import binary_metrics
    from fm_keras.synth import load_world

    monkeypatch.setattr(synth, "BLOCK_ROWS", 3_000)  # 10,000 rows: blocks of 3k, 3k, 3k, 1k
    oracle = generate(str(tmp_path), rows=10_000, seed=5)
    splits = [pd.read_csv(tmp_path / f"{s}.csv") for s in ("train", "valid", "test")]
    assert [len(s) for s in splits] == [8_000, 1_000, 1_000]  # one header, rows appended
    frame = pd.concat(splits)
    assert frame.ts.is_monotonic_increasing  # each block in its own time window
    # Every block keeps the first block's bias: the clean rows click near the target rate,
    # and the world rebuilt from oracle.json gives the written test rows' probabilities.
    world = load_world(str(tmp_path))
    clean = frame[frame.is_cached == 0]
    prob = world.click_probability(
        clean["user_id"].str[1:].astype(int).to_numpy(),
        clean["item_id"].str[1:].astype(int).to_numpy(),
        clean["device"].map({d: i for i, d in enumerate(world.DEVICES)}).to_numpy(),
        clean["hour"].to_numpy())
    assert clean.click.mean() == pytest.approx(0.05, abs=0.015)
    test = splits[2][splits[2].is_cached == 0]
    assert binary_metrics(test.click.to_numpy(), prob[-len(test):])["auc"] == \
        pytest.approx(oracle["auc"], abs=1e-9)
