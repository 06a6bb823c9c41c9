"""Experiment and feature configuration: frozen dataclasses loaded from YAML.

Validated once, at the edge: an unknown key, a wrong type or an impossible value raises
`ConfigError` naming the file and the key (with a "did you mean" for typos). Inside the package
only these objects travel, never raw dicts.

An experiment file looks like::

    data:
      train: train.csv            # a path or glob (or a list), relative to this file
      valid: valid.csv
      test: test.csv
      label: click
      filters:                    # rows matching a filter are dropped, and counted
        - {name: cached_exposures, column: is_cached, op: "==", value: 1}
    features: features.yaml       # or the list inline
    model: {task: binary, embedding_dim: 10}     # optional: defaults converge untuned
    training: {pos_weight: 5.0}
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from fm_keras.calibration import CHOICES as CALIBRATIONS
from fm_keras.errors import ConfigError, close_match

KINDS = ("categorical", "multi_hot", "numeric")
TOWERS = ("user", "item", "context")
NORMALIZATIONS = ("standard", "log", "min_max", "none")
COMBINERS = ("sum", "mean", "sqrtn")
TASKS = ("binary", "regression", "retrieval")
OUT_OF_CORE = ("auto", "true", "false")
SAMPLERS = ("uniform", "popularity")
OPTIMIZERS = ("adam", "adagrad", "ftrl", "sgd")
COMPILED_STEPS = ("auto", "always", "never")
FILTER_OPS = ("==", "!=", "<", "<=", ">", ">=", "in", "not_in", "is_null")
STRATEGIES = ("none", "multi_worker_mirrored", "parameter_server")

# Keys that only make sense for some kinds; a key set for another kind is an error.
_KIND_KEYS = {
    "categorical": {"min_count", "oov_buckets", "hash_buckets"},
    "multi_hot": {"min_count", "oov_buckets", "hash_buckets", "separator",
                  "weight_separator", "max_len", "combiner"},
    "numeric": {"normalization", "buckets", "default"},
}


@dataclass(frozen=True)
class FeatureConfig:
    """One raw input column and how it becomes FM features.

    Attributes:
        name: column name in the data and input name of the exported model.
        kind: ``categorical`` (x=1 for the value), ``multi_hot`` (a list of values in one
            column, x = the element weight) or ``numeric`` (x = the normalized value).
        tower: ``user``, ``item`` or ``context``; context rides on the query (user) side.
        min_count: values seen fewer times in training data go to the OOV buckets.
        oov_buckets: hash buckets for values outside the vocabulary (never fails on a new id).
        hash_buckets: if set, hash values into this many buckets instead of a vocabulary.
        separator: multi_hot element separator, e.g. ``"a|b|c"``.
        weight_separator: multi_hot optional per-element weight, e.g. ``"a:0.5|b:2"``.
        max_len: multi_hot elements kept per row (default: the 99th percentile in training).
        combiner: multi_hot weight normalization: ``sum`` (as given), ``mean`` (divide by the
            weight sum), ``sqrtn`` (divide by the L2 norm of the weights).
        normalization: numeric ``standard``, ``log`` (log1p then standard), ``min_max`` or ``none``.
        buckets: numeric bucketization instead of a value: a number of quantile buckets or an
            explicit sorted list of boundaries; the bucket becomes a categorical value.
        default: numeric raw value used for missing cells (default: the training mean).
        l2: L2 on this feature's factors and linear weights instead of the model's
            ``l2_embeddings`` / ``l2_linear``. Id features (user_id, item_id) have many
            parameters per row of signal and need far more than shared attributes.
    """

    name: str
    kind: str
    tower: str
    min_count: int = 1
    oov_buckets: int = 1
    hash_buckets: int | None = None
    separator: str = "|"
    weight_separator: str = ":"
    max_len: int | None = None
    combiner: str = "sum"
    normalization: str = "standard"
    buckets: int | list[float] | None = None
    default: float | None = None
    l2: float | None = None

    def __post_init__(self):
        where = f"feature {self.name!r}"
        if self.l2 is not None:
            _at_least(self.l2, 0.0, f"{where}: l2")
        check_one_of(self.kind, KINDS, f"{where}: kind")
        check_one_of(self.tower, TOWERS, f"{where}: tower")
        check_one_of(self.normalization, NORMALIZATIONS, f"{where}: normalization")
        check_one_of(self.combiner, COMBINERS, f"{where}: combiner")
        _at_least(self.min_count, 1, f"{where}: min_count")
        _at_least(self.oov_buckets, 1, f"{where}: oov_buckets")
        if self.hash_buckets is not None:
            _at_least(self.hash_buckets, 1, f"{where}: hash_buckets")
        if self.max_len is not None:
            _at_least(self.max_len, 1, f"{where}: max_len")
        if isinstance(self.buckets, int):
            _at_least(self.buckets, 2, f"{where}: buckets")
        elif isinstance(self.buckets, list) and self.buckets != sorted(set(self.buckets)):
            raise ConfigError(f"{where}: buckets must be strictly increasing boundaries, "
                              f"got {self.buckets}")
        if self.kind == "multi_hot" and (not self.separator or self.separator == self.weight_separator):
            raise ConfigError(f"{where}: separator must be non-empty and differ from "
                              f"weight_separator, got {self.separator!r}")

    @property
    def query_side(self) -> bool:
        """True for user and context features (the query side Q of the decomposition)."""
        return self.tower != "item"


@dataclass(frozen=True)
class FilterConfig:
    """Drop rows where ``column op value`` holds, e.g. cached exposures (is_cached == 1)."""

    name: str
    column: str
    op: str
    value: Any = None

    def __post_init__(self):
        check_one_of(self.op, FILTER_OPS, f"filter {self.name!r}: op")
        if self.op in ("in", "not_in") and not isinstance(self.value, list):
            raise ConfigError(f"filter {self.name!r}: op {self.op!r} needs a list value, "
                              f"got {self.value!r}")


@dataclass(frozen=True)
class DataConfig:
    """Where the data is. Paths are globs, resolved relative to the experiment file.

    ``label`` is required for ``binary`` and ``regression``; for ``retrieval`` it is optional
    (rows with label <= 0 are dropped). ``items`` is the item catalog (one row per item: the
    ``item_id`` column and the item features), needed by ``retrieval`` and by sampled
    negatives.

    ``weight`` names an optional column of per-row sample weights (finite, >= 0; task
    ``retrieval``): a row's share of the loss. The common use is recency, e.g. a weight of
    ``0.5 ** (age_days / half_life_days)`` so that what users pick now counts more than what
    they picked a year ago (item popularity drifts). The logQ correction still uses the raw
    item frequencies: it corrects how candidates are sampled, which weights do not change.

    Out of core: ``out_of_core`` is ``auto`` (out of core when the training files hold more
    than ``out_of_core_mb`` MiB), ``true`` or ``false``. Out of core, vocabularies and
    statistics are fitted in one streaming pass, the rows are encoded once to binary shards
    under ``<run>/shards`` (or under ``shard_dir``, a cache reused by runs of the same data and
    features) and streamed every epoch, so memory stays flat in rows (`fm_keras.out_of_core`).
    """

    train: tuple[str, ...]
    label: str | None = None
    valid: tuple[str, ...] = ()
    test: tuple[str, ...] = ()
    filters: tuple[FilterConfig, ...] = ()
    items: tuple[str, ...] = ()
    item_id: str = "item_id"
    weight: str | None = None
    out_of_core: str = "auto"
    out_of_core_mb: float = 256.0
    shard_dir: str | None = None

    def __post_init__(self):
        check_one_of(self.out_of_core, OUT_OF_CORE, "data: out_of_core")
        _at_least(self.out_of_core_mb, 0.0, "data: out_of_core_mb")


@dataclass(frozen=True)
class ModelConfig:
    """The FM itself.

    Attributes:
        task: ``binary`` (logistic loss, CTR), ``regression`` (squared loss, ratings) or
            ``retrieval`` (two towers, softmax over the catalog; see `RetrievalConfig`).
        embedding_dim: k, the factor dimension.
        l2_embeddings: L2 on the factor rows a batch touches (frequency-adaptive).
        l2_linear: L2 on the linear weights a batch touches.
        init_stddev: standard deviation of the initial factors.
        l2_prior: precision of a Gaussian prior on each id's factors and linear weight: an
            id seen n times in training gets L2 ``l2_prior / (2 n)`` per occurrence, on top of
            the above, so rare ids are held back most (see `FactorizationMachine`).
        l2_prior_adaptive: re-estimate each feature's prior precision between epochs
            (empirical Bayes, `fm_keras.prior`), starting from `l2_prior`; else keep it fixed.
        l2_prior_validation: with `l2_prior_adaptive`, follow each re-estimate with a line
            search of every feature's precisions on the validation loss
            (`fm_keras.prior_search`; cf. libFM's SGDA, Rendle WSDM 2012).
    """

    task: str = "binary"
    embedding_dim: int = 10
    l2_embeddings: float = 1e-5
    l2_linear: float = 1e-6
    init_stddev: float = 0.01
    l2_prior: float = 10.0
    l2_prior_adaptive: bool = True
    l2_prior_validation: bool = True

    def __post_init__(self):
        check_one_of(self.task, TASKS, "model: task")
        _at_least(self.embedding_dim, 1, "model: embedding_dim")
        for name in ("l2_embeddings", "l2_linear", "init_stddev", "l2_prior"):
            _at_least(getattr(self, name), 0.0, f"model: {name}")


@dataclass(frozen=True)
class DistributeConfig:
    """Where training runs: one machine, or a TensorFlow cluster described by ``TF_CONFIG``.

    Attributes:
        strategy: ``none`` (this process), ``multi_worker_mirrored`` (data parallel: every
            worker holds all variables, gradients are all-reduced) or ``parameter_server``
            (variables live on parameter servers, workers train asynchronously; for tables
            larger than one worker's memory).
        min_shard_bytes: parameter_server: a variable is split into shards of at least this
            many bytes (``MinSizePartitioner``), at most one shard per parameter server
            unless `max_shards` says otherwise.
        max_shard_bytes: parameter_server: instead, split every variable into shards of at
            most this many bytes (``MaxSizePartitioner``): the per-variable memory budget.
        max_shards: parameter_server: upper bound on shards per variable (default: the number
            of parameter servers for `min_shard_bytes`; unbounded for `max_shard_bytes`).
    """

    strategy: str = "none"
    min_shard_bytes: int = 256 << 10
    max_shard_bytes: int | None = None
    max_shards: int | None = None

    def __post_init__(self):
        check_one_of(self.strategy, STRATEGIES, "training: distribute: strategy")
        _at_least(self.min_shard_bytes, 1, "training: distribute: min_shard_bytes")
        for name in ("max_shard_bytes", "max_shards"):
            if getattr(self, name) is not None:
                _at_least(getattr(self, name), 1, f"training: distribute: {name}")
        changed = [n for n in ("max_shard_bytes", "max_shards") if getattr(self, n) is not None]
        if self.min_shard_bytes != 256 << 10:
            changed.append("min_shard_bytes")
        if changed and self.strategy != "parameter_server":
            raise ConfigError(f"training: distribute: {changed[0]} shards variables over "
                              "parameter servers; it needs strategy: parameter_server, got "
                              f"strategy: {self.strategy}")

    @property
    def cluster(self) -> bool:
        """True when training runs on a TensorFlow cluster (TF_CONFIG is needed)."""
        return self.strategy != "none"


@dataclass(frozen=True)
class NegativesConfig:
    """Negatives sampled from the item catalog for pointwise training on implicit logs.

    Attributes:
        per_positive: catalog items drawn per positive row, every epoch afresh; an item the
            user has a positive for is discarded. 0 = off.
        sampler: ``uniform`` over the catalog, or ``popularity`` (proportional to the item's
            count of training positives, plus one).
    """

    per_positive: int = 0
    sampler: str = "uniform"

    def __post_init__(self):
        _at_least(self.per_positive, 0, "training: negatives: per_positive")
        check_one_of(self.sampler, SAMPLERS, "training: negatives: sampler")


@dataclass(frozen=True)
class RetrievalConfig:
    """The two-tower objective of ``task: retrieval`` (tfrs.tasks.Retrieval).

    Attributes:
        temperature: the softmax temperature (scores are divided by it).
        logq_correction: subtract log(sampling probability) of each candidate (Yi et al.,
            RecSys 2019), from the item frequencies of the training log.
        catalog_negatives: extra negatives per batch drawn uniformly from the catalog,
            shared by every query of the batch (mixed negative sampling, Yang et al., WWW 2020).
        remove_accidental_hits: a candidate with the same item as the positive is not a
            negative.
        recall_at: K of the validation Recall@K that early stopping watches.
        exclude_seen: validation and test recall leave out each user's training items.
    """

    temperature: float = 1.0
    logq_correction: bool = True
    catalog_negatives: int = 0
    remove_accidental_hits: bool = True
    recall_at: int = 50
    exclude_seen: bool = True

    def __post_init__(self):
        if not self.temperature > 0:
            raise ConfigError(f"training: retrieval: temperature must be > 0, "
                              f"got {self.temperature}")
        _at_least(self.catalog_negatives, 0, "training: retrieval: catalog_negatives")
        _at_least(self.recall_at, 1, "training: retrieval: recall_at")


@dataclass(frozen=True)
class TrainingConfig:
    """How to fit.

    Attributes:
        pos_weight: weight of positive rows (the first answer to rare clicks). The exported
            probability is corrected by -log(pos_weight).
        class_weight: ``{0: w0, 1: w1}``; an alternative spelling of pos_weight = w1 / w0.
        neg_sample_rate: keep each negative training row with this probability. The
            probability is corrected by +log(neg_sample_rate).
        early_stopping_patience: epochs without a better validation metric (AUC for binary,
            RMSE for regression) before stopping. Epochs while the training loss is still at
            the base-rate entropy (learning has not started) do not count.
        early_stopping_min_delta: an epoch counts as better only if it beats the best by more
            than this (its weights are still kept if it is the best).
        steps_per_execution: training steps per graph call, at most an epoch's batches;
            larger is faster on CPU.
        compiled_steps: run each graph call's steps as one XLA computation
            (`fm_keras.compiled_steps`; the same updates, several times fewer ms per step):
            ``auto`` where it applies and the run has at least
            `fm_keras.compiled_steps.AUTO_MIN_STEPS` steps of `AUTO_MIN_BATCH` rows or more
            (XLA compiles once per run, 1-4 s),
            ``always`` (an error where it does not apply), ``never`` (Keras' step).
        weight_decay: decoupled weight decay of the optimizer (Loshchilov & Hutter 2019). The
            row-wise optimizers (adam, adagrad, ftrl; `fm_keras.optimizers`) decay the rows a
            step touches, with their update; sgd decays every row each step, so it shrinks
            rarely seen ids the most.
        distribute: the ``tf.distribute`` strategy (see `DistributeConfig`); batch_size is
            the global batch: each of n synchronous workers takes batch_size / n rows.
        negatives: catalog-sampled negatives for ``task: binary`` (see `NegativesConfig`).
        retrieval: the ``task: retrieval`` objective (see `RetrievalConfig`).
        calibration: the calibrator fitted on the validation split after training (binary
            task; see `fm_keras.calibration`): ``auto`` (none, platt or isotonic, whichever
            has the lowest cross-fitted validation logloss), ``platt``, ``isotonic`` or
            ``none`` (the logit correction alone).
    """

    optimizer: str = "adam"
    learning_rate: float = 0.004
    batch_size: int = 4096
    epochs: int = 40
    early_stopping_patience: int = 3
    early_stopping_min_delta: float = 1e-4
    pos_weight: float | None = None
    class_weight: dict[int, float] | None = None
    neg_sample_rate: float = 1.0
    seed: int = 42
    steps_per_execution: int = 32
    compiled_steps: str = "auto"
    weight_decay: float = 0.0
    distribute: DistributeConfig = field(default_factory=DistributeConfig)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    calibration: str = "auto"

    def __post_init__(self):
        check_one_of(self.optimizer, OPTIMIZERS, "training: optimizer")
        check_one_of(self.calibration, CALIBRATIONS, "training: calibration")
        check_one_of(self.compiled_steps, COMPILED_STEPS, "training: compiled_steps")
        if self.compiled_steps == "always":
            against = ("optimizer: sgd (not row-wise)" if self.optimizer == "sgd" else
                       "negatives: per_positive (batches grow by the sampled rows)"
                       if self.negatives.per_positive else
                       f"distribute: strategy: {self.distribute.strategy}"
                       if self.distribute.strategy != "none" else None)
            if against:
                raise ConfigError(f"training: compiled_steps: always cannot apply with "
                                  f"training: {against}; set it to auto or never")
        for name in ("batch_size", "epochs", "steps_per_execution"):
            _at_least(getattr(self, name), 1, f"training: {name}")
        _at_least(self.weight_decay, 0.0, "training: weight_decay")
        _at_least(self.early_stopping_min_delta, 0.0, "training: early_stopping_min_delta")
        _at_least(self.early_stopping_patience, 1, "training: early_stopping_patience")
        if not self.learning_rate > 0:
            raise ConfigError(f"training: learning_rate must be > 0, got {self.learning_rate}")
        if not 0 < self.neg_sample_rate <= 1:
            raise ConfigError("training: neg_sample_rate must be in (0, 1], "
                              f"got {self.neg_sample_rate}")
        if self.pos_weight is not None and self.class_weight is not None:
            raise ConfigError("training: set pos_weight or class_weight, not both")
        if self.pos_weight is not None and not self.pos_weight > 0:
            raise ConfigError(f"training: pos_weight must be > 0, got {self.pos_weight}")
        if self.class_weight is not None:
            if set(self.class_weight) != {0, 1} or min(self.class_weight.values()) <= 0:
                raise ConfigError("training: class_weight must be {0: w0, 1: w1} with "
                                  f"positive weights, got {self.class_weight}")

    @property
    def positive_weight_ratio(self) -> float:
        """w1 / w0: how much more a positive row weighs than a negative one."""
        if self.class_weight is not None:
            return self.class_weight[1] / self.class_weight[0]
        return self.pos_weight if self.pos_weight is not None else 1.0

    @property
    def logit_correction(self) -> float:
        """Exact logit shift undoing positive weighting and negative downsampling.

        Weighting positives by w multiplies the fitted odds by w; keeping negatives with
        rate r multiplies them by 1/r. So the calibrated logit is
        ``logit - log(w) + log(r)``.
        """
        return -math.log(self.positive_weight_ratio) + math.log(self.neg_sample_rate)


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything a training run needs, with paths already resolved."""

    data: DataConfig
    features: tuple[FeatureConfig, ...]
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    source: str = ""

    def __post_init__(self):
        if not self.features:
            raise ConfigError(f"{self.source}: features: at least one feature is needed")
        names = [f.name for f in self.features]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"{self.source}: features: duplicate names {dupes}")
        if self.data.label in names:
            raise ConfigError(f"{self.source}: the label {self.data.label!r} is also a feature")
        if self.model.task != "binary" and self.training.calibration in ("platt", "isotonic"):
            raise ConfigError(f"{self.source}: training: calibration: {self.training.calibration} "
                              "is fitted on click labels (task: binary); a "
                              f"{self.model.task} model has none. Remove the key (or set "
                              "auto / none)")
        self._check_task()

    def _check_task(self) -> None:
        task, where = self.model.task, self.source
        if self.data.label is None and task != "retrieval":
            raise ConfigError(f"{where}: data: label: task {task!r} needs a label column "
                              "(only task: retrieval reads a log without one)")
        if self.data.weight is not None and task != "retrieval":
            raise ConfigError(f"{where}: data: weight: per-row weights are read by task: "
                              f"retrieval for now, got task: {task!r}; for binary, "
                              "training: pos_weight / class_weight weigh the classes")
        needs_items = task == "retrieval" or self.training.negatives.per_positive > 0
        if needs_items and not self.data.items:
            raise ConfigError(f"{where}: data: items: " + (
                "task: retrieval" if task == "retrieval" else "training: negatives") +
                " needs the item catalog (data: {items: items.csv} with the item_id column "
                "and the item features)")
        if needs_items and self.training.distribute.cluster:
            raise ConfigError(f"{where}: training: distribute: " + (
                "task: retrieval" if task == "retrieval" else "training: negatives") +
                " trains on one machine for now; set strategy: none")
        if self.training.negatives.per_positive > 0 and task != "binary":
            raise ConfigError(f"{where}: training: negatives: sampled negatives are for task: "
                              f"binary, got task: {task!r}")
        if needs_items:
            sides = {f.query_side for f in self.features}
            for side, words in ((True, "query-side (tower: user or context)"),
                                (False, "item (tower: item)")):
                if side not in sides:
                    raise ConfigError(f"{where}: features: {task} training needs at least one "
                                      f"{words} feature, found none")

    def feature(self, name: str) -> FeatureConfig:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(name)

    def to_dict(self) -> dict:
        """A plain dict that `experiment_from_dict` reads back (paths stay absolute)."""
        d = dataclasses.asdict(self)
        d.pop("source")
        defaults = {f.name: f.default for f in dataclasses.fields(FeatureConfig)}
        d["features"] = [{k: v for k, v in feat.items() if v != defaults[k] or k in ("name", "kind", "tower")}
                         for feat in d["features"]]
        d["data"]["filters"] = list(d["data"]["filters"])
        return d


# ---------------------------------------------------------------------------------------------
# Loading


def load_experiment(path: str | os.PathLike) -> ExperimentConfig:
    """Reads and validates an experiment YAML file; relative paths are resolved against it."""
    path = os.fspath(path)
    raw = read_yaml(path)
    return experiment_from_dict(raw, base_dir=os.path.dirname(os.path.abspath(path)), source=path)


def load_features(path: str | os.PathLike) -> tuple[FeatureConfig, ...]:
    """Reads a feature spec YAML file (``features: [...]``)."""
    path = os.fspath(path)
    raw = read_yaml(path)
    check_keys(raw, {"features"}, path)
    return features_from_list(raw.get("features"), path)


def experiment_from_dict(raw: dict, base_dir: str = ".", source: str = "<dict>") -> ExperimentConfig:
    check_keys(raw, {"data", "features", "model", "training"}, source)
    for key in ("data", "features"):
        if key not in raw:
            raise ConfigError(f"{source}: missing required key {key!r}")
    features = raw["features"]
    if isinstance(features, str):
        features = load_features(resolve_path(features, base_dir))
    else:
        features = features_from_list(features, source)
    return ExperimentConfig(
        data=_data(raw["data"], base_dir, source),
        features=features,
        model=build_config(ModelConfig, raw.get("model") or {}, f"{source}: model"),
        training=build_config(TrainingConfig, raw.get("training") or {}, f"{source}: training"),
        source=source,
    )


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping (PyYAML keeps the last); the
    YAML files of fm-keras (experiment, search space) are read with it."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node,
                                                                            yaml.ScalarNode):
                continue  # '<<: *base' may be overridden by the keys after it
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str) -> dict:
    """A YAML mapping from `path`; `ConfigError` naming the file (and line) if it is missing,
    malformed, not a mapping or repeats a key."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.load(f, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text: {err.reason} at byte {err.start}") from None
    except (IsADirectoryError, PermissionError) as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def features_from_list(raw, source: str) -> tuple[FeatureConfig, ...]:
    """`FeatureConfig`s from a YAML ``features:`` list; `ConfigError` naming `source`."""
    if not isinstance(raw, list):
        raise ConfigError(f"{source}: features must be a list, got {type(raw).__name__}")
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ConfigError(f"{source}: features[{i}] must be a mapping with a 'name', "
                              f"got {type(item).__name__}")
        if "name" not in item:  # a misspelt 'name' is an unknown key, as any other typo
            where = f"{source}: features[{i}]"
            check_keys(item, {f.name for f in dataclasses.fields(FeatureConfig)}, where)
            raise ConfigError(f"{where}: missing required key 'name'")
        where = f"{source}: feature {item['name']!r}"
        kind = item.get("kind")
        if kind in _KIND_KEYS:
            allowed = {"name", "kind", "tower"} | _KIND_KEYS[kind]
            for key in item:
                if key not in allowed and any(key in keys for keys in _KIND_KEYS.values()):
                    raise ConfigError(f"{where}: key {key!r} does not apply to kind {kind!r}")
        out.append(build_config(FeatureConfig, item, where))
    return tuple(out)


def _data(raw, base_dir: str, source: str) -> DataConfig:
    where = f"{source}: data"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping")
    raw = dict(raw)
    for key in ("train", "valid", "test", "items"):
        if key in raw:
            value = raw[key]
            paths = list(value) if isinstance(value, (list, tuple)) else [value]
            if not all(isinstance(p, str) for p in paths):
                raise ConfigError(f"{where}: {key} must be a path/glob or a list of them")
            raw[key] = tuple(resolve_path(p, base_dir) for p in paths)
    if isinstance(raw.get("out_of_core"), bool):  # YAML reads true/false as booleans
        raw["out_of_core"] = str(raw["out_of_core"]).lower()
    if isinstance(raw.get("shard_dir"), str):
        raw["shard_dir"] = resolve_path(raw["shard_dir"], base_dir)
    filters = raw.pop("filters", None) or []
    if not isinstance(filters, list):
        raise ConfigError(f"{where}: filters must be a list")
    raw["filters"] = tuple(
        build_config(FilterConfig, f, f"{where}: filters[{i}]") for i, f in enumerate(filters)
    )
    return build_config(DataConfig, raw, where)


def resolve_path(path: str, base_dir: str) -> str:
    """`path` with ``~`` expanded, relative paths taken from `base_dir` (the YAML's folder)."""
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))


def build_config(cls, raw, where: str):
    """Builds a config dataclass, checking keys and types against its annotations."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    check_keys(raw, set(fields), where)
    hints = typing.get_type_hints(cls)
    missing = [n for n, f in fields.items() if n not in raw and _required(f)]
    if missing:
        raise ConfigError(f"{where}: missing required key {missing[0]!r}")
    values = {k: _coerce(v, hints[k], f"{where}: {k}") for k, v in raw.items()}
    try:
        return cls(**values)
    except ConfigError as err:
        # __post_init__ messages name the section and key; add the file they came from.
        raise ConfigError(f"{where.split(': ')[0]}: {err}") from None


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _coerce(value, hint, where: str):
    """Checks a YAML value against a type hint; ints are accepted where floats are wanted."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(err)
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"{where}: expected {_hint_name(hint)}, got {value!r}")
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint) and not isinstance(value, hint):
        return build_config(hint, value, where)
    if origin in (tuple, list):
        if isinstance(value, (list, tuple)):
            return origin(_coerce(v, args[0], where) for v in value)
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {_coerce(k, args[0], where): _coerce(v, args[1], where) for k, v in value.items()}
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML reads 1e-5 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: expected {_hint_name(hint)}, got {value!r}")


def _hint_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def check_keys(raw: dict, allowed: set[str], where: str) -> None:
    """`ConfigError` at `where` for a key of `raw` not in `allowed`, with a close match."""
    for key in raw:
        if key not in allowed:
            close = close_match(key, sorted(allowed))
            hint = f" (did you mean {close!r}?)" if close else f"; known keys: {sorted(allowed)}"
            raise ConfigError(f"{where}: unknown key {key!r}{hint}")


def check_one_of(value, choices, where: str) -> None:
    """`ConfigError` at `where` unless `value` is one of `choices`, with a close match."""
    if value not in choices:
        close = close_match(value, choices)
        hint = f" (did you mean {close!r}?)" if close else ""
        raise ConfigError(f"{where} must be one of {list(choices)}, got {value!r}{hint}")


def _at_least(value, low, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
        raise ConfigError(f"{where} must be >= {low}, got {value!r}")
