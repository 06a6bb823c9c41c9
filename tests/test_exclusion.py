"""Exclusions: fingerprint id -> index map, the membership test and `drop_excluded` against a
brute-force NumPy set check (random cases with duplicates, -1 pads, all-excluded rows, empty
batches and a forged fingerprint match)."""

import numpy as np
import pytest
import tensorflow as tf

from fm_keras.errors import ExportError
from fm_keras.exclusion import (KEY_BYTES, PAD_KEY, UNKNOWN_KEY, ItemIndex, catalog_keys,
                                drop_excluded, fingerprint, fingerprints, is_member, item_keys,
                                member_positions, packed_keys, search_excluding, slack)

CATALOG = np.array([f"i{j}".encode() for j in range(60)], dtype=object)


def _first_positions(values, sets):
    """NumPy reference: the first j with sets[b, j] == values[b, i], else -1."""
    out = np.full(values.shape, -1, np.int32)
    for b in range(len(values)):
        for i, v in enumerate(values[b]):
            where = np.flatnonzero(sets[b] == v)
            out[b, i] = where[0] if len(where) else -1
    return out


# (rows, m values, n set entries): fewer values than set entries (the values are sorted),
# more or as many (the sets are sorted), empty sets, no values, an empty batch (also with no
# values or no set entries: ScaNN answers an empty batch with [0, 0] candidates).
SHAPES = [(6, 30, 12), (5, 7, 40), (4, 20, 20), (1, 1, 1), (3, 9, 0), (3, 0, 9), (0, 4, 5),
          (0, 5, 4), (0, 0, 5), (0, 5, 0), (0, 0, 0), (8, 125, 600)]


@pytest.mark.parametrize("dtype", [np.int32, np.int64])  # catalog indices, fingerprints
@pytest.mark.parametrize("rows,m,n", SHAPES)
def test_member_positions_match_numpy(rows, m, n, dtype):
    """Random rows with duplicates and -1 on both sides (a -1 value finds a -1 of its set):
    the first position holding the value, -1 exactly when it is not in the row, alike for
    every duplicate."""
    rng = np.random.default_rng(rows * 1000 + m * 10 + n)
    high = max(8, (m + n) // 2)  # dense enough for duplicates and hits on both sides
    base = 0 if dtype == np.int32 else 2**40  # int64 keys beyond int32's range
    values = np.where(rng.random((rows, m)) < 0.1, -1,
                      base + rng.integers(0, high, (rows, m))).astype(dtype)
    sets = np.where(rng.random((rows, n)) < 0.1, -1,
                    base + rng.integers(0, high, (rows, n))).astype(dtype)
    want = _first_positions(values, sets)
    got = member_positions(tf.constant(values), tf.constant(sets)).numpy()
    assert got.shape == (rows, m) and got.dtype == np.int32
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(is_member(tf.constant(values), tf.constant(sets)).numpy(),
                                  want >= 0)


def test_member_positions_extremes_and_unknown_shapes():
    """int32 extremes and -2 (the sorted-set pad) as values, all -1 sets, and both directions
    traced with unknown m and n (as in an export's signature)."""
    top, low = np.iinfo(np.int32).max, np.iinfo(np.int32).min
    values = np.array([[top, low, -2, -1, 5, 5]], np.int32)
    cases = [np.array([[5, -1, top, 5, 7, -1, 9, 9, low]], np.int32),  # n > m
             np.array([[-1, -1, -1]], np.int32),  # n < m, only pads
             np.array([[9, 5, top]], np.int32)]
    traced = tf.function(member_positions, input_signature=[
        tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None, None], tf.int32)])
    for sets in cases:
        want = _first_positions(values, sets)
        np.testing.assert_array_equal(member_positions(values, sets).numpy(), want)
        np.testing.assert_array_equal(traced(values, sets).numpy(), want)


def test_item_index_maps_ids_by_fingerprint():
    index = ItemIndex(CATALOG)
    ids = tf.constant([[b"i3", b"", b"unknown", b"i59"], [b"i0", b"i0", b"i3", b""]])
    np.testing.assert_array_equal(index(ids).numpy(), [[3, -1, -1, 59], [0, 0, 3, -1]])
    assert index(tf.zeros([0, 3], tf.string)).shape == (0, 3)
    keys = fingerprints(CATALOG)
    assert keys.dtype == np.int64 and len(set(keys)) == len(CATALOG) and (keys >= 0).all()


def test_item_index_refuses_a_fingerprint_collision(monkeypatch):
    monkeypatch.setattr("fm_keras.exclusion.fingerprints",
                        lambda ids: np.array([7, 8, 7], np.int64))
    with pytest.raises(ExportError, match=r"b'a' and b'c' share a 64-bit fingerprint"):
        ItemIndex(np.array([b"a", b"b", b"c"], dtype=object))


def _reference(scores, indices, ids, k):
    """Brute force: per row, candidates in score order whose id is not among the row's ids."""
    out = []
    for b in range(len(scores)):
        seen = set(ids[b]) - {b""}
        order = np.argsort(-scores[b], kind="stable")
        out.append([int(indices[b, j]) for j in order
                    if indices[b, j] >= 0 and CATALOG[indices[b, j]] not in seen][:k])
    return out


def _keys(kind, ids):
    """`drop_excluded`'s (keys, item_keys): fingerprints as served, catalog indices, or item
    keys (exact: no ids to confirm with)."""
    if kind == "item_keys":
        return tf.constant(item_keys(ids)), tf.constant(item_keys(CATALOG))
    index = ItemIndex(CATALOG)
    if kind == "fingerprints":
        return fingerprint(tf.constant(ids)), index.keys
    return index(tf.constant(ids)), tf.range(len(CATALOG), dtype=tf.int32)


@pytest.mark.parametrize("kind", ["fingerprints", "indices", "item_keys"])
@pytest.mark.parametrize("seed", range(4))
def test_drop_excluded_equals_a_set_check(seed, kind):
    """Random candidate lists (some rows with -1 slots, some with every candidate excluded),
    excluded lists with duplicates, unknown ids and "" pads: the kept items are the reference's,
    in score order, and `short` flags exactly the rows with fewer than k left; keyed by
    fingerprint (as served) or by catalog index."""
    rng = np.random.default_rng(seed)
    rows, wide, k, n = 7, 12, 5, 9
    indices = np.stack([rng.choice(60, wide, replace=False) for _ in range(rows)]).astype(np.int32)
    indices[1, 8:] = -1
    scores = rng.normal(size=(rows, wide)).astype(np.float32)
    ids = CATALOG[rng.integers(0, 60, (rows, n))]
    ids[0, :3] = [b"", b"unknown", ids[0, 3]]  # pad, unknown id, duplicate
    ids[2] = CATALOG[indices[2, :n]]  # the best part of row 2's candidates excluded
    ids[3, 0] = ids[3, 1] = CATALOG[indices[3, 0]]
    keys, catalog_keys = _keys(kind, ids)
    confirm = (None, None) if kind == "item_keys" else (tf.constant(ids), tf.constant(CATALOG))
    got = drop_excluded(tf.constant(scores), tf.constant(indices), confirm[0], keys,
                        catalog_keys, confirm[1], k, tf.constant(False))
    want = _reference(scores, indices, ids, k)
    for b in range(rows):
        kept = got.indices.numpy()[b]
        assert list(kept[:len(want[b])]) == want[b] and np.all(kept[len(want[b]):] == -1)
        assert got.short.numpy()[b] == (len(want[b]) < k)
        assert np.all(np.isneginf(got.scores.numpy()[b, len(want[b]):]))
    complete = drop_excluded(tf.constant(scores), tf.constant(indices), confirm[0], keys,
                             catalog_keys, confirm[1], k, tf.constant(True))
    assert not complete.short.numpy().any()


def test_drop_excluded_edge_shapes_and_forged_matches():
    """An empty batch, no excluded ids ([B, 0]), and a fingerprint match whose string differs
    (an id outside the catalog): that candidate is kept and its row flagged to be searched
    again with every match confirmed."""
    catalog = tf.constant(CATALOG)
    item_keys = ItemIndex(CATALOG).keys
    scores = tf.constant([[3.0, 2.0, 1.0]])
    indices = tf.constant([[4, 5, 6]], tf.int32)
    none = drop_excluded(scores, indices, tf.zeros([1, 0], tf.string), tf.zeros([1, 0], tf.int64),
                         item_keys, catalog, 2, tf.constant(False))
    assert none.indices.numpy().tolist() == [[4, 5]] and not none.short.numpy()[0]
    empty = drop_excluded(tf.zeros([0, 3]), tf.zeros([0, 3], tf.int32),
                          tf.zeros([0, 2], tf.string), tf.zeros([0, 2], tf.int64), item_keys,
                          catalog, 2, tf.constant(False))
    assert empty.indices.shape == (0, 2) and empty.short.shape == (0,)
    no_candidates = drop_excluded(tf.zeros([0, 0]), tf.zeros([0, 0], tf.int32),
                                  tf.zeros([0, 0], tf.string), tf.zeros([0, 0], tf.int64),
                                  item_keys, catalog, 2, tf.constant(False))
    assert no_candidates.indices.shape == (0, 0) and no_candidates.short.shape == (0,)
    # "not-i5" given the fingerprint of i5, as a colliding id would have it
    forged = drop_excluded(scores, indices, tf.constant([[b"not-i5", b"i6"]]),
                           tf.gather(item_keys, [[5, 6]]), item_keys, catalog, 2,
                           tf.constant(False))
    assert forged.indices.numpy().tolist() == [[4, 5]] and forged.short.numpy()[0]


def test_slack_grows_with_k():
    assert slack(10) == 16 and slack(100) == 25 and slack(1000) == 250


def test_search_excluding_with_room_for_every_excluded_item():
    """The retry path on an index without its own masking (brute force): the exact top k of
    the items left, -inf slots when fewer are left, an empty batch."""
    from fm_keras.recall import BruteForceIndex

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 4)).astype(np.float32)
    queries = rng.normal(size=(3, 4)).astype(np.float32)
    order = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")
    excluded = np.full((3, 48), -1, np.int32)
    excluded[0, :30] = order[0, :30]  # the best 30 of user 0
    excluded[1, :10] = rng.choice(50, 10)
    excluded[2, :48] = order[2, :48]  # two items left for user 2
    index = BruteForceIndex(vectors)
    scores, got = search_excluding(index, tf.constant(queries), 5, tf.constant(excluded), 50)
    for b in range(3):
        want = [i for i in order[b] if i not in excluded[b]][:5]
        assert list(got.numpy()[b][:len(want)]) == want
    # user 2: two items, then slots scored -inf (the servable's pads)
    assert np.isfinite(scores.numpy()[2, :2]).all() and np.isneginf(scores.numpy()[2, 2:]).all()
    none = search_excluding(index, tf.zeros([0, 4]), 5, tf.zeros([0, 3], tf.int32), 50)
    assert none[1].shape[0] == 0


def _reference_keys(ids):
    """Python's own reading of the ids' bytes as little-endian integers."""
    return [UNKNOWN_KEY if len(i) > KEY_BYTES or b"\0" in i
            else int.from_bytes(i, "little", signed=len(i) == KEY_BYTES) for i in ids]


def test_item_keys_are_the_ids_little_endian_bytes():
    """The NumPy reference: "ab" -> 0x6261, 8 bytes wrap to int64, "" pads, an id of more than
    8 bytes or with a NUL byte is `UNKNOWN_KEY`; equal keys only for equal ids."""
    ids = np.array([b"ab", b"", b"\xff" * 7 + b"\x7f", b"\x80" * 8, b"123456789", b"a\0",
                    "é".encode()], dtype=object)
    keys = item_keys(ids)
    assert keys.dtype == np.int64
    assert keys.tolist() == [0x6261, PAD_KEY, 2**63 - 1, int.from_bytes(b"\x80" * 8, "little")
                             - 2**64, UNKNOWN_KEY, UNKNOWN_KEY, 0xA9C3]
    assert keys.tolist() == _reference_keys(ids)
    assert item_keys(ids.reshape(7, 1)).shape == (7, 1)
    assert item_keys(np.zeros((0, 3), dtype=object)).shape == (0, 3)
    # Regression (trial): text, as a client holds it (the README names item_keys the
    # reference), was a TypeError from bytes.join; it is read as its UTF-8 bytes.
    assert item_keys(["ab", "é", ""]).tolist() == [0x6261, 0xA9C3, PAD_KEY]
    assert item_keys(np.array([["ab", "é"]])).tolist() == [[0x6261, 0xA9C3]]
    assert item_keys(np.array(["ab", b"ab"], dtype=object)).tolist() == [0x6261, 0x6261]


def test_packed_keys_equal_the_reference():
    """Random ids of 1-10 bytes (NUL and 0xFF bytes included) at random offsets of one buffer:
    `packed_keys` equals `item_keys` of the cut-out ids, the buffer's last byte included."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        raw = rng.integers(0, 256, rng.integers(1, 200)).astype(np.uint8)
        if rng.random() < 0.5:
            raw[raw == 0] = 1
        begin = rng.integers(0, raw.size, 40)
        length = np.minimum(rng.integers(1, KEY_BYTES + 3, 40), raw.size - begin)
        want = _reference_keys([raw[b:b + n].tobytes() for b, n in zip(begin, length)])
        assert packed_keys(raw, begin, length).tolist() == want
        ids = np.array([raw[b:b + n].tobytes() for b, n in zip(begin, length)], dtype=object)
        assert item_keys(ids).tolist() == want


def test_catalog_keys_only_for_catalogs_of_short_ids():
    ids = np.array([b"i1", b"12345678", "é".encode()], dtype=object)
    assert catalog_keys(ids).tolist() == item_keys(ids).tolist()
    for bad in (b"", b"123456789", b"a\0", b"\xff"):
        assert catalog_keys(np.array([b"i1", bad], dtype=object)) is None
