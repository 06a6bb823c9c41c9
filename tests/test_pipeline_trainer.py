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


def test_one_class_training_split_names_the_span_file_and_column(pipeline_logs, tmp_path):
    """Regression: the error named ExampleGen's internal ``train.parquet``; the user needs
    their own input file (span) and the label column."""
    import shutil

    import pandas as pd

    from fm_keras.errors import DataError
    from fm_keras.pipeline.runner import run_pipeline
    from pipeline_testlib import write_pipeline_yaml

    logs = tmp_path / "logs"
    os.makedirs(logs / "span-1")
    for name in ("items.csv", "features.yaml"):
        shutil.copy(pipeline_logs / name, logs / name)
    (source,) = sorted((pipeline_logs / "span-1").iterdir())
    frame = pd.read_csv(source, dtype=str, keep_default_na=False)
    frame["click"] = "0"  # no click in the span: the training split has one class
    span_file = logs / "span-1" / source.name
    frame.to_csv(span_file, index=False)
    path = write_pipeline_yaml(tmp_path / "p.yaml", logs, tmp_path / "root",
                               tmp_path / "models")
    with pytest.raises(DataError) as raised:
        run_pipeline(load_pipeline(path), span=1)
    message = str(raised.value)
    assert message.startswith(f"{span_file}: label column 'click': ")
    assert "span 1" in message and "has label 0" in message and "train.parquet" not in message
    assert "\n" not in message
