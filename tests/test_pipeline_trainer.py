"""Trainer: the experiment it runs, and warm starts only from a compatible run."""

import dataclasses
import os

import pytest

from fm_keras.errors import RunError
from fm_keras.pipeline.config import load_pipeline
from fm_keras.pipeline.trainer import experiment
from pipeline_testlib import last_examples


def test_experiment_reads_the_examples_without_filters(pipeline_first_run):
    path, _ = pipeline_first_run
    config = load_pipeline(path)
    exp = experiment(config, "/examples")
    assert exp.data.train == ("/examples/train.parquet",) and exp.data.filters == ()
    assert exp.features == config.features and exp.training == config.training


def test_warm_start_needs_the_same_feature_spec(pipeline_first_run, tmp_path):
    from fm_keras.pipeline.metadata import MetadataStore
    from fm_keras.training import train

    path, _ = pipeline_first_run
    config = load_pipeline(path)
    store = MetadataStore(os.path.join(config.root, "metadata.sqlite"))
    try:
        model, examples = store.artifacts("Model")[-1], store.artifacts("Examples")[-1]
    finally:
        store.close()
    changed = dataclasses.replace(config, features=config.features[:-1])
    with pytest.raises(RunError, match="its feature spec differs"):
        train(experiment(changed, examples.uri), str(tmp_path / "run"), verbose=0,
              warm_start=model.properties["run_dir"])
    assert not os.path.exists(tmp_path / "run" / "run.json")


def test_trainer_tunes_first_under_a_budget(pipeline_first_run, tmp_path):
    """trainer: {tune: {trials: 2}}: two trials (the first: the pipeline's own settings),
    the candidate exported from the best trial's run."""
    from fm_keras.pipeline.config import TrainerConfig, TuneConfig
    from fm_keras.pipeline.trainer import run_trainer

    path, _ = pipeline_first_run
    config = load_pipeline(path)
    examples = last_examples(config)
    config = dataclasses.replace(
        config, trainer=TrainerConfig(tune=TuneConfig(trials=2, seed=1)),
        training=dataclasses.replace(config.training, epochs=2))
    record = run_trainer(config, examples.uri, str(tmp_path))
    assert record["tune"]["trials"] == {"complete": 2}
    assert record["run_dir"] == record["tune"]["best"]["run"]
    assert sorted(os.listdir(tmp_path / "tune" / "trials")) == ["trial-0", "trial-1"]
    assert os.path.exists(tmp_path / "candidate" / "1" / "saved_model.pb")
    assert record["metrics"]["valid"]["auc"] > 0.55
