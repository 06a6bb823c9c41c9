"""Pipeline definitions (``pipelines/*.yaml``): frozen dataclasses validated once, at the edge.

Paths are resolved relative to the YAML file. ``{SPAN}`` in ``data.input`` stands for the span
number: a run is for the newest span on disk, or the one given with ``--span``, and reads the
rolling window of ``data.spans`` spans ending there (TFX's RollingRange). See
``pipelines/template.yaml`` for every key with its meaning.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field

from fm_keras.config import (FeatureConfig, FilterConfig, ModelConfig, TrainingConfig,
                             build_config, check_keys, check_one_of, features_from_list,
                             load_features, read_yaml, resolve_path)
from fm_keras.errors import ConfigError

SEVERITIES = ("fail", "warn")
SPLITS = ("time", "hash")
INFRA_MODES = ("subprocess", "in_process")


@dataclass(frozen=True)
class SplitConfig:
    """How ExampleGen splits a span: the last ``eval_fraction`` by time, or by key hash."""

    by: str = "time"
    column: str = "ts"
    eval_fraction: float = 0.2

    def __post_init__(self):
        check_one_of(self.by, SPLITS, "data: split: by")
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"data: split: eval_fraction must be in (0, 1), got {self.eval_fraction}")


@dataclass(frozen=True)
class InputConfig:
    """ExampleGen: which logs, how to clean, de-duplicate and split them.

    ``spans``: the rolling window of spans a run reads (TFX's RollingRange ``num_spans``): a
    run for span S reads spans S-spans+1 .. S as one data set; 1 reads span S alone.
    """

    input: tuple[str, ...]
    label: str
    items: str = ""
    filters: tuple[FilterConfig, ...] = ()
    dedup_keys: tuple[str, ...] = ()
    split: SplitConfig = field(default_factory=SplitConfig)
    spans: int = 1

    def __post_init__(self):
        if isinstance(self.spans, bool) or not isinstance(self.spans, int) or self.spans < 1:
            raise ConfigError(f"data: spans must be an integer >= 1 (the rolling window of "
                              f"spans a run reads, e.g. 7 for daily spans), got {self.spans!r}")


@dataclass(frozen=True)
class SpanWindow:
    """The rolling window of spans of one run: span numbers ``first`` .. ``last`` (the run's
    span), of which ``spans`` have files on disk and ``missing`` do not."""

    first: int | None
    last: int | None
    spans: tuple = ()
    missing: tuple = ()

    @classmethod
    def single(cls, span: int | None) -> "SpanWindow":
        """The window of one span (``data.spans: 1``), read whether or not it is on disk."""
        return cls(span, span, (span,), ())

    @classmethod
    def from_dict(cls, raw: dict | None, span: int | None) -> "SpanWindow":
        """The window recorded in a run (`as_dict`); a run recorded before windows: `span`."""
        if not raw:
            return cls.single(span)
        return cls(raw["first"], raw["last"], tuple(raw["spans"]), tuple(raw["missing"]))

    def as_dict(self) -> dict:
        return {"first": self.first, "last": self.last, "spans": list(self.spans),
                "missing": list(self.missing), "text": self.describe()}

    def describe(self) -> str:
        """In words: ``span 5``, ``spans 3-5``, ``spans 3-5 (span 4 missing)``."""
        if self.first == self.last:
            text = f"span {self.last}"
        else:
            text = f"spans {self.first}-{self.last}"
        if self.missing:
            many = len(self.missing) > 1
            text += (f" ({'spans' if many else 'span'} {', '.join(map(str, self.missing))} "
                     f"missing)")
        return text


@dataclass(frozen=True)
class DriftCheck:
    """An anomaly on a number: above ``max`` it is an anomaly with this severity."""

    max: float
    severity: str = "fail"

    def __post_init__(self):
        check_one_of(self.severity, SEVERITIES, "validation: severity")


@dataclass(frozen=True)
class ValidationConfig:
    """Severity of each anomaly found against the last validated schema.

    Attributes:
        missing_column: a feature or label column is missing from the new span.
        missing_unused_column: a column of the last schema that the model does not read
            (neither a feature nor the label) is missing from the new span. The filter,
            split and dedup_keys columns need no check here: ExampleGen fails without them.
        retyped_column: a column changed type (numeric <-> string).
        new_column: a column the schema does not have.
        label_rate_drift: relative change of the positive rate, |new / old - 1|.
        oov_rate_drift: increase of the share of categorical values the last schema never saw.
    """

    missing_column: str = "fail"
    missing_unused_column: str = "warn"
    retyped_column: str = "fail"
    new_column: str = "warn"
    label_rate_drift: DriftCheck = DriftCheck(max=0.5, severity="fail")
    oov_rate_drift: DriftCheck = DriftCheck(max=0.2, severity="warn")

    def __post_init__(self):
        for name in ("missing_column", "missing_unused_column", "retyped_column",
                     "new_column"):
            check_one_of(getattr(self, name), SEVERITIES, f"validation: {name}")


@dataclass(frozen=True)
class EvaluatorConfig:
    """Blessing: value thresholds (None = not checked) and regression against the last blessed
    model on the same eval rows."""

    min_auc: float | None = 0.6
    max_logloss: float | None = None
    max_calibration_error: float | None = 0.25  # |mean predicted / observed rate - 1|
    max_ece: float | None = None
    min_ann_recall_at_k: float | None = None  # ANN fidelity: ScaNN top-K vs exact search
    ann_recall_queries: int = 200
    max_auc_regression: float = 0.01
    max_logloss_regression: float = 0.01
    # task: retrieval is blessed on the model's Recall@K over the catalog (exact search, each
    # user's train items excluded) instead of AUC / logloss / calibration.
    recall_at: int = 50
    min_recall: float | None = None
    max_recall_regression: float = 0.01

    def __post_init__(self):
        if isinstance(self.recall_at, bool) or self.recall_at < 1:
            raise ConfigError(f"evaluator: recall_at must be >= 1, got {self.recall_at!r}")


@dataclass(frozen=True)
class TuneConfig:
    """A tuning budget for the Trainer (like TFX's Tuner ahead of its Trainer): `trials`
    Optuna trials over the default search space (`fm_keras.search_space`; trial 0 is the
    pipeline's own training settings), starting none after `timeout_s` seconds."""

    trials: int
    timeout_s: float | None = None
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.trials, bool) or self.trials < 1:
            raise ConfigError(f"trainer: tune: trials must be >= 1, got {self.trials!r}")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ConfigError(f"trainer: tune: timeout_s must be > 0, got {self.timeout_s!r}")


@dataclass(frozen=True)
class TrainerConfig:
    """warm_start: start from the last blessed model's vocabularies and weights.
    tune: search hyperparameters first (`TuneConfig`) and train the candidate with the best;
    the candidate is the best trial's run."""

    warm_start: bool = False
    tune: TuneConfig | None = None

    def __post_init__(self):
        if self.warm_start and self.tune is not None:
            raise ConfigError("trainer: warm_start and tune exclude each other (a warm start "
                              "keeps the last model's embedding_dim and vocabularies); set one")


@dataclass(frozen=True)
class InfraValidatorConfig:
    """mode: ``subprocess`` (``fm-keras serve`` on a free loopback port) or ``in_process``."""

    mode: str = "subprocess"
    timeout_seconds: float = 120.0

    def __post_init__(self):
        check_one_of(self.mode, INFRA_MODES, "infra_validator: mode")


@dataclass(frozen=True)
class PusherConfig:
    """Where blessed models go: ``base/NAME/<version>``, and the ModelServerConfig file the
    server polls (``--model_config_file`` with ``--model_config_file_poll_wait_seconds``)."""

    base: str
    model_config_file: str


@dataclass(frozen=True)
class IndexConfig:
    """IndexBuilder: the recall model NAME_recall over ``data.items`` (None = sized by
    catalog; set the three ScaNN numbers to force a tree + hashing index; for the
    ``partitioned`` backend they are its partitions, partitions searched and int8 shortlist)."""

    enabled: bool = True
    k: int = 100
    backend: str = "scann"
    num_leaves: int | None = None
    leaves_to_search: int | None = None
    reorder: int | None = None

    def __post_init__(self):
        check_one_of(self.backend, ("scann", "brute_force", "partitioned"), "index: backend")
        given = [v is not None for v in (self.num_leaves, self.leaves_to_search, self.reorder)]
        if any(given) and not all(given):
            raise ConfigError("index: set num_leaves, leaves_to_search and reorder together")


@dataclass(frozen=True)
class PipelineConfig:
    """A whole pipeline, paths resolved."""

    name: str
    root: str
    data: InputConfig
    features: tuple[FeatureConfig, ...]
    pusher: PusherConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    evaluator: EvaluatorConfig = field(default_factory=EvaluatorConfig)
    infra_validator: InfraValidatorConfig = field(default_factory=InfraValidatorConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    source: str = ""

    @property
    def recall_name(self) -> str:
        return f"{self.name}_recall"

    def span_patterns(self, span: int) -> tuple[str, ...]:
        return tuple(p.replace("{SPAN}", str(span)) for p in self.data.input)

    def window_patterns(self, window: SpanWindow) -> tuple[str, ...]:
        """The globs of every span of `window` on disk, oldest span first; the run's own span
        alone when it is not on disk (ExampleGen then fails as without a window: a run never
        trains on older spans only)."""
        spans = window.spans if window.last in window.spans else (window.last,)
        return tuple(p for span in spans for p in self.span_patterns(span))

    def span_window(self, span: int | None) -> SpanWindow:
        """The rolling window of ``data.spans`` spans ending at `span`: span numbers
        ``span - spans + 1`` .. `span`, starting no earlier than the first span on disk; the
        spans of it on disk are read, the others reported missing (`span` itself missing:
        see `window_patterns`)."""
        if span is None or self.data.spans == 1:
            return SpanWindow.single(span)
        on_disk = self._spans_found() or []
        first = min(max(span - self.data.spans + 1, on_disk[0] if on_disk else 0), span)
        inside = [s for s in on_disk if first <= s <= span]
        return SpanWindow(first, span, tuple(inside),
                          tuple(s for s in range(first, span + 1) if s not in inside))

    def check_items(self) -> None:
        """Raises `ConfigError` (naming the YAML and the path) if ``data.items`` is set and
        is not a file: checked before a run does any work (the evaluator and the index
        builder read it, after training)."""
        items = self.data.items
        if items and not os.path.isfile(items):
            raise ConfigError(f"{self.source}: data: items: {items}: "
                              + ("is not a file" if os.path.exists(items) else "no such file"))

    def latest_span(self) -> int | None:
        """The highest span number with files on disk (None if no pattern has ``{SPAN}``).

        Raises:
            ConfigError: no file matches any pattern for any span.
        """
        spans = self._spans_found()
        if spans is None:
            return None
        if not spans:
            raise ConfigError(f"{self.source}: data: input: no files match "
                              f"{list(self.data.input)} for any span")
        return spans[-1]

    def _spans_found(self) -> list[int] | None:
        """The span numbers with files on disk, ascending (None if a pattern has no
        ``{SPAN}``)."""
        spans: set[int] = set()
        for pattern in self.data.input:
            if "{SPAN}" not in pattern:
                return None
            regex = re.compile(re.escape(pattern).replace(re.escape("{SPAN}"), r"(\d+)")
                               .replace(r"\*", "[^/]*").replace(r"\?", "."))
            for path in glob.glob(pattern.replace("{SPAN}", "*")):
                match = regex.fullmatch(path)
                if match:
                    spans.add(int(match.group(1)))
        return sorted(spans)


_TOP = {"name", "root", "data", "features", "model", "training", "trainer", "validation",
        "evaluator", "infra_validator", "pusher", "index"}


# Keys renamed when the model's Recall@K (task: retrieval) arrived: these measure the ANN
# index against exact search, not the model.
RENAMED_EVALUATOR_KEYS = {"min_recall_at_k": "min_ann_recall_at_k",
                          "recall_queries": "ann_recall_queries"}


def _evaluator_keys(raw, path: str):
    for old, new in RENAMED_EVALUATOR_KEYS.items():
        if isinstance(raw, dict) and old in raw:
            raise ConfigError(f"{path}: evaluator: {old} is now {new} (the ScaNN index's recall "
                              "against exact search, i.e. ANN fidelity); rename the key. The "
                              "model's own Recall@K (task: retrieval) is min_recall")
    return raw


def load_pipeline(path: str | os.PathLike) -> PipelineConfig:
    """Reads and validates a pipeline YAML; ConfigError names the key and the fix."""
    path = os.fspath(path)
    raw = read_yaml(path)
    base = os.path.dirname(os.path.abspath(path))
    check_keys(raw, _TOP, path)
    for key in ("name", "root", "data", "features", "pusher"):
        if key not in raw:
            raise ConfigError(f"{path}: missing required key {key!r}")
    name = raw["name"]
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", name):
        raise ConfigError(f"{path}: name must be a plain model name such as 'ctr', got {name!r}")
    features = raw["features"]
    features = (load_features(resolve_path(features, base)) if isinstance(features, str)
                else features_from_list(features, path))
    pusher = build_config(PusherConfig, raw["pusher"], f"{path}: pusher")
    pusher = PusherConfig(base=resolve_path(pusher.base, base),
                          model_config_file=resolve_path(pusher.model_config_file, base))
    validation = dict(raw.get("validation") or {})
    for key in ("label_rate_drift", "oov_rate_drift"):
        if key in validation:
            validation[key] = build_config(DriftCheck, validation[key],
                                           f"{path}: validation: {key}")
    config = PipelineConfig(
        name=name, root=resolve_path(str(raw["root"]), base), data=_input(raw["data"], base, path),
        features=features, pusher=pusher,
        model=build_config(ModelConfig, raw.get("model") or {}, f"{path}: model"),
        training=build_config(TrainingConfig, raw.get("training") or {}, f"{path}: training"),
        trainer=build_config(TrainerConfig, raw.get("trainer") or {}, f"{path}: trainer"),
        validation=build_config(ValidationConfig, validation, f"{path}: validation"),
        evaluator=build_config(EvaluatorConfig, _evaluator_keys(raw.get("evaluator") or {}, path),
                         f"{path}: evaluator"),
        infra_validator=build_config(InfraValidatorConfig, raw.get("infra_validator") or {},
                               f"{path}: infra_validator"),
        index=build_config(IndexConfig, raw.get("index") or {}, f"{path}: index"),
        source=path)
    names = {f.name for f in features}
    if config.data.label in names:
        raise ConfigError(f"{path}: data: the label {config.data.label!r} is also a feature")
    if config.index.enabled and not config.data.items:
        raise ConfigError(f"{path}: index: enabled needs data: items (the item catalog); "
                          "set it, or index: {enabled: false}")
    return config


def _input(raw, base: str, path: str) -> InputConfig:
    where = f"{path}: data"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping")
    raw = dict(raw)
    if "input" not in raw:
        raise ConfigError(f"{where}: missing required key 'input' (CSV/Parquet globs, "
                          "e.g. logs/span-{{SPAN}}/*.csv)")
    value = raw["input"]
    patterns = list(value) if isinstance(value, (list, tuple)) else [value]
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise ConfigError(f"{where}: input must be a path/glob or a list of them")
    raw["input"] = tuple(resolve_path(p, base) for p in patterns)
    if raw.get("items"):
        raw["items"] = resolve_path(str(raw["items"]), base)
    raw["filters"] = tuple(build_config(FilterConfig, f, f"{where}: filters[{i}]")
                           for i, f in enumerate(raw.get("filters") or []))
    raw["dedup_keys"] = tuple(raw.get("dedup_keys") or ())
    raw["split"] = build_config(SplitConfig, raw.get("split") or {}, f"{where}: split")
    data = build_config(InputConfig, raw, where)
    if data.spans > 1 and not all("{SPAN}" in p for p in data.input):
        raise ConfigError(f"{where}: spans: {data.spans} (a rolling window of spans) needs "
                          "{SPAN} in every data: input pattern, e.g. logs/span-{SPAN}/*.csv; "
                          "set it, or spans: 1")
    return data
