"""Recall metrics over an item catalog: exact top-K, Recall@K, NDCG@K, HitRate@K, coverage.

Exact search (a matrix product over the whole catalog), so that the model's recall is not
mixed with an ANN index's error (that is `ann_recall_at_k`, a separate number). A *query* is a
distinct combination of query-side (user + context) feature values; its relevant items are
the catalog items it interacted with in the evaluated rows.

Definitions, for a query with relevant set R and ranked top-K list T (Järvelin & Kekäläinen
2002 for NDCG, binary gains):

    Recall@K  = |T ∩ R| / |R|
    HitRate@K = 1 if T ∩ R is not empty
    NDCG@K    = sum_{r : T_r in R} 1 / log2(r + 1)  /  sum_{r=1..min(K, |R|)} 1 / log2(r + 1)
    coverage@K = |union of all T| / catalog size

each averaged over queries (coverage is over the union).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def group_by_query(query_keys: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, list]:
    """Groups (query, item) rows into each query's item set.

    Args:
        query_keys: int64 [rows], one id per distinct query.
        items: int [rows], catalog indices.

    Returns:
        ``(queries, item_sets)``: the distinct keys in ascending order, int64 [Q], and for
        each one its distinct items, a list of Q int64 arrays.
    """
    order = np.lexsort((items, query_keys))
    keys, items = query_keys[order], items[order]
    queries, starts = np.unique(keys, return_index=True)
    sets = [np.unique(part) for part in np.split(items, starts[1:])] if len(keys) else []
    return queries, sets


def exact_top_k(user_vectors: np.ndarray, item_vectors: np.ndarray, k: int,
                exclude: Sequence[np.ndarray] | None = None,
                batch_size: int = 1024) -> np.ndarray:
    """Top-K catalog indices by inner product, best first: int64 [users, min(k, items)].

    Args:
        user_vectors: float [users, d].
        item_vectors: float [items, d].
        k: items per user; more than the catalog is clamped to the catalog size.
        exclude: per user, catalog indices that must not be returned (e.g. items seen in
            training); they score -inf.
        batch_size: users per matrix product (memory is batch_size x items floats).
    """
    k = min(int(k), len(item_vectors))
    out = np.empty((len(user_vectors), k), np.int64)
    for start in range(0, len(user_vectors), batch_size):
        scores = user_vectors[start:start + batch_size] @ item_vectors.T
        if exclude is not None:
            rows = exclude[start:start + batch_size]
            r = np.repeat(np.arange(len(rows)), [len(e) for e in rows])
            if len(r):
                scores[r, np.concatenate(rows).astype(np.int64)] = -np.inf
        out[start:start + len(scores)] = _top_k_rows(scores, k)
    return out


def popularity_top_k(counts: np.ndarray, users: int, k: int,
                     exclude: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """The popularity baseline: the K most frequent items (by `counts`, float [items]), per
    user without that user's excluded items; int64 [users, min(k, items)]."""
    scores = np.asarray(counts, np.float64)[None, :]
    # Ties by catalog order; a tiny decreasing term keeps the order deterministic.
    scores = scores - np.arange(scores.shape[1]) * 1e-9
    return exact_top_k(np.ones((users, 1)), scores.T, k, exclude)


def _top_k_rows(scores: np.ndarray, k: int) -> np.ndarray:
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, 1), axis=1, kind="stable")
    return np.take_along_axis(part, order, 1)


def ranking_metrics(top_k: np.ndarray, relevant: Sequence[np.ndarray], ks: Sequence[int],
                    num_items: int) -> dict:
    """Recall@K, NDCG@K, HitRate@K and coverage@K for each K in `ks`.

    Args:
        top_k: int [queries, K_max], best first (K_max >= max(ks) or the catalog size).
        relevant: per query, the relevant catalog indices (non-empty).
        ks: cut-offs; a K above ``top_k.shape[1]`` is evaluated at ``top_k.shape[1]``.
        num_items: catalog size, for coverage.

    Returns:
        ``{"recall@K": float, "ndcg@K": float, "hit_rate@K": float, "coverage@K": float,
        ...}`` (means over queries) plus ``queries``.
    """
    hits = np.zeros(top_k.shape, bool)
    sizes = np.array([len(r) for r in relevant], np.float64)
    if not len(relevant) or sizes.min() == 0:
        raise ValueError("ranking_metrics needs at least one query and a relevant item each")
    for q, rel in enumerate(relevant):
        hits[q] = np.isin(top_k[q], rel)
    discount = 1.0 / np.log2(np.arange(2, top_k.shape[1] + 2))
    out: dict = {"queries": int(len(relevant))}
    for k in ks:
        kk = min(int(k), top_k.shape[1])
        found = hits[:, :kk].sum(1)
        ideal = np.cumsum(discount)[np.minimum(sizes, kk).astype(int) - 1]
        out[f"recall@{k}"] = float(np.mean(found / sizes))
        out[f"ndcg@{k}"] = float(np.mean((hits[:, :kk] * discount[:kk]).sum(1) / ideal))
        out[f"hit_rate@{k}"] = float(np.mean(found > 0))
        out[f"coverage@{k}"] = float(len(np.unique(top_k[:, :kk])) / num_items)
    return out
