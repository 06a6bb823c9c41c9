"""The tune search space: the default, YAML overrides, and errors naming file and key."""

import pytest

from fm_keras.config import DataConfig, ExperimentConfig, FeatureConfig
from fm_keras.errors import ConfigError
from fm_keras.search_space import Param, SearchSpace, default_space, load_search_space

CONFIG = ExperimentConfig(
    data=DataConfig(train=("t.csv",), label="click"),
    features=(FeatureConfig("user_id", "categorical", "user"),
              FeatureConfig("item_id", "categorical", "item"),
              FeatureConfig("device", "categorical", "context"),
              FeatureConfig("price", "numeric", "item")),
    source="exp.yaml")


def _names(space):
    return [p.name for p in space.params]


def test_default_space_searches_globals_and_id_features():
    assert _names(default_space(CONFIG)) == [
        "optimizer", "learning_rate", "embedding_dim", "batch_size", "l2_embeddings",
        "l2_linear", "l2.user_id", "l2.item_id"]


def test_apply_sets_model_training_and_feature_values():
    space = default_space(CONFIG)
    config = space.apply(CONFIG, {"optimizer": "ftrl", "embedding_dim": 4, "batch_size": 256,
                                  "l2_linear": 1e-4, "l2.item_id": 0.02})
    assert config.training.optimizer == "ftrl" and config.training.batch_size == 256
    assert config.model.embedding_dim == 4 and config.model.l2_linear == 1e-4
    assert config.feature("item_id").l2 == 0.02 and config.feature("user_id").l2 is None
    assert config.training.learning_rate == CONFIG.training.learning_rate  # not given: kept


def test_file_replaces_drops_and_fixes_keys(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("learning_rate: {low: 1e-3, high: 0.1, log: true}\n"
                    "optimizer: [adam]\nbatch_size: 512\nl2_linear: null\n"
                    "feature_l2: {device: {low: 1e-5, high: 1e-1, log: true}}\n")
    space = load_search_space(str(path), CONFIG)
    by = {p.name: p for p in space.params}
    assert by["learning_rate"] == Param("learning_rate", low=1e-3, high=0.1, log=True)
    assert by["optimizer"].choices == ("adam",) and by["batch_size"].choices == (512,)
    assert "l2_linear" not in by and "l2.user_id" not in by and "l2.device" in by
    assert space.to_dict()["batch_size"] == [512]


@pytest.mark.parametrize("text,message", [
    ("learning_rat: [0.1]\n", "space.yaml: unknown search-space key 'learning_rat' "
                              "(did you mean 'learning_rate'?)"),
    ("feature_l2: {user: {low: 1, high: 2}}\n", "feature_l2: unknown feature 'user'"),
    ("optimizer: [adam, adamw]\n", "optimizer: unknown optimizer 'adamw'"),
    ("learning_rate: {low: 0, high: 0.1, log: true}\n", "learning_rate: needs low < high"),
    ("learning_rate: {low: 0.1}\n", "learning_rate: a range is {low: L, high: H"),
    ("batch_size: [0, 512]\n", "batch_size: 0 is not a valid value"),
    ("embedding_dim: [4.5]\n", "embedding_dim: expected an integer"),
    ("- a list\n", "space.yaml: expected a mapping"),
    # YAML's true is a number to Python: batch_size: true was a fixed batch size of 1.
    ("batch_size: true\n", "batch_size: expected a number, got True"),
    ("learning_rate: [0.01, yes]\n", "learning_rate: expected a number, got True"),
    # bool("false") is True: a quoted false made the range log-scaled.
    ('learning_rate: {low: 0.01, high: 0.1, log: "false"}\n',
     "learning_rate: log: expected true or false, got 'false'"),
])
def test_bad_files_name_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_search_space(str(path), CONFIG)
    assert message in str(err.value) and str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_key_given_twice_is_an_error_as_in_the_experiment(tmp_path):
    """As experiment.yaml: a repeated key is named with its line, not the last value taken."""
    path = tmp_path / "space.yaml"
    path.write_text("optimizer: [adam]\nlearning_rate: 1\nlearning_rate: 2\n")
    with pytest.raises(ConfigError) as err:
        load_search_space(str(path), CONFIG)
    assert str(err.value) == (f"{path}: not valid YAML: key 'learning_rate' is given twice "
                              f'in "{path}", line 3, column 1')


def test_missing_file():
    with pytest.raises(ConfigError, match="no-such.yaml: cannot read the search space"):
        load_search_space("no-such.yaml", CONFIG)


def test_suggest_draws_each_param_from_its_distribution():
    import optuna

    space = SearchSpace((Param("optimizer", choices=("adam", "sgd")),
                         Param("embedding_dim", low=2, high=64, log=True),
                         Param("l2.user_id", low=1e-6, high=1.0, log=True)))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        values = space.suggest(study.ask())
        assert values["optimizer"] in ("adam", "sgd")
        assert isinstance(values["embedding_dim"], int) and 2 <= values["embedding_dim"] <= 64
        assert 1e-6 <= values["l2.user_id"] <= 1.0
    # distribution() is what a study records (tune compares it with a resumed study's).
    assert study.trials[-1].distributions == {p.name: p.distribution() for p in space.params}
