"""Streaming feature fit: blocks give exactly the in-memory fit; NumPy/pandas references."""

import math
import re

import numpy as np
import pandas as pd
import pytest

from fm_keras.config import FeatureConfig, FilterConfig
from fm_keras.data import expand_paths, iter_blocks, load_split
from fm_keras.features import fit_features
from fm_keras.fitting import CHUNK, FeatureFitter, histogram_quantiles, weighted_token_pattern

SPEC = [
    FeatureConfig("user", "categorical", "user", min_count=2),
    FeatureConfig("tags", "multi_hot", "item", separator="|", combiner="mean"),
    FeatureConfig("price", "numeric", "item", normalization="log"),
    FeatureConfig("age", "numeric", "user", normalization="standard"),
    FeatureConfig("score", "numeric", "item", normalization="min_max"),
    FeatureConfig("views", "numeric", "item", buckets=7),
    FeatureConfig("hour", "categorical", "context", hash_buckets=16),
]


def _quirky_log(path, rows=3000, seed=0):
    """A CSV with quoting, missing cells, weighted tokens (a:0.5|b), ':' inside tokens, empty
    tokens, unicode, numeric-looking ids, repeated values (ties) and a filter column."""
    rng = np.random.default_rng(seed)
    tokens = ["a:0.5", "b", "tag:t81", "c:2", "ü", "007", "x:", "d:1e-3", ""]
    tags = ["|".join(rng.choice(tokens, rng.integers(0, 6))) for _ in range(rows)]
    price = np.round(rng.lognormal(2, 1, rows), 2).astype(str)
    price[rng.random(rows) < 0.1] = "NA"
    age = rng.integers(18, 80, rows).astype(str)
    age[rng.random(rows) < 0.05] = ""
    frame = pd.DataFrame({
        "user": [f'u,{u}' if u % 7 == 0 else f"{u:03d}" for u in rng.zipf(1.5, rows) % 400],
        "tags": tags, "price": price, "age": age,
        "score": rng.normal(0, 3, rows).round(3), "views": rng.integers(0, 50, rows),
        "hour": rng.integers(0, 24, rows), "is_cached": (rng.random(rows) < 0.2).astype(int),
        "click": (rng.random(rows) < 0.3).astype(int)})
    frame.to_csv(path, index=False)
    return str(path)


def _reference(c: FeatureConfig, column: np.ndarray) -> dict:
    """The fit in plain pandas/NumPy on the whole column (what the fitter must reproduce)."""
    if c.kind == "categorical":
        counts = pd.Series(column).value_counts()
    elif c.kind == "multi_hot":
        tokens = pd.Series(column).str.split(c.separator, regex=False)
        lengths = tokens.map(lambda t: sum(1 for x in t if x))
        names = tokens.explode().dropna().str.replace(
            weighted_token_pattern(c.weight_separator), r"\1", regex=True)
        counts = names[names != ""].value_counts()
        max_len = int(min(64, max(1, np.percentile(lengths, 99))))
    if c.kind != "numeric":
        counts = counts[counts >= c.min_count]
        vocab = tuple(v for _, v in sorted(zip(-counts.to_numpy(), counts.index.astype(str))))
        out = {"vocabulary": () if c.hash_buckets else vocab}
        return {**out, "max_len": max_len} if c.kind == "multi_hot" else out
    seen = column.astype(np.float64)
    seen = seen[~np.isnan(seen)]
    if c.buckets:
        bounds = np.unique(np.quantile(seen, np.linspace(0, 1, c.buckets + 1)[1:-1]))
        return {"fill": seen.mean(), "boundaries": tuple(bounds)}
    t = np.log1p(np.maximum(seen, 0)) if c.normalization == "log" else seen
    center, scale = ((seen.min(), seen.max() - seen.min()) if c.normalization == "min_max"
                     else (t.mean(), t.std()))
    return {"fill": seen.mean(), "center": center, "scale": scale,
            "clip_min": seen.min(), "clip_max": seen.max()}


@pytest.mark.parametrize("block_rows", [333, None])
def test_streamed_fit_equals_in_memory_fit_exactly(tmp_path, block_rows):
    path = _quirky_log(tmp_path / "log.csv")
    pd.read_csv(path, dtype=str, keep_default_na=False).to_parquet(tmp_path / "log.parquet")
    cached = [FilterConfig("cached", "is_cached", "==", 1)]
    split = load_split([path, str(tmp_path / "log.parquet")], SPEC, "click", cached)
    in_memory = fit_features(SPEC, split)
    files = expand_paths([path, str(tmp_path / "log.parquet")])
    streamed = fit_features(SPEC, iter_blocks(files, SPEC, "click", cached,
                                              block_rows=block_rows))
    assert streamed == in_memory  # every field, floats to the last bit
    for fitted in in_memory:
        expected = _reference(fitted.config, split.features[fitted.config.name])
        for key, value in expected.items():
            got = getattr(fitted, key)
            if isinstance(value, tuple) and value and isinstance(value[0], str):
                assert got == value, key
            else:
                np.testing.assert_allclose(got, value, rtol=1e-12, err_msg=key)


def test_weighted_tokens_and_colons():
    c = FeatureConfig("tags", "multi_hot", "item", separator="|")
    fitted, = fit_features([c], load_like({"tags": np.array(
        ["a:0.5|b", "a:2|tag:t81", "tag:t81|a", "b|"], dtype=object)}))
    # 'a:0.5' counts as 'a'; 'tag:t81' (no number after ':') is a value of its own.
    assert fitted.vocabulary == ("a", "b", "tag:t81")
    assert fitted.max_len == 2


@pytest.mark.parametrize("cells,warning", [
    (["Comedy,Romance", "Comedy,Romance", "Drama", "Action,Thriller"],
     "warning: feature 'genres': no training cell holds two values split by separator '|', but "
     "2 of its 3 values hold ',' (e.g. 'Comedy,Romance'); set separator: ','"),
    (["Comedy | Romance", "Comedy | Romance", "Drama", "Drama | Western"],
     "warning: feature 'genres': 4 of its 5 values have spaces around them (e.g. ' Romance'), "
     "and a value is taken as written"),
    (["Comedy|Romance", "Drama", "Sci-Fi|Film Noir"], None),  # split; a space inside a value
    (["Drama", "Comedy", "Film Noir"], None),  # one value a row, no other separator around
    # Single values that hold ', ' (MovieLens titles 'Butcher Boy, The'): ',' would not split
    # them into values (' The'), so it is not suggested.
    (["Butcher Boy, The", "Toy Story", "Usual Suspects, The"], None),
])
def test_multi_hot_lists_the_separator_does_not_split_warn(capsys, cells, warning):
    """MovieLens genres written 'Comedy,Romance' or 'Comedy | Romance' under separator '|'
    trained silently with every combination (or ' Romance' and 'Romance') as its own value."""
    c = FeatureConfig("genres", "multi_hot", "item", separator="|")
    fit_features([c], load_like({"genres": np.array(cells, dtype=object)}))
    err = capsys.readouterr().err
    if warning is None:
        assert err == ""
    else:
        assert warning in err and len(err.strip().splitlines()) == 1


def load_like(columns):
    from fm_keras.data import Split

    return Split(columns, None, len(next(iter(columns.values()))))


def test_numeric_stats_merge_across_chunks_exactly():
    rng = np.random.default_rng(1)
    values = rng.normal(5, 2, 3 * CHUNK + 123).astype(np.float32)
    c = FeatureConfig("x", "numeric", "item", normalization="standard")
    whole, parts = FeatureFitter([c]), FeatureFitter([c])
    whole.update({"x": values})
    for piece in np.array_split(values, 17):
        parts.update({"x": piece})
    assert whole.finish() == parts.finish()
    got = parts.finish()
    assert math.isclose(got[0]["center"], float(np.mean(values.astype(np.float64))), rel_tol=1e-12)
    assert math.isclose(got[0]["scale"], float(np.std(values.astype(np.float64))), rel_tol=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_histogram_quantiles_equal_numpy(seed):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, rng.integers(1, 30), rng.integers(1, 500)).astype(np.float64)
    q = np.concatenate([rng.random(20), [0.0, 1.0, 0.5, 0.99]])
    values, counts = np.unique(data, return_counts=True)
    np.testing.assert_array_equal(histogram_quantiles(values, counts, q), np.quantile(data, q))
    assert histogram_quantiles(values, counts, 0.99) == np.percentile(data, 99)


def test_empty_numeric_column_fits_zero_with_a_warning(capsys):
    c = FeatureConfig("x", "numeric", "item", normalization="standard")
    fitter = FeatureFitter([c])
    fitter.update({"x": np.array([np.nan, np.nan], np.float32)})
    assert fitter.finish()[0] == {"center": 0.0, "scale": 1e-6, "clip_min": 0.0,
                                  "clip_max": 0.0, "fill": 0.0}
    assert "warning: feature 'x': every training cell is missing, so the feature is a constant " \
           "0 and learns nothing" in capsys.readouterr().err
    fitter = FeatureFitter([c])  # one value: no warning
    fitter.update({"x": np.array([np.nan, 2.0], np.float32)})
    fitter.finish()
    assert capsys.readouterr().err == ""
    assert re.fullmatch(weighted_token_pattern(":"), "a:0.5")
