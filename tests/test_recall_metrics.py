"""Recall@K, NDCG@K, HitRate@K, coverage and exact top-K against hand-worked and NumPy answers."""

import numpy as np
import pytest

from fm_keras.recall_metrics import (exact_top_k, group_by_query, popularity_top_k,
                                     ranking_metrics)


def test_metrics_by_hand():
    top = np.array([[1, 2, 3], [4, 5, 6]])
    relevant = [np.array([2, 9]), np.array([7])]
    m = ranking_metrics(top, relevant, [1, 3], num_items=10)
    assert m["recall@1"] == 0.0 and m["hit_rate@1"] == 0.0
    assert m["recall@3"] == pytest.approx((1 / 2 + 0) / 2)
    assert m["hit_rate@3"] == pytest.approx(0.5)
    # user 0: hit at rank 2 -> 1/log2(3); ideal: two relevant -> 1 + 1/log2(3)
    assert m["ndcg@3"] == pytest.approx((1 / np.log2(3)) / (1 + 1 / np.log2(3)) / 2)
    assert m["coverage@3"] == pytest.approx(6 / 10) and m["coverage@1"] == pytest.approx(2 / 10)
    assert m["queries"] == 2


def test_k_above_list_length_evaluates_the_whole_list():
    m = ranking_metrics(np.array([[0, 1]]), [np.array([1])], [5], num_items=2)
    assert m["recall@5"] == 1.0 and m["ndcg@5"] == pytest.approx(1 / np.log2(3))


def test_empty_relevant_set_is_rejected():
    with pytest.raises(ValueError, match="relevant item"):
        ranking_metrics(np.array([[0]]), [np.array([], int)], [1], 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_top_k_matches_argsort_with_exclusions(seed):
    rng = np.random.default_rng(seed)
    users, items = rng.normal(size=(7, 4)), rng.normal(size=(50, 4))
    exclude = [rng.choice(50, rng.integers(0, 10), replace=False) for _ in range(7)]
    got = exact_top_k(users, items, 5, exclude, batch_size=3)
    for u in range(7):
        scores = users[u] @ items.T
        scores[exclude[u]] = -np.inf
        np.testing.assert_array_equal(got[u], np.argsort(-scores, kind="stable")[:5])
        assert not set(got[u]) & set(exclude[u])
    assert exact_top_k(users, items, 500).shape == (7, 50)  # clamped to the catalog


def test_popularity_top_k_excludes_and_breaks_ties_by_catalog_order():
    counts = np.array([5.0, 1.0, 5.0, 3.0])
    top = popularity_top_k(counts, 2, 3, [np.array([0]), np.array([], int)])
    np.testing.assert_array_equal(top, [[2, 3, 1], [0, 2, 3]])


def test_group_by_query():
    queries, sets = group_by_query(np.array([3, 1, 3, 3, 1]), np.array([4, 2, 4, 0, 5]))
    np.testing.assert_array_equal(queries, [1, 3])
    assert [s.tolist() for s in sets] == [[2, 5], [0, 4]]
