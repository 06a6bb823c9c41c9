"""Experiment/feature YAML: defaults, path resolution, and errors that name the key."""

import dataclasses
import math

import pytest

from fm_keras.config import FeatureConfig, TrainingConfig, load_experiment
from fm_keras.errors import ConfigError

FEATURES = """\
features:
  - {name: user_id, kind: categorical, tower: user}
  - {name: tags, kind: multi_hot, tower: item, separator: ";"}
  - {name: price, kind: numeric, tower: item, normalization: log}
"""
EXPERIMENT = """\
data:
  train: data/train-*.csv
  valid: [data/valid.csv]
  label: click
  filters:
    - {name: cached, column: is_cached, op: "==", value: 1}
features: features.yaml
model: {embedding_dim: 8, l2_embeddings: 1e-4}
training: {pos_weight: 4, neg_sample_rate: 0.5}
"""


def _write(tmp_path, experiment=EXPERIMENT, features=FEATURES):
    (tmp_path / "features.yaml").write_text(features)
    path = tmp_path / "experiment.yaml"
    path.write_text(experiment)
    return path


def test_loads_with_defaults_and_resolved_paths(tmp_path):
    config = load_experiment(_write(tmp_path))
    assert config.data.train == (str(tmp_path / "data" / "train-*.csv"),)
    assert config.data.filters[0].column == "is_cached"
    assert config.model.embedding_dim == 8 and config.model.task == "binary"
    assert config.model.l2_embeddings == 1e-4  # YAML reads 1e-4 as a string; coerced
    assert config.feature("tags").separator == ";"
    assert config.feature("price").query_side is False
    assert config.training.optimizer == "adam"


def test_logit_correction_undoes_weighting_and_downsampling():
    t = TrainingConfig(pos_weight=4.0, neg_sample_rate=0.5)
    assert t.logit_correction == pytest.approx(-math.log(4.0) + math.log(0.5))
    assert TrainingConfig(class_weight={0: 0.5, 1: 2.0}).logit_correction == pytest.approx(-math.log(4))
    assert TrainingConfig().logit_correction == 0.0


@pytest.mark.parametrize("experiment,features,message", [
    (EXPERIMENT.replace("label:", "lable:"), FEATURES,
     "experiment.yaml: data: unknown key 'lable' \\(did you mean 'label'\\?\\)"),
    (EXPERIMENT.replace("pos_weight", "pos_wieght"), FEATURES,
     "training: unknown key 'pos_wieght' \\(did you mean 'pos_weight'\\?\\)"),
    (EXPERIMENT, FEATURES.replace("kind: numeric", "kind: numerical"),
     "features.yaml: feature 'price': kind must be one of .* got 'numerical' \\(did you mean 'numeric'\\?\\)"),
    (EXPERIMENT, FEATURES.replace("separator", "seperator"),
     "feature 'tags': unknown key 'seperator' \\(did you mean 'separator'\\?\\)"),
    # a misspelt 'name' is an unknown key like any other (it said "must be a mapping")
    (EXPERIMENT, FEATURES.replace("name: price", "nmae: price"),
     "features.yaml: features\\[\\d\\]: unknown key 'nmae' \\(did you mean 'name'\\?\\)"),
    (EXPERIMENT, FEATURES.replace("name: price, ", ""),
     "features.yaml: features\\[\\d\\]: missing required key 'name'"),
    (EXPERIMENT, FEATURES.replace("normalization: log", "separator: ','"),
     "feature 'price': key 'separator' does not apply to kind 'numeric'"),
    (EXPERIMENT.replace("embedding_dim: 8", "embedding_dim: ten"), FEATURES,
     "model: embedding_dim: expected int, got 'ten'"),
    (EXPERIMENT.replace("neg_sample_rate: 0.5", "neg_sample_rate: 1.5"), FEATURES,
     "neg_sample_rate must be in \\(0, 1\\]"),
    (EXPERIMENT.replace('op: "=="', 'op: "=~"'), FEATURES, "experiment.yaml: filter 'cached': op must be one of"),
    (EXPERIMENT.replace("label: click", "label: price"), FEATURES, "label 'price' is also a feature"),
    (EXPERIMENT, FEATURES + "  - {name: price, kind: numeric, tower: item}\n", "duplicate names"),
    ("data: [\n", FEATURES, "not valid YAML"),
    # PyYAML keeps the last of a repeated key silently: the first value was lost.
    (EXPERIMENT.replace("embedding_dim: 8", "embedding_dim: 8, embedding_dim: 16"), FEATURES,
     "experiment.yaml: not valid YAML: key 'embedding_dim' is given twice .* line"),
])
def test_errors_name_file_and_key(tmp_path, experiment, features, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment(_write(tmp_path, experiment, features))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: no such config file"):
        load_experiment(tmp_path / "nope.yaml")


def test_pos_weight_and_class_weight_conflict():
    with pytest.raises(ConfigError, match="pos_weight or class_weight, not both"):
        TrainingConfig(pos_weight=2.0, class_weight={0: 1.0, 1: 2.0})


def test_feature_bucket_boundaries_must_increase():
    with pytest.raises(ConfigError, match="strictly increasing"):
        FeatureConfig("age", "numeric", "user", buckets=[30.0, 18.0])


def test_to_dict_round_trip(tmp_path):
    from fm_keras.config import experiment_from_dict

    config = load_experiment(_write(tmp_path))
    again = experiment_from_dict(config.to_dict(), source="x")
    assert dataclasses.replace(again, source=config.source) == config


def test_feature_l2_is_checked():
    assert FeatureConfig("u", "categorical", "user", l2=3.0).l2 == 3.0
    with pytest.raises(ConfigError, match="l2"):
        FeatureConfig("u", "categorical", "user", l2=-1.0)


def test_distribute_section_loads_and_round_trips(tmp_path):
    from fm_keras.config import DistributeConfig, experiment_from_dict

    text = EXPERIMENT.replace(
        "training: {pos_weight: 4, neg_sample_rate: 0.5}",
        "training:\n  pos_weight: 4\n  distribute: {strategy: parameter_server, "
        "max_shard_bytes: 50331648, max_shards: 4}")
    config = load_experiment(_write(tmp_path, text))
    assert config.training.distribute == DistributeConfig(
        "parameter_server", max_shard_bytes=48 << 20, max_shards=4)
    assert config.training.distribute.cluster
    assert experiment_from_dict(config.to_dict()).training.distribute == config.training.distribute
    assert not load_experiment(_write(tmp_path)).training.distribute.cluster


@pytest.mark.parametrize("distribute,message", [
    ("{strategy: mirrored}", "distribute: strategy must be one of .* got 'mirrored'"),
    ("{strategy: parameter_server, max_shard: 3}", "unknown key 'max_shard' \\(did you mean 'max_shards'\\?\\)"),
    ("{strategy: multi_worker_mirrored, max_shard_bytes: 1000}",
     "max_shard_bytes shards variables over parameter servers; it needs strategy: parameter_server"),
    ("{strategy: parameter_server, max_shards: 0}", "max_shards must be >= 1"),
    ("parameter_server", "distribute must be a mapping"),
])
def test_distribute_errors_say_the_fix(tmp_path, distribute, message):
    text = EXPERIMENT.replace("training: {pos_weight: 4, neg_sample_rate: 0.5}",
                              f"training: {{distribute: {distribute}}}")
    with pytest.raises(ConfigError, match=message):
        load_experiment(_write(tmp_path, text))


def test_readme_lists_every_default():
    """README's "Defaults" table names every model and training key with its real default."""
    import dataclasses
    import pathlib
    import re

    from fm_keras.config import ModelConfig

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    table = dict(re.findall(r"^\| `([\w.]+)`(?: / `\w+`)? \| ([^|]+) \|", readme, re.M))
    for section, cls in (("model", ModelConfig), ("training", TrainingConfig)):
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            if key == "training.class_weight" or f.default is dataclasses.MISSING:
                continue  # listed with pos_weight; nested sections have their own docs
            assert key in table, f"README's Defaults table lacks {key}"
            default = f.default
            shown = table[key].strip().strip("`")
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                assert float(shown) == default, (key, shown, default)
            elif default is None:
                assert shown == "none", (key, shown)
            elif isinstance(default, str):
                assert shown == default, (key, shown, default)
            else:
                assert shown == str(default).lower(), (key, shown, default)


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    from fm_keras.config import read_yaml

    path = tmp_path / "m.yaml"
    path.write_text("base: &b {x: 1, y: 2}\nd:\n  <<: *b\n  y: 3\n")
    assert read_yaml(str(path))["d"] == {"x": 1, "y": 3}
    path.write_bytes(b"\xff\xfex: 1\n")
    with pytest.raises(ConfigError, match="m.yaml: not UTF-8 text"):
        read_yaml(str(path))


def test_retrieval_section_loads_with_items_and_no_label(tmp_path):
    text = EXPERIMENT.replace("  label: click\n", "  items: data/items.csv\n").replace(
        "model: {embedding_dim: 8, l2_embeddings: 1e-4}",
        "model: {task: retrieval}").replace(
        "training: {pos_weight: 4, neg_sample_rate: 0.5}",
        "training: {retrieval: {temperature: 0.5, catalog_negatives: 64, recall_at: 20}}")
    config = load_experiment(_write(tmp_path, text))
    assert config.data.label is None and config.data.items == (str(tmp_path / "data/items.csv"),)
    r = config.training.retrieval
    assert (r.temperature, r.catalog_negatives, r.recall_at, r.logq_correction) == \
        (0.5, 64, 20, True)
    assert load_experiment(_write(tmp_path, text)).to_dict() == config.to_dict()


@pytest.mark.parametrize("replace,message", [
    (("  label: click\n", ""), "data: label: task 'binary' needs a label column"),
    (("training: {pos_weight: 4, neg_sample_rate: 0.5}",
      "training: {negatives: {per_positive: 4}}"),
     "data: items: training: negatives needs the item catalog"),
    (("training: {pos_weight: 4, neg_sample_rate: 0.5}",
      "training: {negatives: {per_positive: 2, sampler: popular}}"),
     "training: negatives: sampler must be one of .*did you mean 'popularity'"),
    (("training: {pos_weight: 4, neg_sample_rate: 0.5}",
      "training: {retrieval: {temperature: 0}}"), "training: retrieval: temperature must be > 0"),
    (("model: {embedding_dim: 8, l2_embeddings: 1e-4}", "model: {task: retrieval}"),
     "data: items: task: retrieval needs the item catalog"),
    (("  label: click\n", "  label: click\n  weight: recency\n"),
     "data: weight: per-row weights are read by task: retrieval for now, got task: 'binary'"),
])
def test_retrieval_and_negatives_errors(tmp_path, replace, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment(_write(tmp_path, EXPERIMENT.replace(*replace)))


def test_retrieval_on_a_cluster_is_refused(tmp_path):
    text = EXPERIMENT.replace("  label: click\n", "  label: click\n  items: items.csv\n").replace(
        "model: {embedding_dim: 8, l2_embeddings: 1e-4}", "model: {task: retrieval}").replace(
        "training: {pos_weight: 4, neg_sample_rate: 0.5}",
        "training: {distribute: {strategy: multi_worker_mirrored}}")
    with pytest.raises(ConfigError, match="task: retrieval trains on one machine"):
        load_experiment(_write(tmp_path, text))
