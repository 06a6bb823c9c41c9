"""The A/B experiment file: unit, salt and arms, each arm a (model, version label or version).

    name: ctr-weighting
    unit: user_id                 # the randomization unit: a column of the events and requests
    salt: ctr-weighting-2026-11   # a new salt re-randomizes; experiments with different salts
                                  # split users independently
    control: naive                # default: the first arm
    arms:
      - {name: naive, model: ctr, label: naive, weight: 0.5}
      - {name: weighted, model: ctr, version: 2, weight: 0.5}
    model_config_file: ../serving/models.config   # optional: where labels are defined
    base: ../saved_models                         # optional: where the versions live

Validated once, at the edge (``load_ab_experiment``), with ``ConfigError`` naming the file and
the key. Weights must sum to 1 and each must be a whole number of the 10,000 buckets (0.0001
steps). An arm is checked against the deployment when the file (or the command line) names one:

- a ``label`` must be a ``version_labels`` key of the arm's model in ``model_config_file``
  (TF Serving's ModelServerConfig: labels exist only there);
- a ``version`` (or the version a label maps to) must be a directory ``<model dir>/<version>``
  with a ``saved_model.pb``, the model dir being ``base/<model>`` or, without ``base``, the
  model's ``base_path`` in ``model_config_file``.

Without either, only the file itself is checked; a live server is checked by
``fm_keras.serving.client.ExperimentClient.check``.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

from fm_keras.config import build_config, check_keys, read_yaml, resolve_path
from fm_keras.errors import ConfigError
from fm_keras.versions import version_path

BUCKETS = 10_000
MAX_BUCKETS = 2**32  # the hash keeps 64 bits: the modulo bias stays below 2^-32 per bucket
# The event log's columns besides the unit's (fm_keras.experiments.events): the unit's
# column cannot have one of these names.
EVENT_COLUMNS = ("arm", "timestamp", "impressions", "clicks")
PRE_PERIOD = "pre_period"
RESERVED_COLUMNS = (*EVENT_COLUMNS, PRE_PERIOD)
# The per-unit metrics `ab report` tests (fm_keras.experiments.analysis).
METRICS = ("clicks_per_user", "ctr")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Arm:
    """One arm: the model version its units are served by.

    Attributes:
        name: the arm's name, as logged in the events' ``arm`` column.
        model: model name on the server (``saved_models/<model>/<version>``).
        weight: share of units, in (0, 1]; a multiple of 1 / buckets.
        label: a version label of ``model`` (TF Serving ``version_labels``), or
        version: a version number. Exactly one of the two.
        recall_model: the recall export built from this ranking model (default
            ``<model>_recall``); used by the simulator.
    """

    name: str
    model: str
    weight: float
    label: str | None = None
    version: int | None = None
    recall_model: str | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ConfigError(f"arm name must be a plain name such as 'control', got {self.name!r}")
        where = f"arm {self.name!r}"
        if not _NAME.fullmatch(self.model):
            raise ConfigError(f"{where}: model must be a model name such as 'ctr', "
                              f"got {self.model!r}")
        if (self.label is None) == (self.version is None):
            raise ConfigError(f"{where}: give exactly one of label (a version label) or "
                              f"version (a number), got label={self.label!r}, "
                              f"version={self.version!r}")
        if self.label is not None and not self.label.strip():
            raise ConfigError(f"{where}: label must be a version label such as 'canary', "
                              f"got {self.label!r}")
        if self.version is not None and self.version < 1:
            raise ConfigError(f"{where}: version must be >= 1, got {self.version}")
        if not 0 < self.weight <= 1:
            raise ConfigError(f"{where}: weight must be in (0, 1], got {self.weight}")

    @property
    def recall(self) -> str:
        """The recall model's name."""
        return self.recall_model or f"{self.model}_recall"

    @property
    def target(self) -> str:
        """``model@label`` or ``model/version``, for messages."""
        return f"{self.model}@{self.label}" if self.label else f"{self.model}/{self.version}"


@dataclass(frozen=True)
class ABExperiment:
    """A validated experiment file. ``arms[0]`` is not special; ``control`` names the baseline.

    Attributes:
        name: experiment name.
        unit: the randomization unit, e.g. ``user_id``: the column of the events holding it.
        salt: hashed with each unit id (``fm_keras.experiments.assignment``).
        arms: two or more arms; weights sum to 1.
        control: the arm the others are compared against.
        buckets: hash buckets the weights are cut from (10,000).
        base: model base directory holding the arms' versions, or None.
        model_config_file: the server's ModelServerConfig (labels), or None.
        source: the file it was read from.
    """

    name: str
    unit: str
    salt: str
    arms: tuple[Arm, ...]
    control: str = ""
    buckets: int = BUCKETS
    base: str | None = None
    model_config_file: str | None = None
    source: str = field(default="<dict>", compare=False)

    def __post_init__(self):
        if not _NAME.fullmatch(self.name):
            raise ConfigError(f"name must be a plain name such as 'ctr-weighting', "
                              f"got {self.name!r}")
        if not self.unit or not self.salt:
            raise ConfigError(f"unit and salt must be non-empty, got unit={self.unit!r}, "
                              f"salt={self.salt!r}")
        if not 2 <= self.buckets <= MAX_BUCKETS:
            raise ConfigError(f"buckets must be in 2..{MAX_BUCKETS:,}, got {self.buckets}")
        if self.unit in RESERVED_COLUMNS:
            raise ConfigError(f"unit: {self.unit!r} is a column of the event schema "
                              f"{list(RESERVED_COLUMNS)}; name the unit's own column, such as "
                              "'user_id'")
        if len(self.arms) < 2:
            raise ConfigError(f"arms: an experiment needs at least 2 arms, got {len(self.arms)}")
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ConfigError(f"arms: arm names must be unique, got {names}")
        total = math.fsum(a.weight for a in self.arms)
        if abs(total - 1.0) > 1e-9:
            raise ConfigError(f"arms: weights sum to {total:g}, not 1 "
                              f"({', '.join(f'{a.name}={a.weight:g}' for a in self.arms)}); "
                              "make them add up to 1")
        for arm in self.arms:
            share = arm.weight * self.buckets
            if abs(share - round(share)) > 1e-6:
                raise ConfigError(f"arms: {arm.name}: weight {arm.weight:g} is not a whole "
                                  f"number of the {self.buckets:,} buckets; use multiples of "
                                  f"{1 / self.buckets:g}")
        if self.control not in names:
            raise ConfigError(f"control: {self.control!r} is not an arm; arms: {names}")

    def arm(self, name: str) -> Arm:
        """The arm called ``name`` (KeyError if none)."""
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise KeyError(name)

    @property
    def arm_names(self) -> list[str]:
        return [a.name for a in self.arms]

    @property
    def weights(self) -> dict[str, float]:
        return {a.name: a.weight for a in self.arms}


_TOP = {"name", "unit", "salt", "arms", "control", "buckets", "base", "model_config_file"}


def load_ab_experiment(path: str | os.PathLike, base: str | None = None,
                       model_config_file: str | None = None) -> ABExperiment:
    """Reads, validates and checks an experiment file against its deployment.

    Args:
        path: the experiment YAML; relative paths in it are resolved against it.
        base: overrides the file's ``base`` (model base directory).
        model_config_file: overrides the file's ``model_config_file``.

    Returns:
        The experiment, with ``base`` and ``model_config_file`` absolute (or None).

    Raises:
        ConfigError: naming the file and the key: unknown keys, weights that do not sum to
            1, an arm whose label or version the deployment does not have.
    """
    path = os.fspath(path)
    raw = read_yaml(path)
    check_keys(raw, _TOP, path)
    for key in ("name", "unit", "salt", "arms"):
        if key not in raw:
            raise ConfigError(f"{path}: missing required key {key!r}")
    if not isinstance(raw["arms"], list):
        raise ConfigError(f"{path}: arms must be a list of mappings")
    arms = tuple(build_config(Arm, a, f"{path}: arms[{i}]") for i, a in enumerate(raw["arms"]))
    here = os.path.dirname(os.path.abspath(path))
    values = {k: raw[k] for k in ("name", "unit", "salt", "buckets") if k in raw}
    values["control"] = raw.get("control") or arms[0].name if arms else ""
    for key, given in (("base", base), ("model_config_file", model_config_file)):
        value = given if given is not None else raw.get(key)
        if value is not None:
            values[key] = resolve_path(str(value), os.getcwd() if given is not None else here)
    experiment = build_config(ABExperiment, {**values, "arms": list(arms), "source": path},
                              path)
    check_deployment(experiment)
    return experiment


def check_deployment(experiment: ABExperiment) -> dict[str, str | None]:
    """Checks each arm against ``model_config_file`` and ``base`` (see the module docstring).

    Returns:
        arm name -> its version directory, or None when no deployment is named.

    Raises:
        ConfigError: an unknown model or label, or a version that is not on disk.
    """
    labels, base_paths = {}, {}
    if experiment.model_config_file:
        from fm_keras.serving.config import load_model_server_config

        try:
            config = load_model_server_config(experiment.model_config_file)
        except ConfigError as err:
            raise ConfigError(f"{experiment.source}: model_config_file: {err}") from None
        for model in config.model_config_list.config:
            labels[model.name] = dict(model.version_labels)
            base_paths[model.name] = model.base_path
    resolved = {}  # labels first: an unknown label is the error to report, not a missing dir
    for i, arm in enumerate(experiment.arms):
        where = f"{experiment.source}: arms[{i}] {arm.name!r}"
        resolved[arm.name] = arm.version
        if arm.label is None or not experiment.model_config_file:
            continue
        if arm.model not in labels:
            raise ConfigError(f"{where}: model {arm.model!r} is not in "
                              f"{experiment.model_config_file} (models: {sorted(labels)})")
        if arm.label not in labels[arm.model]:
            raise ConfigError(f"{where}: label {arm.label!r} is not a version label of model "
                              f"{arm.model!r} in {experiment.model_config_file} (labels: "
                              f"{sorted(labels[arm.model])}); add a version_labels entry "
                              "or fix the arm")
        resolved[arm.name] = labels[arm.model][arm.label]
    out = {}
    for i, arm in enumerate(experiment.arms):
        version = resolved[arm.name]
        model_dir = (os.path.join(experiment.base, arm.model) if experiment.base
                     else base_paths.get(arm.model))
        if version is None or model_dir is None:
            out[arm.name] = None
            continue
        version_dir = version_path(model_dir, version)  # 00000002 too, as the server reads
        if not os.path.isfile(os.path.join(version_dir, "saved_model.pb")):
            raise ConfigError(f"{experiment.source}: arms[{i}] {arm.name!r}: {arm.target} -> "
                              f"version {version} has no SavedModel at {version_dir}; export "
                              "it or fix the arm")
        out[arm.name] = version_dir
    return out
