"""InfraValidator: a candidate must load in the server and answer every signature."""

import os
import shutil

from fm_keras.pipeline.config import InfraValidatorConfig, load_pipeline
from fm_keras.pipeline.infra_validator import infra_validate


def _candidate(pipeline_first_run):
    from fm_keras.pipeline.metadata import MetadataStore

    path, _ = pipeline_first_run
    config = load_pipeline(path)
    store = MetadataStore(os.path.join(config.root, "metadata.sqlite"))
    try:
        model = store.artifacts("Model")[-1]
        examples = store.artifacts("Examples")[-1]
    finally:
        store.close()
    return model.properties["export_dir"], examples.uri


def test_candidate_answers_every_signature_in_fm_keras_serve(pipeline_first_run):
    export_dir, examples = _candidate(pipeline_first_run)
    result = infra_validate(export_dir, examples, InfraValidatorConfig(mode="subprocess",
                                                                       timeout_seconds=120))
    assert result["valid"], result
    assert sorted(result["signatures"]) == ["item_tower", "serving_default", "user_tower"]
    assert result["signatures"]["serving_default"]["outputs"] == [
        "logit", "probability", "raw_probability"]
    assert result["signatures"]["user_tower"]["version"] == 1


def test_a_model_that_cannot_load_is_infra_invalid(pipeline_first_run, tmp_path):
    export_dir, examples = _candidate(pipeline_first_run)
    broken = tmp_path / "1"
    shutil.copytree(export_dir, broken)
    shutil.rmtree(broken / "variables")
    result = infra_validate(str(broken), examples, InfraValidatorConfig(mode="in_process",
                                                                        timeout_seconds=30))
    assert not result["valid"]
    assert "could not load the candidate" in result["error"]


def test_a_validation_removes_the_directories_of_killed_validations(pipeline_first_run,
                                                                     tmp_path, monkeypatch,
                                                                     capsys):
    """Regression: a SIGKILLed pipeline left /tmp/fm-keras-infra-* behind for good."""
    import subprocess
    import sys
    import tempfile

    export_dir, examples = _candidate(pipeline_first_run)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    tmp = tmp_path / "tmp"
    stale = tmp / f"fm-keras-infra-{gone.pid}-x1"
    (stale / "candidate").mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    result = infra_validate(str(tmp_path / "no-model"), examples,
                            InfraValidatorConfig(mode="in_process", timeout_seconds=2))
    assert not result["valid"]
    assert not stale.exists() and list(tmp.iterdir()) == []
    assert f"removed {stale}, left by a killed validation" in capsys.readouterr().err
