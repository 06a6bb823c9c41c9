"""The simulator: assignment by hash, recall + ranking slates from the exports, clicks from
the planted FM's true probabilities, one event per request, and then a report."""

import json
import os

import numpy as np
import pandas as pd
import pytest

from fm_keras.errors import ConfigError
from fm_keras.experiments.assignment import Assigner
from fm_keras.experiments.config import load_ab_experiment
from fm_keras.experiments.simulate import (ArmRecommender, SimulationSpec, recall_export_for,
                                           simulate)


@pytest.fixture(scope="module")
def ab_file(exports, tmp_path_factory):
    """An A/A experiment: both arms serve ctr version 1 (recall: the brute-force index)."""
    path = tmp_path_factory.mktemp("ab") / "aa.yaml"
    path.write_text(f"""\
name: aa
unit: user_id
salt: sim
base: {exports['base']}
arms:
  - {{name: a, model: ctr, version: 1, weight: 0.5, recall_model: ctr_recall_bf}}
  - {{name: b, model: ctr, version: 1, weight: 0.5, recall_model: ctr_recall_bf}}
""")
    return str(path)


def test_slates_are_the_ranking_models_top_of_the_recalled_items(exports, small_synth):
    recommender = ArmRecommender(exports["ranking"], exports["brute_force"])
    query = {"user_id": np.array(["u1", "u2"], dtype=object),
             "user_segment": np.array(["s1", "s5"], dtype=object),
             "device": np.array(["ios", "web"], dtype=object),
             "hour": np.array(["3", "20"], dtype=object)}
    slates = recommender.slates(query, slate=5, candidates=20)
    assert slates.shape == (2, 5)
    # Reference: score every recalled item for user 0 with the ranking export, one by one.
    recalled = recommender.recall.signatures["serving_default"](
        **{k: np.array([v[0]]).astype(str) for k, v in query.items()})["item_ids"].numpy()[0]
    pos = [recommender.position[b.decode()] for b in recalled]
    rows = {k: np.repeat(np.array([v[0]]).astype(str), len(pos)) for k, v in query.items()}
    rows.update({k: v[pos] for k, v in recommender.item_columns.items()})
    sig = recommender.ranking.signatures["serving_default"]
    prob = sig(**{k: (v.astype(np.float32) if k == "item_price" else v.astype(str))
                  for k, v in rows.items()})["probability"].numpy()
    assert slates[0].tolist() == [pos[i] for i in np.argsort(-prob, kind="stable")[:5]]


def test_simulate_writes_one_event_per_request_by_hashed_arm(ab_file, small_synth, tmp_path):
    synth_dir, _ = small_synth
    experiment = load_ab_experiment(ab_file)
    out = str(tmp_path / "events.parquet")
    summary = simulate(experiment, str(synth_dir), out,
                       SimulationSpec(users=300, sessions=2.0, slate=5, candidates=20, seed=1))
    events = pd.read_parquet(out)
    assert list(events.columns) == ["user_id", "arm", "timestamp", "impressions", "clicks",
                                    "pre_period"]
    assert len(events) == sum(summary["requests"].values()) and summary["users"] == 300
    # A/A: both arms serve the same version, so on the same requests the truth has no lift.
    assert summary["true_lift"] == {"b": pytest.approx(0.0, abs=1e-12)}
    units = events.drop_duplicates("user_id")
    assert (units["arm"].to_numpy() == Assigner(experiment).assign(units["user_id"])).all()
    assert (events["impressions"] == 5).all() and events["clicks"].between(0, 5).all()
    assert events.groupby("user_id")["pre_period"].nunique().max() == 1
    # Clicks come from the planted FM: the click rate of the shown slates is that of good
    # items (above the logs' base rate of ~5%), and far from impossible values.
    ctr = events["clicks"].sum() / events["impressions"].sum()
    assert 0.02 < ctr < 0.5


def test_recall_export_must_come_from_the_arms_ranking_version(exports, ab_file):
    experiment = load_ab_experiment(ab_file)
    arm = experiment.arm("a")
    assert recall_export_for(exports["base"], arm, exports["ranking"]) == exports["brute_force"]
    with pytest.raises(ConfigError, match="no version of .*ctr_recall_bf was indexed from"):
        recall_export_for(exports["base"], arm, os.path.join(exports["base"], "ctr", "9"))


def test_simulate_needs_the_exports_on_disk(small_synth, tmp_path):
    path = tmp_path / "ab.yaml"
    path.write_text("name: x\nunit: user_id\nsalt: s\narms:\n"
                    "  - {name: a, model: ctr, label: one, weight: 0.5}\n"
                    "  - {name: b, model: ctr, label: two, weight: 0.5}\n")
    with pytest.raises(ConfigError, match="the simulator loads each arm's exports"):
        simulate(load_ab_experiment(path), str(small_synth[0]), str(tmp_path / "e.parquet"))
    assert not (tmp_path / "e.parquet").exists()


def test_ab_simulate_command_prints_the_report(ab_file, small_synth, tmp_path, capsys):
    from fm_keras.cli import main

    out = tmp_path / "sim"
    assert main(["ab", "simulate", "--experiment", ab_file, "--data", str(small_synth[0]),
                 "--out", str(out), "--users", "200", "--sessions", "1.5", "--slate", "4",
                 "--candidates", "10", "--cuped"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["simulation"]["users"] == 200 and result["cuped"] is not None
    assert sorted(os.listdir(out)) == ["events.parquet", "report.html"]
    assert result["html"] == str(out / "report.html")
    # A new user's trial: the log line named the temp directory (gone once renamed), not --out.
    assert f"events to {out / 'events.parquet'} in " in captured.err
    assert ".tmp-" not in captured.err


@pytest.mark.parametrize("field", ["sessions", "slate", "days"])
def test_a_nan_spec_value_is_an_error(field):
    with pytest.raises(ConfigError, match=f"--{field} must be >= 1"):  # NaN used to pass
        SimulationSpec(**{field: float("nan")})
