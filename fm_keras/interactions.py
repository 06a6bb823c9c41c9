"""Interaction logs joined to the item catalog: the data of retrieval and sampled negatives.

The catalog (``data.items``: one row per item, the ``data.item_id`` column and the item
features) is the truth about items: a log row contributes its query-side (user + context)
columns and its item id, and the item's features come from the catalog. So a log needs no
item feature columns (it may have them; they are ignored), and a positive and a sampled
negative of the same item always carry the same features.

Rows whose label is <= 0 are dropped (counted as ``label<=0``): retrieval learns from what
users picked; the unpicked items of the catalog are the negatives. Rows whose item is not in
the catalog are dropped with one warning giving the count (those items cannot be recalled).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fm_keras.config import ExperimentConfig, FeatureConfig, FilterConfig
from fm_keras.data import Split, load_split
from fm_keras.errors import DataError, ExportError

ITEM_INDEX = "item_index"  # Split.passthrough key: the row's catalog index
WEIGHT = "weight"  # Split.passthrough key: the row's sample weight (data.weight), float32


@dataclass(frozen=True)
class Catalog:
    """The item catalog.

    Attributes:
        ids: item ids, str [items], unique.
        columns: item feature name -> raw values [items] (strings or float32).
        path: the file it was read from.
    """

    ids: np.ndarray
    columns: dict
    path: str

    def __len__(self) -> int:
        return len(self.ids)

    def index_of(self, ids: np.ndarray) -> np.ndarray:
        """Catalog index of each id, int64 [n]; -1 for an id the catalog lacks."""
        lookup = pd.Index(self.ids)
        return lookup.get_indexer(pd.Index(np.asarray(ids, dtype=str)))


def load_catalog(path: str, features: Sequence[FeatureConfig], id_column: str) -> Catalog:
    """Reads the catalog's id column and item features; DataError names the column."""
    item = [f for f in features if not f.query_side]
    meta = {"features": [{"config": dataclasses.asdict(f)} for f in item],
            "item_features": [f.name for f in item]}
    ids, columns = read_catalog(path, meta, id_column)
    return Catalog(ids, columns, path)


def read_catalog(path: str, ranking_meta: dict, id_column: str) -> tuple[np.ndarray, dict]:
    """(item ids, item feature columns) from a CSV/Parquet catalog; errors name the column."""
    features = [FeatureConfig(**f["config"]) for f in ranking_meta["features"]
                if f["config"]["name"] in ranking_meta["item_features"]]
    extra = [] if id_column in {f.name for f in features} else [id_column]
    split = load_split([path], features, None, (), passthrough=extra)
    ids = (split.passthrough[id_column] if extra else split.features[id_column]).astype(str)
    if np.any(ids == ""):
        raise DataError(f"{path}: column {id_column!r}: empty item id at data row "
                        f"{int(np.argmax(ids == '')) + 1}; every item needs one")
    if len(set(ids)) != len(ids):
        values, counts = np.unique(ids, return_counts=True)
        raise ExportError(f"{path}: column {id_column!r} has duplicate item ids, e.g. "
                          f"{values[counts > 1][:3].tolist()}; one row per item")
    columns = {k: (v.astype(str).astype(object) if v.dtype == object else v.astype(np.float32))
               for k, v in split.features.items()}
    return ids, columns


def load_interactions(patterns: Sequence[str], config: ExperimentConfig, catalog: Catalog,
                      filters: Sequence[FilterConfig] | None = None,
                      require_positives: bool = True, use_label: bool = True) -> Split:
    """Reads a log: query-side columns, the item id, the label if configured.

    With ``use_label=False`` the label is not read and every row counts (e.g. a log of items
    to exclude: whatever a user was shown or picked).

    Returns:
        A `Split` with every feature column (item features gathered from the catalog),
        ``labels`` None, ``passthrough[ITEM_INDEX]`` the catalog index [rows],
        ``passthrough[WEIGHT]`` the ``data.weight`` column (float32 [rows]) when one is
        configured, and ``dropped`` counting filtered rows, ``label<=0`` rows and
        ``not_in_catalog`` rows.

    Raises:
        DataError: a file or column is missing or bad (a weight that is not a finite number
            >= 0 is named by file, row and column), or (with `require_positives`) no
            positive row is left.
    """
    data = config.data
    query = [f for f in config.features if f.query_side]
    filters = data.filters if filters is None else tuple(filters)
    weight = data.weight if use_label else None
    split = load_split(patterns, query, data.label if use_label else None, filters,
                       task="regression",
                       passthrough=[data.item_id], weight=weight)
    where = ", ".join(split.files)
    keep = np.ones(len(split), bool) if split.labels is None else split.labels > 0
    dropped = dict(split.dropped)
    if split.labels is not None:
        dropped["label<=0"] = int((~keep).sum())
    index = catalog.index_of(split.passthrough[data.item_id])
    missing = keep & (index < 0)
    if missing.any():
        unseen = len(np.unique(split.passthrough[data.item_id][missing]))
        print(f"fm-keras: warning: {where}: column {data.item_id!r}: {unseen:,} item ids "
              f"({int(missing.sum()):,} rows) are not in the catalog {catalog.path}; those "
              "rows are skipped and those items cannot be recalled", file=sys.stderr)
    dropped["not_in_catalog"] = int(missing.sum())
    keep &= index >= 0
    if require_positives and not keep.any():
        raise DataError(f"{where}: no positive interactions (rows with label > 0 and an item "
                        f"in the catalog) in {split.rows_read:,} rows read; a retrieval log "
                        "lists what users picked")
    split = split.take(keep)
    index = index[keep]
    columns = dict(split.features)
    for name, values in catalog.columns.items():
        columns[name] = values[index]
    passthrough = {ITEM_INDEX: index.astype(np.int64)}
    if weight:
        passthrough[WEIGHT] = split.passthrough[weight]
    return Split(columns, None, split.rows_read, dropped, split.files, passthrough)


def query_keys(splits: Sequence[Split], names: Sequence[str]) -> list[np.ndarray]:
    """One int64 id per distinct combination of the query-side values, consistent across
    `splits` (so a validation user matches the same user in training): int64 [rows] each."""
    frame = pd.concat([pd.DataFrame({n: s.features[n] for n in names}) for s in splits],
                      ignore_index=True)
    keys = frame.groupby(list(names), sort=False, dropna=False).ngroup().to_numpy(np.int64)
    bounds = np.cumsum([0] + [len(s) for s in splits])
    return [keys[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def item_counts(split: Split, num_items: int) -> np.ndarray:
    """How many rows of `split` name each catalog item: float64 [items]."""
    return np.bincount(split.passthrough[ITEM_INDEX], minlength=num_items).astype(np.float64)
