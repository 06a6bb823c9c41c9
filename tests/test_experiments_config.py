"""The A/B experiment file: validation with errors naming the file and key; deployment checks."""

import os

import pytest

from fm_keras.errors import ConfigError
from fm_keras.experiments.config import load_ab_experiment

GOOD = """\
name: ctr-test
unit: user_id
salt: s1
arms:
  - {name: naive, model: ctr, label: naive, weight: 0.5}
  - {name: cleaned, model: ctr, version: 2, weight: 0.5}
"""

MODELS_CONFIG = """\
model_config_list {
  config {
    name: "ctr"
    base_path: "%s/ctr"
    model_platform: "tensorflow"
    model_version_policy { specific { versions: 1 versions: 2 } }
    version_labels { key: "naive" value: 1 }
    version_labels { key: "cleaned" value: 2 }
  }
}
"""


def write(tmp_path, text, name="ab.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def versions(tmp_path, *numbers):
    """Fake version directories (a saved_model.pb is all the check looks for)."""
    base = tmp_path / "saved_models"
    for v in numbers:
        (base / "ctr" / str(v)).mkdir(parents=True)
        (base / "ctr" / str(v) / "saved_model.pb").write_bytes(b"")
    return str(base)


def test_a_valid_file_loads_with_the_first_arm_as_control(tmp_path):
    exp = load_ab_experiment(write(tmp_path, GOOD))
    assert exp.control == "naive" and exp.buckets == 10_000
    assert exp.arm_names == ["naive", "cleaned"] and exp.weights == {"naive": 0.5, "cleaned": 0.5}
    assert exp.arm("cleaned").version == 2 and exp.arm("cleaned").recall == "ctr_recall"
    assert exp.arm("naive").target == "ctr@naive"


@pytest.mark.parametrize("change, message", [
    (("weight: 0.5}\n", "weight: 0.4}\n", 1), "weights sum to 0.9, not 1"),
    (("0.5}\n  - {name: cleaned, model: ctr, version: 2, weight: 0.5}",
      "0.49995}\n  - {name: cleaned, model: ctr, version: 2, weight: 0.50005}", 1),
     "weight 0.49995 is not a whole number of the 10,000 buckets"),
    (("label: naive,", "label: naive, version: 1,", 1), "exactly one of label"),
    (("salt: s1", "salt: s1\ncontrl: naive", 1), "did you mean 'control'"),
    (("salt: s1", "salt: s1\ncontrol: nope", 1), "control: 'nope' is not an arm"),
    (("name: cleaned", "name: naive", 1), "arm names must be unique"),
    (("unit: user_id\n", "", 1), "missing required key 'unit'"),
    (("salt: s1", "salt: s1\nbuckets: 100000000000000000000000", 1),
     "buckets must be in 2..4,294,967,296"),  # was an OverflowError traceback
    (("label: naive,", "label: '',", 1), "arm 'naive': label must be a version label"),
    (("unit: user_id", "unit: arm", 1), "unit: 'arm' is a column of the event schema"),
    (("unit: user_id", "unit: clicks", 1), "unit: 'clicks' is a column of the event schema"),
])
def test_bad_files_raise_one_error_naming_the_file_and_key(tmp_path, change, message):
    path = write(tmp_path, GOOD.replace(*change))
    with pytest.raises(ConfigError, match=message) as info:
        load_ab_experiment(path)
    assert str(info.value).startswith(path)


def test_labels_resolve_through_the_model_config_and_versions_must_exist(tmp_path):
    base = versions(tmp_path, 1, 2)
    config = write(tmp_path, MODELS_CONFIG % base, "models.config")
    exp = load_ab_experiment(write(tmp_path, GOOD + "model_config_file: models.config\n"))
    from fm_keras.experiments.config import check_deployment

    # No base: the model's base_path in models.config locates the versions.
    assert check_deployment(exp) == {"naive": os.path.join(base, "ctr", "1"),
                                     "cleaned": os.path.join(base, "ctr", "2")}
    exp = load_ab_experiment(write(tmp_path, GOOD), base=base, model_config_file=config)
    assert exp.base == base and exp.model_config_file == config


def test_an_unknown_label_is_an_error_naming_the_arm_and_the_labels(tmp_path):
    base = versions(tmp_path, 1, 2)
    config = write(tmp_path, MODELS_CONFIG % base, "models.config")
    path = write(tmp_path, GOOD.replace("label: naive", "label: canary"))
    with pytest.raises(ConfigError, match=r"arms\[0\] 'naive': label 'canary' is not a version "
                       r"label of model 'ctr' in .*models.config \(labels: \['cleaned', "
                       r"'naive'\]\)"):
        load_ab_experiment(path, model_config_file=config)
    with pytest.raises(ConfigError, match="model 'ctr2' is not in"):
        load_ab_experiment(write(tmp_path, GOOD.replace("model: ctr, label", "model: ctr2, label")),
                           model_config_file=config)


def test_a_version_missing_on_disk_is_an_error_naming_the_arm(tmp_path):
    base = versions(tmp_path, 1)
    with pytest.raises(ConfigError, match=r"arms\[1\] 'cleaned': ctr/2 -> version 2 has no "
                       "SavedModel"):
        load_ab_experiment(write(tmp_path, GOOD), base=base)


def test_a_zero_padded_version_directory_is_its_version(tmp_path):
    """The server serves version 2 from ctr/00000002 (TF Serving's naming); the check looked
    for ctr/2 only and said the arm's version had no SavedModel."""
    from fm_keras.experiments.config import check_deployment

    base = versions(tmp_path, 1, 2)
    os.rename(os.path.join(base, "ctr", "2"), os.path.join(base, "ctr", "00000002"))
    exp = load_ab_experiment(write(tmp_path, GOOD), base=base)  # cleaned: version 2
    assert check_deployment(exp) == {"naive": None,
                                     "cleaned": os.path.join(base, "ctr", "00000002")}


def test_without_a_deployment_labels_are_not_checked(tmp_path):
    from fm_keras.experiments.config import check_deployment

    exp = load_ab_experiment(write(tmp_path, GOOD))
    assert check_deployment(exp) == {"naive": None, "cleaned": None}


def test_a_file_that_is_not_utf8_is_one_error_naming_it(tmp_path):
    path = tmp_path / "ab.yaml"
    path.write_bytes(b"\xff\xfename: x\n")  # was a UnicodeDecodeError traceback
    with pytest.raises(ConfigError, match="not UTF-8 text") as info:
        load_ab_experiment(path)
    assert str(info.value).startswith(str(path))


@pytest.mark.parametrize("content", [None, b"\xff\xfe model_config_list {}", b"not a proto {"])
def test_an_unreadable_model_config_file_names_the_experiment_key(tmp_path, content):
    if content is not None:
        (tmp_path / "models.config").write_bytes(content)  # non-UTF-8 was a traceback
    path = write(tmp_path, GOOD + "model_config_file: models.config\n")
    with pytest.raises(ConfigError, match="model_config_file: ") as info:
        load_ab_experiment(path)
    assert str(info.value).startswith(f"{path}: model_config_file: ")
