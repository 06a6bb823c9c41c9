"""Pipeline YAML: validated at the edge, errors name the key and the fix; spans on disk."""

import os

import pytest
import yaml

from pipeline_testlib import write_pipeline_yaml
from fm_keras.errors import ConfigError
from fm_keras.pipeline.config import load_pipeline


@pytest.fixture
def logs(tmp_path):
    for span in (1, 2, 10):
        (tmp_path / "logs" / f"span-{span}").mkdir(parents=True)
        (tmp_path / "logs" / f"span-{span}" / "part-0.csv").write_text("ts,click\n1,0\n")
    (tmp_path / "logs" / "features.yaml").write_text(
        "features:\n  - {name: user_id, kind: categorical, tower: user}\n"
        "  - {name: item_id, kind: categorical, tower: item}\n")
    return tmp_path / "logs"


def _edit(path, **changes):
    spec = yaml.safe_load(open(path))
    for key, value in changes.items():
        section, _, sub = key.partition("__")
        if sub:
            spec[section][sub] = value
        else:
            spec[section] = value
    with open(path, "w") as f:
        yaml.safe_dump(spec, f)
    return path


def test_loads_resolves_paths_and_finds_the_newest_span(logs, tmp_path):
    path = write_pipeline_yaml(tmp_path / "p.yaml", logs, "root", tmp_path / "models")
    config = load_pipeline(path)
    assert config.root == str(tmp_path / "root")  # relative to the YAML file
    assert [f.name for f in config.features] == ["user_id", "item_id"]
    assert config.latest_span() == 10
    assert config.span_patterns(2) == (f"{logs}/span-2/*.csv",)
    assert config.evaluator.min_auc == 0.58 and config.infra_validator.mode == "in_process"
    assert config.recall_name == "ctr_recall"


@pytest.mark.parametrize("changes,message", [
    ({"evaluator__min_acu": 0.5}, "evaluator: unknown key 'min_acu' (did you mean 'min_auc'?)"),
    ({"validation": {"missing_column": "ignore"}}, "validation: missing_column must be one of"),
    ({"validation": {"label_rate_drift": {"max": 0.1, "severity": "loud"}}},
     "validation: severity must be one of ['fail', 'warn']"),
    ({"data__split": {"by": "random"}}, "data: split: by must be one of ['time', 'hash']"),
    ({"infra_validator": {"mode": "docker"}}, "infra_validator: mode must be one of"),
    ({"index": {"num_leaves": 10}}, "index: set num_leaves, leaves_to_search and reorder together"),
    ({"name": "1ctr"}, "name must be a plain model name"),
    ({"pusher": {"base": "x"}}, "pusher: missing required key 'model_config_file'"),
    ({"trainng": {}}, "unknown key 'trainng' (did you mean 'training'?)"),
    ({"trainer": {"tune": {"trials": 0}}}, "trainer: tune: trials must be >= 1, got 0"),
    ({"trainer": {"tune": {"trails": 3}}}, "trainer: tune: unknown key 'trails'"),
    ({"trainer": {"warm_start": True, "tune": {"trials": 3}}},
     "trainer: warm_start and tune exclude each other"),
    ({"data__spans": 0}, "data: spans must be an integer >= 1 (the rolling window of spans"),
    ({"data__spans": "7"}, "data: spans: expected int, got '7'"),
    ({"data__input": "logs/*.csv", "data__spans": 7},
     "data: spans: 7 (a rolling window of spans) needs {SPAN} in every data: input pattern"),
])
def test_bad_config_names_the_key(logs, tmp_path, changes, message):
    path = _edit(write_pipeline_yaml(tmp_path / "p.yaml", logs, "root", tmp_path / "m"), **changes)
    with pytest.raises(ConfigError, match=".*") as err:
        load_pipeline(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_rolling_window_of_spans_reads_the_spans_on_disk(logs, tmp_path):
    path = _edit(write_pipeline_yaml(tmp_path / "p.yaml", logs, "root", tmp_path / "m"),
                 data__spans=3)
    config = load_pipeline(path)  # spans 1, 2 and 10 on disk
    assert config.data.spans == 3
    window = config.span_window(10)
    assert (window.first, window.last, window.spans, window.missing) == (8, 10, (10,), (8, 9))
    assert window.describe() == "spans 8-10 (spans 8, 9 missing)"
    assert config.window_patterns(window) == (f"{logs}/span-10/*.csv",)
    # The window starts no earlier than the first span on disk: nothing is missing before it.
    window = config.span_window(2)
    assert (window.first, window.spans, window.missing) == (1, (1, 2), ())
    assert window.describe() == "spans 1-2"
    assert config.window_patterns(window) == (f"{logs}/span-1/*.csv", f"{logs}/span-2/*.csv")
    # The run's own span not on disk: its patterns alone, which ExampleGen reports missing
    # (as without a window), not a run on older spans only.
    window = config.span_window(5)
    assert window.spans == () and config.window_patterns(window) == (f"{logs}/span-5/*.csv",)
    window = config.span_window(11)
    assert window.spans == (10,) and window.missing == (9, 11)
    assert config.window_patterns(window) == (f"{logs}/span-11/*.csv",)
    one = load_pipeline(_edit(path, data__spans=1))
    assert one.span_window(10).describe() == "span 10" and one.span_window(10).spans == (10,)


def test_trainer_tune_budget(logs, tmp_path):
    from fm_keras.pipeline.config import TuneConfig

    path = _edit(write_pipeline_yaml(tmp_path / "p.yaml", logs, "root", tmp_path / "m"),
                 trainer={"tune": {"trials": 3, "timeout_s": 60}})
    assert load_pipeline(path).trainer.tune == TuneConfig(trials=3, timeout_s=60.0)


def test_no_span_on_disk_is_an_error(logs, tmp_path):
    path = _edit(write_pipeline_yaml(tmp_path / "p.yaml", logs, "root", tmp_path / "m"),
                 data__input=str(tmp_path / "nothing" / "span-{SPAN}" / "*.csv"))
    with pytest.raises(ConfigError, match="no files match"):
        load_pipeline(path).latest_span()


def test_template_is_valid_and_shows_the_defaults(tmp_path):
    import shutil

    from fm_keras.pipeline.config import (EvaluatorConfig, IndexConfig, InfraValidatorConfig,
                                          TrainerConfig, ValidationConfig)

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shutil.copy(f"{repo}/pipelines/template.yaml", tmp_path / "template.yaml")
    (tmp_path / "features.yaml").write_text(
        "features:\n  - {name: user_id, kind: categorical, tower: user}\n")
    config = load_pipeline(tmp_path / "template.yaml")
    assert config.evaluator == EvaluatorConfig()
    assert config.validation == ValidationConfig()
    assert config.index == IndexConfig()
    assert config.infra_validator == InfraValidatorConfig()
    assert config.trainer == TrainerConfig()
    assert config.data.split.eval_fraction == 0.2
    assert config.data.spans == 1  # one span per run unless data: spans says otherwise
