"""Fitting features in one streaming pass: vocabularies, multi-hot lengths, numeric statistics.

`FeatureFitter` takes the training rows a block at a time and keeps only what the fit needs:
value counts (bounded by the number of distinct values, not rows), a histogram of multi-hot
list lengths, and per numeric feature the count, range, mean and variance, merged chunk by
chunk (Chan, Golub & LeVeque 1979, "Updating formulae and a pairwise algorithm for computing
sample variances"). Numeric values are merged in chunks of exactly `CHUNK` non-missing values
whatever the block sizes, so a fit over blocks equals the fit over the whole column to the
last bit: `fm_keras.features.fit_features` uses this fitter for in-memory splits too.

Quantile buckets (``buckets: <int>``) need every value's rank: for them the fitter keeps a
histogram of the distinct values, and the quantiles are NumPy's ``linear`` method (Hyndman &
Fan 1996, definition 7) read off that histogram exactly.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from fm_keras.config import FeatureConfig
from fm_keras.progress import log

CHUNK = 65_536  # non-missing numeric values merged at a time (fixed: results are exact)
MAX_LEN_CAP = 64  # default multi-hot max_len never exceeds this
STD_FLOOR = 1e-6
# A finite decimal number, in ASCII classes so that Python's re, TensorFlow's RE2 and Arrow's
# RE2 agree (the multi-hot weight rule; `fm_keras.libsvm` reads values by it too).
_SPACE = r"[ \t\n\r\f\v]*"
NUMBER = _SPACE + r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?" + _SPACE


def weighted_token_pattern(weight_separator: str) -> str:
    """Regex of a multi-hot token with a weight: ``(name)<sep>(number)``, split at the LAST
    separator. A token whose text after its last separator is not a number has no weight:
    the whole token is the value (``tag:t81`` is the value ``tag:t81``, weight 1).

    The same pattern runs in Python (`re`, fitting vocabularies) and in the graph (RE2), so
    both read a token alike.
    """
    return "(?s)^(.*)" + re.escape(weight_separator) + "(" + NUMBER + ")$"


def histogram_quantiles(values: np.ndarray, counts: np.ndarray, q) -> np.ndarray:
    """``np.quantile(data, q)`` (method ``linear``) of the multiset `values` x `counts`.

    Args:
        values: distinct values, sorted ascending, shape [m].
        counts: how often each occurs (positive ints), shape [m].
        q: quantile(s) in [0, 1], scalar or array.

    Returns:
        float64 array shaped like `q`, equal to NumPy's result on the expanded data.
    """
    q = np.asarray(q, dtype=np.float64)
    cumulative = np.cumsum(counts)
    n = int(cumulative[-1])
    virtual = (n - 1) * q
    previous = np.floor(virtual)
    gamma = virtual - previous
    lo = np.where(virtual >= n - 1, n - 1, np.clip(previous, 0, n - 1)).astype(np.int64)
    hi = np.clip(previous + 1, 0, n - 1).astype(np.int64)
    a = values[np.searchsorted(cumulative, lo, side="right")]
    b = values[np.searchsorted(cumulative, hi, side="right")]
    diff = b - a
    return np.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)


class _Moments:
    """Count, mean and M2 (sum of squared deviations) merged chunk by chunk."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, chunk: np.ndarray) -> None:
        m = len(chunk)
        mean = float(np.mean(chunk))
        m2 = float(np.sum((chunk - mean) ** 2))
        n = self.n + m
        delta = mean - self.mean
        self.mean += delta * m / n
        self.m2 += m2 + delta * delta * self.n * m / n
        self.n = n

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.n) if self.n else 0.0


class _NumericStats:
    def __init__(self, config: FeatureConfig):
        self.config = config
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0
        self.raw, self.transformed = _Moments(), _Moments()
        self.lo, self.hi = math.inf, -math.inf
        self.histogram: tuple[np.ndarray, np.ndarray] | None = None

    def update(self, column: np.ndarray) -> None:
        values = np.asarray(column, dtype=np.float64)
        seen = values[~np.isnan(values)]
        if not seen.size:
            return
        self.pending.append(seen)
        self.pending_rows += seen.size
        if self.pending_rows >= CHUNK:
            joined = np.concatenate(self.pending)
            full = len(joined) // CHUNK * CHUNK
            for start in range(0, full, CHUNK):
                self._add(joined[start:start + CHUNK])
            self.pending = [joined[full:]]
            self.pending_rows = len(joined) - full

    def _add(self, chunk: np.ndarray) -> None:
        c = self.config
        self.lo, self.hi = min(self.lo, float(chunk.min())), max(self.hi, float(chunk.max()))
        self.raw.add(chunk)
        if c.normalization in ("standard", "log"):
            self.transformed.add(np.log1p(np.maximum(chunk, 0.0))
                                 if c.normalization == "log" else chunk)
        if isinstance(c.buckets, int) and not isinstance(c.buckets, bool):
            values, counts = np.unique(chunk, return_counts=True)
            if self.histogram is not None:
                values = np.concatenate([self.histogram[0], values])
                counts = np.concatenate([self.histogram[1], counts])
                values, index = np.unique(values, return_inverse=True)
                counts = np.bincount(index, weights=counts).astype(np.int64)
            self.histogram = values, counts

    def finish(self) -> dict:
        c = self.config
        if self.pending_rows:
            self._add(np.concatenate(self.pending))
            self.pending, self.pending_rows = [], 0
        if self.raw.n == 0:  # no value at all: the statistics of a single 0
            log(f"warning: feature {c.name!r}: every training cell is missing, so the feature "
                "is a constant 0 and learns nothing; check the column (or drop the feature)")
            self._add(np.zeros(1))
        fill = self.raw.mean if c.default is None else float(c.default)
        if c.buckets is not None:
            if isinstance(c.buckets, int):
                bounds = np.unique(histogram_quantiles(
                    *self.histogram, np.linspace(0, 1, c.buckets + 1)[1:-1]))
            else:
                bounds = np.asarray(c.buckets, dtype=np.float64)
            return {"fill": fill, "boundaries": tuple(float(b) for b in bounds)}
        if c.normalization == "min_max":
            center, scale = self.lo, max(self.hi - self.lo, STD_FLOOR)
        elif c.normalization in ("standard", "log"):
            center, scale = self.transformed.mean, max(self.transformed.std, STD_FLOOR)
        else:
            center, scale = 0.0, 1.0
        return {"center": center, "scale": scale, "clip_min": self.lo, "clip_max": self.hi,
                "fill": fill}


class _ValueCounts:
    """Vocabulary counts of a categorical (values) or multi-hot (tokens) feature."""

    def __init__(self, config: FeatureConfig):
        self.config = config
        self.counts: Counter = Counter()
        self.lengths: Counter = Counter()  # multi-hot: non-empty tokens per row -> rows
        self.pattern = (re.compile(weighted_token_pattern(config.weight_separator))
                        if config.kind == "multi_hot" else None)

    def update(self, column: np.ndarray) -> None:
        cells = pd.Series(column, dtype=object).value_counts(sort=False)
        if self.pattern is None:
            if self.config.hash_buckets is None:
                self.counts.update(dict(zip(cells.index, cells.to_numpy().tolist())))
            return
        # A log repeats few distinct lists (an item's tags): split each distinct cell once.
        for cell, rows in zip(cells.index, cells.to_numpy().tolist()):
            tokens = str(cell).split(self.config.separator)
            self.lengths[sum(1 for t in tokens if t)] += rows
            if self.config.hash_buckets is None:
                for token in tokens:
                    name = self.pattern.sub(r"\1", token)
                    if name:
                        self.counts[name] += rows

    def finish(self) -> dict:
        c = self.config
        kept = [(-n, str(v)) for v, n in self.counts.items() if n >= c.min_count]
        # Most frequent first, ties by value: the same data always gives the same ids.
        vocabulary = tuple(v for _, v in sorted(kept))
        if c.kind != "multi_hot":
            return {"vocabulary": vocabulary}
        _warn_of_separators(c, vocabulary, self.lengths)
        max_len = c.max_len
        if not max_len:
            if self.lengths:
                lengths = np.array(sorted(self.lengths))
                p99 = float(histogram_quantiles(
                    lengths, np.array([self.lengths[k] for k in lengths]), 0.99))
            else:
                p99 = 0.0
            max_len = int(min(MAX_LEN_CAP, max(1, p99)))
        return {"vocabulary": vocabulary, "max_len": max_len}


# What multi-hot lists are commonly split by (not a space: values such as titles hold them).
_OTHER_SEPARATORS = ("|", ",", ";", "/")


def _warn_of_separators(config: FeatureConfig, vocabulary: Sequence[str], lengths: Counter) -> None:
    """Warns of a multi-hot column whose lists its `separator` does not split: no cell holds
    two values while values hold another separator between clean values
    (``'Comedy,Romance'`` is then one value),
    or values have spaces around them (``'a | b'`` gives ``'a '`` and ``' b'``, not the
    ``'a'`` and ``'b'`` of other rows). Values are taken as written, so it trains either way."""
    if not vocabulary:
        return
    if max(lengths, default=0) <= 1:
        for other in _OTHER_SEPARATORS:
            # Values it would split into clean values ('Comedy,Romance'; not a title such
            # as 'Butcher Boy, The', whose ' The' says ',' is no list separator there).
            holding = [v for v in vocabulary if other in v.strip()
                       and all(t and t == t.strip() for t in v.strip().split(other))]
            if other != config.separator and holding:
                log(f"warning: feature {config.name!r}: no training cell holds two values split "
                    f"by separator {config.separator!r}, but {len(holding):,} of its "
                    f"{len(vocabulary):,} values hold {other!r} (e.g. {holding[0]!r}); set "
                    f"separator: {other!r} if that splits the lists")
                return
    padded = [v for v in vocabulary if v != v.strip()]
    if padded:
        log(f"warning: feature {config.name!r}: {len(padded):,} of its {len(vocabulary):,} values "
            f"have spaces around them (e.g. {padded[0]!r}), and a value is taken as written: "
            f"remove the spaces around separator {config.separator!r} in the data")


class FeatureFitter:
    """Fits a feature spec from blocks of training rows, in bounded memory.

    Args:
        configs: the feature spec.

    Example::

        fitter = FeatureFitter(config.features)
        for block in data.iter_blocks(files, config.features, label):
            fitter.update(block.features)
        kwargs = fitter.finish()   # one dict of `FittedFeature` fields per feature
    """

    def __init__(self, configs: Sequence[FeatureConfig]):
        if not configs:
            raise ValueError("FeatureFitter needs at least one feature config, got none")
        self.configs = tuple(configs)
        self._stats = [_NumericStats(c) if c.kind == "numeric" else _ValueCounts(c)
                       for c in self.configs]
        self.rows = 0

    def update(self, columns: Mapping[str, np.ndarray]) -> None:
        """Adds one block: feature name -> array [rows] (strings, or float with NaN)."""
        for c, stats in zip(self.configs, self._stats):
            stats.update(columns[c.name])
        self.rows += len(columns[self.configs[0].name])

    def finish(self) -> list[dict]:
        """The `FittedFeature` fields learned, one dict per config (without ``config``)."""
        return [stats.finish() for stats in self._stats]
