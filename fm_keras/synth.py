"""A synthetic CTR data set drawn from a planted Factorization Machine.

Users and items have power-law activity and popularity. Features: user_id and user_segment
(user tower); item_id, item_category, item_tags (multi-hot) and item_price (numeric) (item
tower); device and hour (context). Labels are Bernoulli(sigmoid(planted FM)) with a base rate
near 5%. A share of rows are cached exposures (``is_cached=1``): the frontend cache replayed a
popular item and a later click was joined to it, so their labels are noise that overstates
those items. Because the truth is known, ``oracle.json`` gives the best test AUC and logloss
any model could reach.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from fm_keras import fsutil
from fm_keras.errors import ConfigError

K_TRUE = 10


@dataclass(frozen=True)
class SynthSpec:
    rows: int = 1_000_000
    users: int = 20_000
    items: int = 5_000
    segments: int = 24
    categories: int = 40
    tags: int = 120
    cached_share: float = 0.15
    cached_items: int = 50
    cached_click_rate: float = 0.3
    target_rate: float = 0.05
    seed: int = 7


def _zipf_probs(n: int, exponent: float) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1) ** exponent
    return p / p.sum()


class PlantedFM:
    """The true model: per-feature linear weights and factors with chosen scales."""

    def __init__(self, spec: SynthSpec, rng: np.random.Generator):
        def table(n, w_scale, v_scale):
            return rng.normal(0, w_scale, n), rng.normal(0, v_scale, (n, K_TRUE))

        self.params = {
            "user_id": table(spec.users, 0.03, 0.02),
            "user_segment": table(spec.segments, 0.3, 0.3),
            "item_id": table(spec.items, 0.1, 0.03),
            "item_category": table(spec.categories, 0.3, 0.3),
            "item_tags": table(spec.tags, 0.2, 0.3),
            "device": table(3, 0.2, 0.3),
            "hour": table(24, 0.15, 0.2),
            "item_price": table(1, 0.3, 0.3),
        }
        self.bias = 0.0

    def logit(self, rows: dict[str, np.ndarray], tag_ids: np.ndarray, tag_w: np.ndarray,
              price_x: np.ndarray) -> np.ndarray:
        """FM logit of rows; tags as ids [n, t] with weights [n, t] (0 = padding)."""
        n = len(price_x)
        lin = np.full(n, self.bias)
        summed = np.zeros((n, K_TRUE))
        squares = np.zeros(n)
        slots = [(name, rows[name], np.ones(n)) for name in
                 ("user_id", "user_segment", "item_id", "item_category", "device", "hour")]
        slots += [("item_tags", tag_ids[:, j], tag_w[:, j]) for j in range(tag_ids.shape[1])]
        slots.append(("item_price", np.zeros(n, dtype=np.int64), price_x))
        for name, ids, x in slots:
            w, v = self.params[name]
            vx = v[ids] * x[:, None]
            lin += w[ids] * x
            summed += vx
            squares += np.sum(vx ** 2, axis=1)
        return lin + 0.5 * (np.sum(summed ** 2, axis=1) - squares)


def generate(out_dir: str, rows: int = SynthSpec.rows, seed: int = SynthSpec.seed) -> dict:
    """Writes train/valid/test CSVs, items.csv, features.yaml, experiment.yaml, oracle.json.

    Rows are drawn and written `BLOCK_ROWS` at a time (each block in its own consecutive time
    window, the planted bias fitted on the first), so memory does not grow with `rows`; a set
    of up to `BLOCK_ROWS` rows is one block.
    """
    if rows < 1000:
        raise ConfigError(f"--rows must be at least 1000, got {rows}")
    spec = SynthSpec(rows=rows, seed=seed)
    rng = np.random.default_rng(seed)
    truth = PlantedFM(spec, rng)
    items = item_catalog(spec, rng)
    n = spec.rows
    os.makedirs(out_dir, exist_ok=True)
    bounds = [0, int(0.8 * n), int(0.9 * n), n]
    names = [os.path.join(out_dir, f"{name}.csv") for name in ("train", "valid", "test")]
    test_rows = []  # (label, prob, cached) of the test rows, for the oracle
    for lo, hi, first in _blocks(n):
        # One block at a time: memory is one block's, whatever the rows. The bias is fitted
        # on the first block; later blocks keep it (one block is the whole set up to 1M).
        frame, prob, cached = _rows(replace(spec, rows=hi - lo), truth, items, rng,
                                    start=1_700_000_000 + 30 * 86400 * lo // n,
                                    days=30 * (hi - lo) / n, fit_bias=first)
        for path, a, b in zip(names, bounds, bounds[1:]):
            if max(a, lo) < min(b, hi):  # append to a split begun in an earlier block
                _write_csv(frame.iloc[max(a, lo) - lo:min(b, hi) - lo], path, append=a < lo)
        t = max(bounds[2], lo) - lo
        if t < hi - lo:
            test_rows.append((frame["click"].to_numpy()[t:], prob[t:], cached[t:]))
        del frame
    label, prob, cached = (np.concatenate(parts) for parts in zip(*test_rows))
    _write_csv(_catalog_frame(spec, items), os.path.join(out_dir, "items.csv"))
    fsutil.write_text(os.path.join(out_dir, "features.yaml"), FEATURES_YAML)
    fsutil.write_text(os.path.join(out_dir, "experiment.yaml"), EXPERIMENT_YAML)
    oracle = _oracle(label, prob, cached, spec)
    fsutil.write_json(os.path.join(out_dir, "oracle.json"), oracle)
    return oracle


def generate_span(root: str, span: int, rows: int = 50_000, seed: int = SynthSpec.seed,
                  shuffle_labels: bool = False, schema_change: bool = False) -> str:
    """Writes one span of logs, ``root/span-N/part-0.csv``, plus ``root/items.csv``.

    Every span of one seed shares the planted FM and the item catalog; span N covers the N-th
    week after the base time and holds different rows. Two switches make a broken span for
    pipeline tests: ``shuffle_labels`` permutes the clicks among cached and among other rows (the rates stay,
    a model learns nothing), and
    ``schema_change`` renames ``item_id`` to ``item`` (a breaking schema change).

    Returns:
        The span directory.
    """
    if span < 1:
        raise ConfigError(f"--span must be at least 1, got {span}")
    if rows < 1000:
        raise ConfigError(f"--rows must be at least 1000, got {rows}")
    spec = SynthSpec(rows=rows, seed=seed)
    rng = np.random.default_rng(seed)
    truth = PlantedFM(spec, rng)  # drawn first from the seed alone: the same in every span
    items = item_catalog(spec, rng)
    rng = np.random.default_rng([seed, span])
    frame, _, _ = _rows(spec, truth, items, rng, start=1_700_000_000 + (span - 1) * 7 * 86400,
                        days=7)
    if shuffle_labels:  # within cached and user-initiated rows: the click rates stay the same
        clicks = frame["click"].to_numpy().copy()
        for group in (frame["is_cached"].to_numpy() == 0, frame["is_cached"].to_numpy() == 1):
            clicks[group] = rng.permutation(clicks[group])
        frame["click"] = clicks
    if schema_change:
        frame = frame.rename(columns={"item_id": "item"})
    out = os.path.join(root, f"span-{span}")
    os.makedirs(out, exist_ok=True)
    _write_csv(frame, os.path.join(out, "part-0.csv"))
    _write_csv(_catalog_frame(spec, items), os.path.join(root, "items.csv"))
    fsutil.write_text(os.path.join(root, "features.yaml"), FEATURES_YAML)
    return out


BLOCK_ROWS = 1_000_000  # rows drawn and written at a time


def _blocks(n: int):
    """(lo, hi, is_first) row ranges of at most `BLOCK_ROWS` rows covering [0, n)."""
    for lo in range(0, n, BLOCK_ROWS):
        yield lo, min(n, lo + BLOCK_ROWS), lo == 0


def _rows(spec: SynthSpec, truth: PlantedFM, items: dict, rng: np.random.Generator,
          start: int, days: float, fit_bias: bool = True):
    """(log frame sorted by time, true probabilities, cached mask) of `spec.rows` rows.

    With `fit_bias`, ``truth.bias`` is set so that the user-initiated rows click at
    ``spec.target_rate``; else the bias already set is kept (later blocks of a large set)."""
    n = spec.rows
    user = rng.choice(spec.users, n, p=_zipf_probs(spec.users, 0.9))
    item = rng.choice(spec.items, n, p=_zipf_probs(spec.items, 1.0))  # id 0 is the most popular
    cached = rng.random(n) < spec.cached_share
    item[cached] = rng.integers(0, spec.cached_items, cached.sum())  # the cache replays the head
    user_segment = np.random.default_rng(spec.seed + 1).integers(0, spec.segments, spec.users)
    cols = {
        "user_id": user, "user_segment": user_segment[user], "item_id": item,
        "item_category": items["category"][item],
        "device": rng.choice(3, n, p=[0.5, 0.35, 0.15]), "hour": rng.integers(0, 24, n),
    }
    logit = truth.logit(cols, items["tag_ids"][item], items["tag_w"][item],
                        items["price_x"][item]) - truth.bias  # the bias is added below
    if fit_bias:
        truth.bias = _bias_for_rate(logit[~cached], spec.target_rate)
    prob = 1.0 / (1.0 + np.exp(-(logit + truth.bias)))
    label = (rng.random(n) < np.where(cached, spec.cached_click_rate, prob)).astype(np.int8)
    frame = pd.DataFrame({
        "ts": np.sort(rng.integers(start, start + int(days * 86400), n)),
        "user_id": [f"u{u}" for u in user],
        "user_segment": [f"s{s}" for s in cols["user_segment"]],
        "item_id": [f"i{i}" for i in item],
        "item_category": [f"c{c}" for c in cols["item_category"]],
        "item_tags": items["tags"][item],
        "item_price": items["price"][item],
        "device": np.array(["ios", "android", "web"])[cols["device"]],
        "hour": cols["hour"],
        "is_cached": cached.astype(np.int8),
        "click": label,
    })
    return frame, prob, cached


def _catalog_frame(spec: SynthSpec, items: dict) -> pd.DataFrame:
    return pd.DataFrame({"item_id": [f"i{i}" for i in range(spec.items)],
                         "item_category": [f"c{c}" for c in items["category"]],
                         "item_tags": items["tags"], "item_price": items["price"]})


def item_catalog(spec: SynthSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The planted item catalog of `spec`: per-item arrays [items] (category, tags, price ...)
    drawn from `rng`."""
    category = rng.integers(0, spec.categories, spec.items)
    max_tags = 4
    tag_ids = np.zeros((spec.items, max_tags), dtype=np.int64)
    tag_w = np.zeros((spec.items, max_tags))
    tags = []
    for i in range(spec.items):
        count = rng.integers(1, max_tags + 1)
        chosen = rng.choice(spec.tags, count, replace=False)
        tag_ids[i, :count] = chosen
        tag_w[i, :count] = 1.0 / count  # the spec's combiner: mean
        tags.append("|".join(f"t{t}" for t in chosen))
    log_price = rng.normal(3.0, 1.0, spec.items)
    price = np.round(np.expm1(np.maximum(log_price, 0.05)), 2)
    lp = np.log1p(price)
    return {"category": category, "tag_ids": tag_ids, "tag_w": tag_w,
            "tags": np.array(tags, dtype=object), "price": price,
            "price_x": (lp - lp.mean()) / lp.std()}


def _bias_for_rate(logit: np.ndarray, rate: float) -> float:
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if np.mean(1 / (1 + np.exp(-(logit + mid)))) < rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _oracle(label, prob, cached, spec: SynthSpec) -> dict:
    from fm_keras.evaluation import binary_metrics

    clean = binary_metrics(label[~cached], prob[~cached])
    return {
        "description": "metrics of the true probabilities on the user-initiated test rows "
                       "(is_cached == 0); cached rows have noise labels",
        "auc": clean["auc"], "logloss": clean["logloss"], "rows": clean["rows"],
        "positive_rate": clean["observed_rate"], "ece": clean["ece"],
        "test_rows_all": int(len(label)), "test_rows_cached": int(cached.sum()),
        "spec": {k: getattr(spec, k) for k in spec.__dataclass_fields__},
    }


def _write_csv(frame: pd.DataFrame, path: str, append: bool = False) -> None:
    """Writes `frame` to a temp file renamed to `path`; with `append`, adds its rows (no
    header) to the existing `path` the same way."""
    tmp = f"{path}.tmp-{os.getpid()}"
    if append:
        os.replace(path, tmp)
    frame.to_csv(tmp, index=False, header=not append, mode="a" if append else "w")
    os.replace(tmp, path)


FEATURES_YAML = """\
# Feature spec of the synthetic CTR set (fm-keras synth). Preprocessing runs inside the model.
# Only kinds and towers: regularization comes from the built-in defaults (model.l2_prior holds
# rare ids back by their training counts), not from per-feature values tuned to this set.
features:
  - {name: user_id, kind: categorical, tower: user, min_count: 2, oov_buckets: 20}
  - {name: user_segment, kind: categorical, tower: user}
  - {name: item_id, kind: categorical, tower: item, min_count: 2, oov_buckets: 20}
  - {name: item_category, kind: categorical, tower: item}
  - {name: item_tags, kind: multi_hot, tower: item, separator: "|", combiner: mean}
  - {name: item_price, kind: numeric, tower: item, normalization: log}
  - {name: device, kind: categorical, tower: context}
  - {name: hour, kind: categorical, tower: context}
"""

EXPERIMENT_YAML = """\
# Experiment for the synthetic CTR set (fm-keras synth). Paths are relative to this file.
# No model or optimizer settings: the built-in defaults (README, "Defaults") are used.
data:
  train: train.csv
  valid: valid.csv
  test: test.csv
  label: click
  filters:
    # Exposures the frontend cache replayed rather than the user: their clicks are noise.
    - {name: cached_exposures, column: is_cached, op: "==", value: 1}
features: features.yaml
# training: {pos_weight: 4.0} would weight the rare clicks (the probability is corrected);
# on this set it cost test AUC with the defaults (BENCHMARKS.md, "Defaults that converge").
"""


@dataclass
class SyntheticWorld:
    """The users, catalog and planted FM of one ``fm-keras synth`` data set: true click
    probabilities for any (user, item, device, hour), e.g. to simulate an online experiment.

    Attributes:
        spec: the data set's spec (from ``oracle.json``).
        truth: the planted FM, with the bias fitted when the data was drawn.
        items: the catalog arrays (category, tag ids and weights, price, normalized price).
        user_segment: int array [users]: each user's segment.
        user_activity: float array [users], sums to 1: the share of log rows of each user.
    """

    spec: SynthSpec
    truth: PlantedFM
    items: dict
    user_segment: np.ndarray
    user_activity: np.ndarray

    DEVICES = ("ios", "android", "web")
    DEVICE_SHARES = (0.5, 0.35, 0.15)

    def click_probability(self, user: np.ndarray, item: np.ndarray, device: np.ndarray,
                          hour: np.ndarray) -> np.ndarray:
        """P(click | shown) of user-initiated exposures; int index arrays [n] -> float64 [n].

        ``device`` indexes ``DEVICES``; ids are the integers in ``u<id>`` / ``i<id>``.
        """
        cols = {"user_id": user, "user_segment": self.user_segment[user], "item_id": item,
                "item_category": self.items["category"][item], "device": device, "hour": hour}
        logit = self.truth.logit(cols, self.items["tag_ids"][item], self.items["tag_w"][item],
                                 self.items["price_x"][item])
        return 1.0 / (1.0 + np.exp(-logit))  # logit() adds truth.bias


def load_world(data_dir: str) -> SyntheticWorld:
    """Rebuilds the world of a ``generate`` data set from its ``oracle.json`` (spec and seed).

    Replays the same draws as ``generate`` (the planted FM, the catalog and the rows, whose
    user-initiated logits fix the bias), so probabilities match the written labels' exactly.

    Raises:
        ConfigError: no ``oracle.json`` (not written by ``fm-keras synth``, or a span).
    """
    path = os.path.join(data_dir, "oracle.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{data_dir}: no oracle.json; pass a directory written by "
                          "'fm-keras synth --out DIR' (without --span)")
    spec = SynthSpec(**fsutil.read_json(path)["spec"])
    rng = np.random.default_rng(spec.seed)
    truth = PlantedFM(spec, rng)
    items = item_catalog(spec, rng)
    first = min(spec.rows, BLOCK_ROWS)  # generate fits the bias on its first block
    _rows(replace(spec, rows=first), truth, items, rng, start=1_700_000_000,
          days=30 * first / spec.rows)  # sets truth.bias
    segment = np.random.default_rng(spec.seed + 1).integers(0, spec.segments, spec.users)
    return SyntheticWorld(spec, truth, items, segment, _zipf_probs(spec.users, 0.9))
