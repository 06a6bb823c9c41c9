"""Leaving a user's excluded items out of a top-k search, exactly, with stock TensorFlow ops.

The `exclude_seen` signature of a recall export gets [B, n] item ids per call (e.g. 600 items a
user has seen) and must never return one of them. Per call:

1. ids -> keys: the 64-bit FarmHash fingerprints of the excluded ids
   (`tf.strings.to_hash_bucket_fast`, the same op at build and serve time); the catalog's
   fingerprints are stored with the export (`ItemIndex.keys`). A fingerprint match is not yet
   an id match (an id outside the catalog may share a fingerprint); `drop_excluded` confirms
   every candidate it drops by string.
2. The index is searched for k + `slack(k)` candidates, not k + n (ScaNN, 1,000 queries of the
   BENCHMARKS.md run: 46 ms CPU for 610 results, 28 for 100).
3. Membership of the [B, K] candidates' fingerprints in the row's n excluded fingerprints
   (`member_positions`): a sort of the shorter side (the K candidates when K < n) and a binary
   search of the other in it per row; a matched candidate is dropped when the id at the matched
   position equals its own (the string confirmation, on hits only). Comparing fingerprints
   skips a hash-table lookup of every excluded id (3 ms CPU per 1,000 x 600 ids).
   With `item keys` instead of ids (the ``exclude_seen_keys`` signature, below), keys are
   exact and nothing needs confirming.
4. Rows where fewer than k candidates survive (more than `slack(k)` excluded items among the
   row's top K), or where a fingerprint matched a different id, are reported
   (`Dropped.short`); the caller maps those rows' ids to catalog indices (`ItemIndex`) and
   searches them again with room for every excluded item and every match confirmed by string.

Item keys. Cutting 600 ids per user out of text into string tensors and fingerprinting them costs
more than ScaNN's search of that user (BENCHMARKS.md, exclusions). When every catalog id is
1-8 bytes of UTF-8 without a NUL byte (`catalog_keys`: "i123", "1234567", most id schemes), an id's
key is its bytes read as a little-endian unsigned 64-bit integer, stored as int64
(`item_keys`): a client computes it from the bytes it already holds, no hash, and equal keys
are equal ids. `fm_keras.arrow_text.split_keys` cuts them straight out of an Arrow buffer. An
id that no packable catalog can hold (longer than 8 bytes, or with a NUL byte) gets
`UNKNOWN_KEY` (8 bytes 0xFF, never UTF-8), and 0 (`PAD_KEY`, the empty id) pads a row.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from fm_keras._tf import tf
from fm_keras.errors import ExportError

# to_hash_bucket_fast(x, FINGERPRINT_BUCKETS) = Fingerprint64(x) mod (2^63 - 1): int64, >= 0.
FINGERPRINT_BUCKETS = 2**63 - 1


KEY_BYTES = 8  # the longest id an item key holds
PAD_KEY = 0  # pads a row of item keys: the empty id, never an item
UNKNOWN_KEY = -1  # an id no packable catalog holds (8 bytes 0xFF, never UTF-8)


def item_keys(ids: np.ndarray) -> np.ndarray:
    """Item ids -> their item keys.

    Args:
        ids: UTF-8 bytes, object array of any shape (or anything `np.asarray` makes one of);
            an id given as text (``str``) is read as its UTF-8 bytes.

    Returns:
        int64, shaped like `ids`: each id's bytes as a little-endian unsigned integer, as
        int64 (two's complement): ``b"ab"`` -> 0x6261; `PAD_KEY` for ``b""``; `UNKNOWN_KEY`
        for an id longer than `KEY_BYTES` or holding a NUL byte. (`packed_keys` of the ids
        laid end to end: 100k catalog ids in ~10 ms.)
    """
    flat = np.asarray(ids, dtype=object).ravel()
    try:
        joined = b"".join(flat)
    except TypeError:  # text among the ids: as its UTF-8 bytes
        flat = [i.encode("utf-8") if isinstance(i, str) else i for i in flat]
        joined = b"".join(flat)
    length = np.fromiter(map(len, flat), np.int64, len(flat))
    begin = np.cumsum(length) - length
    raw = np.frombuffer(joined, np.uint8)
    return packed_keys(raw, begin, length).reshape(np.shape(ids))


def catalog_keys(ids: np.ndarray) -> np.ndarray | None:
    """The item keys of a catalog's ids, int64 [N], when they identify every id (each is
    1-`KEY_BYTES` bytes of UTF-8 without a NUL byte: no key is `PAD_KEY` or `UNKNOWN_KEY`);
    None otherwise.

    Args:
        ids: the catalog's ids, UTF-8 bytes (object array [N]).
    """
    keys = item_keys(ids)
    if np.isin(keys, (PAD_KEY, UNKNOWN_KEY)).any():
        return None
    try:
        for i in ids:
            i.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return keys


_MASKS = np.array([(1 << (8 * n)) - 1 for n in range(KEY_BYTES + 1)], np.uint64)


def packed_keys(raw: np.ndarray, begin: np.ndarray, length: np.ndarray) -> np.ndarray:
    """The item keys of ids cut out of one byte buffer, without a Python object per id.

    Args:
        raw: the bytes, uint8 [bytes].
        begin, length: each id's first byte in `raw` and its length, int [ids] (length 0:
            `PAD_KEY`).

    Returns:
        int64 [ids], the item keys of the ids ``raw[begin:begin + length]``: one unaligned
        8-byte read per id, its bytes past `length` cleared.
    """
    padded = np.zeros(raw.size + KEY_BYTES, np.uint8)
    padded[:raw.size] = raw
    # Every byte offset as the start of an 8-byte little-endian word (an unaligned view).
    words = np.ndarray((raw.size + 1,), "<u8", padded, 0, (1,))
    keys = words[begin] & _MASKS[np.minimum(length, KEY_BYTES)]
    keys = keys.view(np.int64)
    keys[length > KEY_BYTES] = UNKNOWN_KEY
    if raw.size and raw.min() == 0:  # an id holding a NUL byte is no catalog id
        nuls = np.concatenate([[0], np.cumsum(raw == 0)])
        keys[nuls[begin + length] > nuls[begin]] = UNKNOWN_KEY
    return keys


def slack(k: int) -> int:
    """Extra candidates searched beyond k so that excluded ones can be dropped: k // 4, at
    least 16 (random exclusions of 600 of 100k items leave 0-3 among the top 125)."""
    return max(16, k // 4)


def fingerprint(ids):
    """ids (string tensor) -> their int64 fingerprints, the same op at build and serve time."""
    return tf.strings.to_hash_bucket_fast(ids, FINGERPRINT_BUCKETS)


def fingerprints(ids: np.ndarray) -> np.ndarray:
    """UTF-8 item ids (object array of bytes) -> their int64 fingerprints [N], as served."""
    return fingerprint(tf.constant(ids, tf.string)).numpy()


class ItemIndex(tf.Module):
    """Item ids -> catalog indices through 64-bit fingerprints (stock ops only).

    Args:
        ids: the catalog's item ids, UTF-8 bytes (object array [N]); row i is item index i.

    Attributes:
        keys: the catalog ids' fingerprints, int64 [N] (a variable, saved with the export).

    Raises:
        ExportError: two catalog ids share a fingerprint (about N^2 / 2^64: never seen; the
            message names them).
    """

    def __init__(self, ids: np.ndarray):
        super().__init__(name="item_index")
        keys = fingerprints(ids)
        order = np.argsort(keys, kind="stable")
        same = np.flatnonzero(np.diff(keys[order]) == 0)
        if len(same):
            a, b = ids[order[same[0]]], ids[order[same[0] + 1]]
            raise ExportError(f"item ids {a!r} and {b!r} share a 64-bit fingerprint; rename one "
                              "of them")
        self.keys = tf.Variable(keys, trainable=False, dtype=tf.int64, name="keys")
        self.table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
            tf.constant(keys, tf.int64), tf.range(len(keys), dtype=tf.int32)), -1)

    def __call__(self, ids):
        """ids [B, n] string -> [B, n] int32: the catalog index whose fingerprint each id has,
        -1 for none ("" and unknown ids). Unconfirmed: see `drop_excluded`."""
        return self.table.lookup(fingerprint(ids))


def member_positions(values, sets):
    """values [B, m], sets [B, n] (int32 or int64, one dtype) -> [B, m] int32: the first
    position j with sets[b, j] == values[b, i], or -1 (none).

    Every value is compared, -1 included (a -1 value finds a -1 in its row's set). A sort of
    the shorter side per row and a binary search of the longer side in it
    (O((m + n) log min(m, n))), not an [B, m, n] comparison: for ScaNN's 125 candidates
    against 600 excluded ids, sorting the candidates costs 16 ms CPU per 1,000 rows where
    sorting the ids costs 31 (BENCHMARKS.md, exclusions).

    Raises:
        InvalidArgumentError: values and sets differ in B.
    """
    values, sets = tf.convert_to_tensor(values), tf.convert_to_tensor(sets)
    m, n = tf.shape(values)[1], tf.shape(sets)[1]
    # An empty batch answers without a search: tf.searchsorted rejects [0, 0] against [0, m].
    return tf.cond(
        tf.shape(values)[0] > 0,
        lambda: tf.cond(m < n, lambda: _positions_sorting_values(values, sets),
                        lambda: _positions_sorting_sets(values, sets)),
        lambda: tf.fill(tf.shape(values), -1))


def _positions_sorting_sets(values, sets):
    """`member_positions` by a (stable) sort of each row's set and a search of its values."""
    rows, n = tf.shape(sets)[0], tf.shape(sets)[1]
    pad = tf.fill([rows, 1], tf.constant(-2, sets.dtype))  # n = 0 still has a slot
    padded = tf.concat([sets, pad], axis=1)
    order = tf.argsort(padded, axis=1, stable=True)  # equal ids: smallest position first
    ordered = tf.gather(padded, order, batch_dims=1)
    pos = tf.minimum(tf.searchsorted(ordered, values, side="left"), n)
    at = tf.gather(order, pos, batch_dims=1)
    return tf.where(tf.equal(tf.gather(ordered, pos, batch_dims=1), values) & (at < n), at, -1)


def _positions_sorting_values(values, sets):
    """`member_positions` by a sort of each row's values and a search of its set in them.

    A set entry found at sorted slot p (the first of the run of equal values) gives p its
    position j; a slot keeps the smallest such j (a segment minimum over the hits only), and
    every value reads the slot of its run's first element, so duplicates answer alike.
    """
    rows, m, n = tf.shape(values)[0], tf.shape(values)[1], tf.shape(sets)[1]
    ordered = tf.concat([tf.sort(values, axis=1), tf.fill([rows, 1], values.dtype.max)], axis=1)
    slot = tf.searchsorted(ordered, sets, side="left")  # [B, n] in [0, m]; m: read by none
    hit = tf.equal(tf.gather(ordered, slot, batch_dims=1), sets)
    found = tf.cast(tf.where(hit), tf.int32)  # [H, 2]: (row, j) of the hits
    first = tf.math.unsorted_segment_min(  # empty slots: int32 max
        found[:, 1], found[:, 0] * (m + 1) + tf.gather_nd(slot, found), rows * (m + 1))
    pos = tf.gather(tf.reshape(first, [rows, m + 1]),
                    tf.searchsorted(ordered, values, side="left"), batch_dims=1)
    return tf.where(pos < n, pos, -1)


def is_member(values, sets):
    """values [B, m] int32, sets [B, n] int32 -> [B, m] bool: values[b, i] in sets[b, :]."""
    return member_positions(values, sets) >= 0


class Dropped(NamedTuple):
    """`drop_excluded`'s result: the best k survivors and the rows that ran short."""

    scores: tf.Tensor  # [B, k'] float32, -inf where no item
    indices: tf.Tensor  # [B, k'] int32, -1 where no item
    short: tf.Tensor  # [B] bool: fewer than k survivors among candidates that were not all


def drop_excluded(scores, indices, ids, keys, item_keys, item_ids, k, complete) -> Dropped:
    """The best k candidates that are not among each row's excluded ids (compared as strings).

    Args:
        scores: [B, K] float32 candidate scores, indices: [B, K] int32 item indices (-1: none).
        ids: [B, n] string excluded ids; None when equal keys are equal ids (item keys).
        keys: [B, n] int keys of the excluded ids, item_keys: [N] the catalog's keys by index,
            such that equal ids have equal keys (`fingerprint` and `ItemIndex.keys`;
            `ItemIndex` indices and ``tf.range(N)``; `item_keys` of both). With `ids`, equal
            keys need not be equal ids.
        item_ids: [N] string, the catalog ids by index; None with `ids` None.
        k: results wanted (k <= K).
        complete: scalar bool, True when the candidates are every item the index can return
            (then a short row is final, not a row to search again).

    Returns:
        `Dropped`. A candidate is dropped iff its key is among the row's excluded keys and
        (with `ids`) the id at that position equals its id. A row where the two differ (an
        id outside the catalog with a catalog id's fingerprint) is returned as short, so that
        the caller searches it again with every match confirmed.
    """
    entry = member_positions(tf.gather(item_keys, tf.maximum(indices, 0)), keys)  # [B, K]
    matched = (entry >= 0) & (indices >= 0)
    if ids is None:  # exact keys: a match is the id
        hit, suspect = matched, tf.zeros_like(matched[:, 0])
    else:
        at = tf.where(matched)  # [H, 2]: only the matches are compared as strings
        same = tf.equal(tf.gather(item_ids, tf.gather_nd(indices, at)),
                        tf.gather_nd(ids, tf.stack([at[:, 0], tf.cast(tf.gather_nd(entry, at),
                                                                      at.dtype)], axis=1)))
        hit = tf.scatter_nd(at, tf.cast(same, tf.int32),
                            tf.shape(matched, out_type=at.dtype)) > 0
        suspect = tf.reduce_any(matched & ~hit, axis=1)
    keep = (indices >= 0) & ~hit
    best, pos = tf.math.top_k(tf.where(keep, scores, tf.constant(-np.inf, scores.dtype)),
                              k=tf.minimum(k, tf.shape(scores)[1]))
    chosen = tf.where(tf.gather(keep, pos, batch_dims=1), tf.gather(indices, pos, batch_dims=1),
                      -1)
    left = tf.reduce_sum(tf.cast(keep, tf.int32), axis=1)
    return Dropped(best, chosen, suspect | ((left < k) & tf.logical_not(complete)))


def search_excluding(index, queries, k, excluded, items):
    """Top k of `index` without the item indices `excluded` [B, n] int32 (-1: none), exact with
    room for every excluded item: the index masks them among its candidates
    (``index.search_excluding``, the partitioned index), or k + (most excluded items of a row)
    are searched and the excluded dropped. -> (scores [B, k], indices [B, k])."""
    if hasattr(index, "search_excluding"):
        return index.search_excluding(queries, k, excluded)
    counts = tf.reduce_sum(tf.cast(excluded >= 0, tf.int32), axis=1)
    extra = tf.reduce_max(tf.concat([counts, [0]], axis=0))  # 0 for an empty batch
    scores, idx = index.search(queries, tf.minimum(k + extra, items))
    scores = tf.where(is_member(idx, excluded), tf.constant(-np.inf, scores.dtype), scores)
    scores, pos = tf.math.top_k(scores, k=tf.minimum(k, tf.shape(scores)[1]))
    return scores, tf.gather(idx, pos, batch_dims=1)
