"""``ab simulate``: an online A/B test between exports on the synthetic users of ``fm-keras synth``.

The loop a production system runs, with the truth known:

1. every user of the synthetic population (or a seeded sample) is assigned to an arm by the
   experiment's salted hash (``assignment.Assigner``);
2. each user makes ``1 + Poisson(lambda_u)`` requests, lambda_u proportional to the user's
   activity in the logs (power law) with mean ``sessions - 1``, capped at 30, each with a
   device and hour drawn like the logs';
3. the arm's recall export returns ``candidates`` items for the request (the FM's user
   tower + index), its ranking export scores them (``serving_default``, calibrated
   probability) and the top ``slate`` are shown;
4. each shown item is clicked with the planted FM's true probability for that (user, item,
   device, hour) (``synth.SyntheticWorld.click_probability``): no model is asked for the truth;
5. one event row per request is written (``events`` schema), with each user's pre-period
   clicks (the same number of requests served by the control arm before the experiment) for
   CUPED.

Recommendation runs in process on the exports (TensorFlow), not through a server.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from fm_keras.errors import ConfigError, DataError
from fm_keras.experiments.assignment import Assigner
from fm_keras.experiments.config import ABExperiment, Arm, check_deployment

DAY = 86_400


@dataclass(frozen=True)
class SimulationSpec:
    """How the synthetic experiment runs.

    Attributes:
        users: units in the experiment (a seeded sample of the population; None = all).
        sessions: mean requests per user in the experiment (and in the pre-period) before
            the heaviest users are capped at 31.
        slate: items shown per request (impressions).
        candidates: items the recall export returns and the ranking export re-ranks.
        days: experiment length; request timestamps are uniform over it.
        start: Unix seconds of the experiment's start.
        pre_period: log each user's pre-period clicks under the control arm (CUPED).
        true_lift: serve the pre-period requests with every other arm too, for the true lift.
        batch_requests: requests per recall / ranking call.
        seed: seeds the users, requests and clicks.
    """

    users: int | None = None
    sessions: float = 3.0
    slate: int = 10
    candidates: int = 100
    days: int = 14
    start: int = 1_704_067_200
    pre_period: bool = True
    true_lift: bool = True
    batch_requests: int = 500
    seed: int = 0

    def __post_init__(self):
        for name, low in (("sessions", 1.0), ("slate", 1), ("candidates", 1), ("days", 1),
                          ("batch_requests", 1)):
            if not getattr(self, name) >= low:  # NaN fails too
                raise ConfigError(f"--{name} must be >= {low}, got {getattr(self, name)}")
        if self.users is not None and self.users < 2:
            raise ConfigError(f"--users must be >= 2, got {self.users}")
        if self.candidates < self.slate:
            raise ConfigError(f"--candidates ({self.candidates}) must be >= --slate "
                              f"({self.slate})")


class ArmRecommender:
    """Recall + ranking for one arm, in process.

    Args:
        ranking_dir: the arm's ranking version directory.
        recall_dir: a recall export built from that version.
        catalog: the item catalog file (the recall export's, by default).
    """

    def __init__(self, ranking_dir: str, recall_dir: str, catalog: str | None = None):
        from fm_keras.interactions import read_catalog
        from fm_keras.servables import load_export

        _, self.ranking, meta = load_export(ranking_dir, expect="fm_keras.ranking")
        _, self.recall, recall_meta = load_export(recall_dir, expect="fm_keras.recall")
        self.k = int(recall_meta["k"])
        ids, self.item_columns = read_catalog(catalog or recall_meta["catalog"], meta,
                                              recall_meta["id_column"])
        self.position = {item_id: i for i, item_id in enumerate(ids)}
        self.item_ids = ids
        self._rank_inputs = self.ranking.signatures["serving_default"] \
            .structured_input_signature[1]
        self._recall_inputs = self.recall.signatures["serving_default"] \
            .structured_input_signature[1]

    def slates(self, query: dict[str, np.ndarray], slate: int, candidates: int) -> np.ndarray:
        """Top ``slate`` catalog positions per request: int64 [requests, slate].

        Args:
            query: user + context feature columns (strings or numbers), [requests] each.
            slate: items per request.
            candidates: recall depth (at most the index's k) re-ranked by the ranking export.
        """
        from fm_keras._tf import tf

        recalled = self.recall.signatures["serving_default"](
            **_tensors(self._recall_inputs, query))["item_ids"].numpy()[:, :candidates]
        pos = np.vectorize(lambda b: self.position[b.decode()], otypes=[np.int64])(recalled)
        n, c = pos.shape
        rows = {name: np.repeat(np.asarray(col), c) for name, col in query.items()}
        rows.update({name: col[pos.ravel()] for name, col in self.item_columns.items()})
        prob = self.ranking.signatures["serving_default"](
            **_tensors(self._rank_inputs, rows))["probability"]
        prob = tf.reshape(prob, [n, c]).numpy()
        best = np.argsort(-prob, axis=1, kind="stable")[:, :slate]
        return np.take_along_axis(pos, best, axis=1)


def recall_export_for(base: str, arm: Arm, ranking_dir: str) -> str:
    """The newest version of ``base/<arm.recall>`` built from ``ranking_dir``.

    Raises:
        ConfigError: none of its versions was indexed from that ranking version.
    """
    from fm_keras.servables import read_metadata
    from fm_keras.versions import version_names

    model_dir = os.path.join(base, arm.recall)
    names = version_names(model_dir) if os.path.isdir(model_dir) else {}
    for v in sorted(names, reverse=True):
        meta = read_metadata(os.path.join(model_dir, names[v]))
        if os.path.abspath(meta.get("ranking_model", "")) == os.path.abspath(ranking_dir):
            return os.path.join(model_dir, names[v])
    raise ConfigError(f"arm {arm.name!r}: no version of {model_dir} was indexed from "
                      f"{ranking_dir}; build one with 'fm-keras index --model {ranking_dir} "
                      f"--name {arm.recall} ...'")


def simulate(experiment: ABExperiment, data_dir: str, out_events: str,
             spec: SimulationSpec = SimulationSpec(), name: str | None = None) -> dict:
    """Runs the simulated experiment and writes the events file (see the module docstring).

    Args:
        experiment: its arms resolvable to version directories (``base`` and, for labels,
            ``model_config_file``; or a ``model_config_file`` alone, by its base paths).
        data_dir: a ``fm-keras synth`` output directory (oracle.json: the planted FM).
        out_events: the events file to write (.parquet or .csv), atomically.
        spec: the simulation's settings.
        name: the events file's path to name in the log line and the result when
            ``out_events`` is a temp path renamed later (``ab simulate``'s ``--out``);
            default ``out_events``.

    Returns:
        ``{"events", "users", "requests": {arm: n}, "true_lift": {arm: lift}, "seconds",
        "spec"}``; ``true_lift`` (with ``spec.true_lift``) is each arm's relative lift over
        control in expected clicks per user, from the planted FM's probabilities, with both
        arms serving the same (pre-period) requests: the value the experiment estimates.
    """
    from fm_keras.experiments.events import write_table
    from fm_keras.synth import load_world
    from fm_keras.progress import log

    started = time.time()
    versions = check_deployment(experiment)
    missing = [a for a, v in versions.items() if v is None]
    if missing:
        raise ConfigError(f"{experiment.source}: the simulator loads each arm's exports: give "
                          "base (the model base directory; --base) and, for labels, "
                          f"model_config_file (--model_config_file); unresolved arms: {missing}")
    world = load_world(data_dir)
    rng = np.random.default_rng(spec.seed)
    population = world.spec.users
    users = (np.arange(population) if spec.users is None or spec.users >= population
             else np.sort(rng.choice(population, spec.users, replace=False)))
    arms = Assigner(experiment).assign([f"u{u}" for u in users])
    # The recall model lives beside the ranking model: <base>/<model>/<v> -> <base>/<recall>.
    recommenders = {a.name: ArmRecommender(versions[a.name], recall_export_for(
        os.path.dirname(os.path.dirname(versions[a.name])), a, versions[a.name]))
        for a in experiment.arms}
    rate = np.minimum((spec.sessions - 1) * population * world.user_activity[users], 30.0)
    frames, counts = [], {}
    for arm in experiment.arm_names:
        mine = users[arms == arm]
        requests = np.repeat(mine, 1 + rng.poisson(rate[arms == arm]))
        counts[arm] = len(requests)
        log(f"simulating {len(mine):,} users, {len(requests):,} requests on arm {arm!r}")
        device, hour = _contexts(world, len(requests), rng)
        clicks, _ = _serve(world, recommenders[arm], requests, device, hour, spec, rng)
        frames.append(pd.DataFrame({
            experiment.unit: [f"u{u}" for u in requests], "arm": arm,
            "timestamp": spec.start + rng.integers(0, spec.days * DAY, len(requests)),
            "impressions": spec.slate, "clicks": clicks}))
    events = pd.concat(frames, ignore_index=True).sort_values("timestamp", kind="stable")
    # The pre-period: every user, requests drawn the same way, served by the control arm.
    requests = np.repeat(users, 1 + rng.poisson(rate))
    device, hour = _contexts(world, len(requests), rng)
    log(f"simulating the pre-period: {len(requests):,} requests on arm {experiment.control!r}")
    clicks, expected = _serve(world, recommenders[experiment.control], requests, device, hour,
                              spec, rng)
    if spec.pre_period:
        pre = pd.Series(np.bincount(np.searchsorted(users, requests), weights=clicks,
                                    minlength=len(users)), index=[f"u{u}" for u in users])
        events["pre_period"] = pre.loc[events[experiment.unit]].to_numpy()
    true_lift = {}
    if spec.true_lift:  # the same pre-period requests served by every other arm
        for arm in experiment.arm_names:
            if arm != experiment.control:
                log(f"the true lift: the same requests on arm {arm!r}")
                _, counterfactual = _serve(world, recommenders[arm], requests, device, hour,
                                           spec, rng)
                true_lift[arm] = float(counterfactual.sum() / expected.sum() - 1)
    if events.empty:
        raise DataError(f"{data_dir}: the simulation produced no events")
    write_table(events, out_events)
    seconds = round(time.time() - started, 1)
    log(f"wrote {len(events):,} events to {name or out_events} in {seconds}s")
    return {"events": name or out_events, "users": int(len(users)), "requests": counts,
            "true_lift": true_lift, "seconds": seconds, "spec": asdict(spec)}


def _contexts(world, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(device index, hour) of ``n`` requests, drawn like the logs'."""
    return rng.choice(len(world.DEVICES), n, p=world.DEVICE_SHARES), rng.integers(0, 24, n)


def _serve(world, recommender: ArmRecommender, users: np.ndarray, device: np.ndarray,
           hour: np.ndarray, spec: SimulationSpec, rng: np.random.Generator):
    """Serves requests of ``users`` in contexts (device, hour) with ``recommender``; clicks are
    drawn from ``world`` (a ``synth.SyntheticWorld``).

    Returns:
        (clicks per request: int64 [n], expected clicks per request: float64 [n]).
    """
    n = len(users)
    clicks, expected = np.zeros(n, dtype=np.int64), np.zeros(n)
    candidates = min(spec.candidates, recommender.k)
    for lo in range(0, n, spec.batch_requests):
        s = slice(lo, lo + spec.batch_requests)
        query = {"user_id": np.array([f"u{u}" for u in users[s]], dtype=object),
                 "user_segment": np.array([f"s{g}" for g in world.user_segment[users[s]]],
                                          dtype=object),
                 "device": np.array(world.DEVICES, dtype=object)[device[s]],
                 "hour": hour[s].astype(str).astype(object)}
        shown = recommender.slates(query, spec.slate, candidates)
        items = np.char.lstrip(recommender.item_ids[shown].astype(str), "i").astype(np.int64)
        b = shown.shape[0]
        p = world.click_probability(np.repeat(users[s], spec.slate), items.ravel(),
                                    np.repeat(device[s], spec.slate),
                                    np.repeat(hour[s], spec.slate)).reshape(b, spec.slate)
        clicks[s] = (rng.random(p.shape) < p).sum(axis=1)
        expected[s] = p.sum(axis=1)
    return clicks, expected


def _tensors(signature_inputs: dict, columns: dict[str, np.ndarray]) -> dict:
    """Signature keyword tensors from columns: strings as tf.string, numbers as float32."""
    from fm_keras._tf import tf

    out = {}
    for name, spec in signature_inputs.items():
        if name not in columns:
            raise DataError(f"the export needs input {name!r}, which the simulator does not "
                            f"provide (it has {sorted(columns)}); the simulator serves "
                            "'fm-keras synth' feature sets")
        col = np.asarray(columns[name])
        out[name] = tf.constant(col.astype(str) if spec.dtype == tf.string
                                else col.astype(np.float32))
    return out

