"""The run directory's contract without training: which directories may receive a run, and
what `load_run` refuses (a finished run's round trip: tests/test_training.py)."""

import dataclasses
import json
import os

import pytest

from fm_keras import hugepages
from fm_keras.errors import RunError
from fm_keras.runs import check_run_dir, library_versions, load_run


def test_a_run_dir_with_other_files_is_refused_without_suggesting_resume(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="is not empty and holds no fm-keras run; choose a new"):
        check_run_dir(str(tmp_path), resume=False)
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_finished_and_unfinished_runs(tmp_path):
    check_run_dir(str(tmp_path / "new"), resume=False)  # a new directory is fine
    check_run_dir(str(tmp_path), resume=False)  # so is an empty one
    (tmp_path / "experiment.json").write_text("{}")
    with pytest.raises(RunError, match="unfinished run; pass --resume"):
        check_run_dir(str(tmp_path), resume=False)
    check_run_dir(str(tmp_path), resume=True)
    (tmp_path / "run.json").write_text("{}")
    for resume in (False, True):
        with pytest.raises(RunError, match="holds a finished run"):
            check_run_dir(str(tmp_path), resume=resume)


def test_load_run_refuses_what_is_not_a_finished_run(tmp_path):
    with pytest.raises(RunError, match="no such run directory"):
        load_run(str(tmp_path / "missing"))
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(RunError, match="run.json is missing.*'fm-keras train --resume'"):
        load_run(str(tmp_path))
    (tmp_path / "run.json").write_text(json.dumps({"status": "failed"}))
    with pytest.raises(RunError, match="run status is 'failed', not 'complete'"):
        load_run(str(tmp_path))


def test_library_versions_name_what_a_run_depends_on():
    versions = library_versions()
    assert set(versions) == {"fm_keras", "tensorflow", "tf_keras", "tensorflow_recommenders",
                             "python", "transparent_huge_pages"}
    assert versions["transparent_huge_pages"] == hugepages.state()


def test_a_file_is_not_a_run_dir(tmp_path):
    path = tmp_path / "afile"
    path.write_text("mine")
    for resume in (False, True):
        with pytest.raises(RunError, match="afile: is a file, not a run directory; choose"):
            check_run_dir(str(path), resume=resume)
    assert path.read_text() == "mine"


def _experiment(**model):
    from fm_keras.config import experiment_from_dict

    return experiment_from_dict({
        "data": {"train": "train.csv", "valid": "valid.csv", "label": "click"},
        "features": [{"name": "user_id", "kind": "categorical", "tower": "user"},
                     {"name": "item_id", "kind": "categorical", "tower": "item"}],
        "model": model, "training": {"epochs": 3}}, base_dir="/data")


def test_resume_refuses_another_experiment_and_names_the_key(tmp_path):
    stored = _experiment()
    (tmp_path / "experiment.json").write_text(json.dumps(stored.to_dict()))
    check_run_dir(str(tmp_path), resume=True, config=stored)  # the same experiment
    longer = dataclasses.replace(stored, training=dataclasses.replace(stored.training,
                                                                      epochs=9))
    check_run_dir(str(tmp_path), resume=True, config=longer)  # a higher epoch cap is fine
    keras_steps = dataclasses.replace(stored, training=dataclasses.replace(
        stored.training, compiled_steps="never", steps_per_execution=1))
    check_run_dir(str(tmp_path), resume=True, config=keras_steps)  # how steps run: fine
    with pytest.raises(RunError, match=r"experiment.json: model.embedding_dim: the run was "
                                       r"started with 10, this experiment has 4; resume"):
        check_run_dir(str(tmp_path), resume=True, config=_experiment(embedding_dim=4))
    fewer = dataclasses.replace(stored, features=stored.features[:1])
    with pytest.raises(RunError, match="features: the run was started with a list of 2, "
                                       "this experiment has a list of 1"):
        check_run_dir(str(tmp_path), resume=True, config=fewer)
    assert json.loads((tmp_path / "experiment.json").read_text()) == json.loads(
        json.dumps(stored.to_dict()))
