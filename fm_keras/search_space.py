"""The hyperparameter search space of `fm-keras tune`: a default, overridable from YAML.

A search-space file maps keys to a list (categorical), a range ``{low, high, log}`` or a
single value (fixed); ``null`` drops a key (the experiment's own value is kept)::

    optimizer: [adam, adagrad]
    learning_rate: {low: 1.0e-4, high: 0.3, log: true}
    embedding_dim: [4, 8, 16, 32]
    batch_size: 1024                     # fixed
    l2_embeddings: {low: 1.0e-8, high: 1.0e-3, log: true}
    l2_linear: null                      # not searched
    feature_l2:                          # per feature: FeatureConfig.l2 (factors and linear)
      user_id: {low: 1.0e-6, high: 1.0, log: true}

Keys a file gives replace the default's; ``feature_l2`` replaces the default's per-feature
map as a whole. An unknown key or feature, or a value the experiment cannot take, is a
`ConfigError` naming the file and the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import yaml

from fm_keras.config import OPTIMIZERS, ExperimentConfig, UniqueKeyLoader
from fm_keras.errors import ConfigError, close_match

MODEL_KEYS = ("embedding_dim", "l2_embeddings", "l2_linear", "l2_prior")
TRAINING_KEYS = ("optimizer", "learning_rate", "batch_size", "weight_decay")
KEYS = (*TRAINING_KEYS, *MODEL_KEYS, "feature_l2")
_INTEGER_KEYS = ("embedding_dim", "batch_size")
FEATURE_PREFIX = "l2."


@dataclass(frozen=True)
class Param:
    """One searched hyperparameter: ``choices`` (categorical) or a ``[low, high]`` range
    (log-uniform when ``log``; integers for embedding_dim and batch_size)."""

    name: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False

    def suggest(self, trial):
        """The trial's value (an `optuna.Trial`)."""
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.name in _INTEGER_KEYS:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def distribution(self):
        """The Optuna distribution `suggest` samples from (what a study records per trial)."""
        from optuna.distributions import (
            CategoricalDistribution,
            FloatDistribution,
            IntDistribution,
        )

        if self.choices is not None:
            return CategoricalDistribution(list(self.choices))
        if self.name in _INTEGER_KEYS:
            return IntDistribution(int(self.low), int(self.high), log=self.log)
        return FloatDistribution(self.low, self.high, log=self.log)

    def extremes(self) -> tuple:
        return self.choices if self.choices is not None else (self.low, self.high)


@dataclass(frozen=True)
class SearchSpace:
    """The parameters a trial samples; `apply` turns a trial's values into an experiment."""

    params: tuple[Param, ...]

    def suggest(self, trial) -> dict:
        return {p.name: p.suggest(trial) for p in self.params}

    def apply(self, config: ExperimentConfig, values: dict) -> ExperimentConfig:
        """`config` with the given values (a trial's params) set; others unchanged."""
        model = {k: v for k, v in values.items() if k in MODEL_KEYS}
        training = {k: v for k, v in values.items() if k in TRAINING_KEYS}
        features = tuple(
            dataclasses.replace(f, l2=values[FEATURE_PREFIX + f.name])
            if FEATURE_PREFIX + f.name in values else f for f in config.features)
        return dataclasses.replace(
            config, model=dataclasses.replace(config.model, **model),
            training=dataclasses.replace(config.training, **training), features=features)

    def to_dict(self) -> dict:
        return {p.name: (list(p.choices) if p.choices is not None
                         else {"low": p.low, "high": p.high, "log": p.log}) for p in self.params}


def default_space(config: ExperimentConfig) -> SearchSpace:
    """Optimizer, learning rate, k, batch size, global L2 and a per-feature L2 for each id
    feature (a name ending in ``id``): ids carry many parameters per row of signal, so their
    best L2 differs most from the shared attributes'.

    The ranges hold the good values of Adam (~1e-3..1e-2) and Adagrad (~0.05..0.5) on sparse
    ids; FTRL and SGD are left out (on MovieLens-100K every FTRL trial of a 20-trial search
    ended below the defaults: BENCHMARKS.md), a search-space file can add them.
    """
    params = [
        Param("optimizer", choices=("adam", "adagrad")),
        Param("learning_rate", low=3e-4, high=0.5, log=True),
        Param("embedding_dim", choices=(4, 8, 16, 32)),
        Param("batch_size", choices=(256, 512, 1024, 2048)),
        Param("l2_embeddings", low=1e-8, high=1e-3, log=True),
        Param("l2_linear", low=1e-8, high=1e-3, log=True),
    ]
    params += [Param(FEATURE_PREFIX + f.name, low=1e-7, high=0.1, log=True)
               for f in config.features if f.kind != "numeric" and f.name.lower().endswith("id")]
    return SearchSpace(tuple(params))


def load_search_space(path: str | None, config: ExperimentConfig) -> SearchSpace:
    """The default space with a YAML file's keys replacing the default's (None: the default).

    Raises:
        ConfigError: unreadable file, a key given twice, unknown key or feature, a malformed
            range, or a value the experiment's config rejects (each error names the file and
            the key).
    """
    space = default_space(config)
    if path is None:
        return space
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.load(f, Loader=UniqueKeyLoader) or {}  # noqa: S506 - a SafeLoader
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the search space ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of search-space keys {list(KEYS)}")
    by_name = {p.name: p for p in space.params}
    for key, value in raw.items():
        _known(key, KEYS, f"{path}: unknown search-space key")
        if key == "feature_l2":
            by_name = {n: p for n, p in by_name.items() if not n.startswith(FEATURE_PREFIX)}
            if not isinstance(value, dict) and value is not None:
                raise ConfigError(f"{path}: feature_l2: expected a mapping of feature name "
                                  f"-> range, got {value!r}")
            names = [f.name for f in config.features]
            for feature, spec in (value or {}).items():
                _known(feature, names, f"{path}: feature_l2: unknown feature")
                _set(by_name, FEATURE_PREFIX + feature, spec, f"{path}: feature_l2: {feature}")
        else:
            _set(by_name, key, value, f"{path}: {key}")
    space = SearchSpace(tuple(by_name.values()))
    for p in space.params:  # every value the space can give must make a valid experiment
        for value in p.extremes():
            try:
                space.apply(config, {p.name: value})
            except (ConfigError, TypeError, ValueError) as err:
                raise ConfigError(f"{path}: {p.name}: {value!r} is not a valid value ({err})") \
                    from None
    return space


def _set(by_name: dict, name: str, spec, where: str) -> None:
    if spec is None:
        by_name.pop(name, None)
        return
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"{where}: an empty list of choices")
        by_name[name] = Param(name, choices=tuple(_number(v, name, where) for v in spec))
    elif isinstance(spec, dict):
        extra = set(spec) - {"low", "high", "log"}
        if extra or not {"low", "high"} <= set(spec):
            raise ConfigError(f"{where}: a range is {{low: L, high: H, log: true|false}}, "
                              f"got {spec!r}")
        low, high = (_number(spec[k], name, where) for k in ("low", "high"))
        log = spec.get("log", False)
        if not isinstance(log, bool):
            raise ConfigError(f"{where}: log: expected true or false, got {log!r}")
        if not isinstance(low, (int, float)) or not low < high or (log and low <= 0):
            raise ConfigError(f"{where}: needs low < high (and low > 0 with log), got {spec!r}")
        by_name[name] = Param(name, low=low, high=high, log=log)
    else:
        by_name[name] = Param(name, choices=(_number(spec, name, where),))


def _number(value, name: str, where: str):
    """YAML reads 1e-5 (no dot) as a string: numbers are parsed here."""
    if name == "optimizer":
        _known(value, OPTIMIZERS, f"{where}: unknown optimizer")
        return value
    if isinstance(value, bool):  # YAML's true/yes: an int to Python, not a number here
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if name in _INTEGER_KEYS and not float(value).is_integer():
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    return int(value) if name in _INTEGER_KEYS else value


def _known(key, allowed, what: str) -> None:
    if key not in allowed:
        close = close_match(key, allowed)
        hint = f" (did you mean {close!r}?)" if close else f"; known: {list(allowed)}"
        raise ConfigError(f"{what} {key!r}{hint}")
