"""Arrow text columns as TensorFlow string tensors, cut from the Arrow buffers in C++.

A column becomes a [rows] tensor (`string_tensor`) and a column of ``|``-separated id lists a
[rows, width] one (`split_ids`, `recommend`'s exclusion lists): one `tf.strings.substr` of the
batch's bytes each, never a Python object per cell (`fm_keras.scoring` reads files with them).
`split_keys` gives such lists as int64 item keys instead (`fm_keras.exclusion`), with NumPy
alone.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from fm_keras._tf import tf
from fm_keras.exclusion import packed_keys
from fm_keras.reading import as_text


# Cut off around each item of a list ("i1 | i2"): ASCII space and the control characters.
BLANKS = "".join(map(chr, range(33)))


def string_tensor(array: pa.Array) -> tf.Tensor:
    """An Arrow text column as a tf.string tensor of shape [rows] ("" for a null)."""
    array = as_text(array)  # Arrow string (32-bit offsets, read below), "" for a null
    _, offsets, data = array.buffers()
    offsets = np.frombuffer(offsets, np.int32, count=len(array) + 1, offset=array.offset * 4)
    start, end = int(offsets[0]), int(offsets[-1])
    text = memoryview(data)[start:end].tobytes() if data is not None else b""
    return tf.strings.substr(_bytes_scalar(text), offsets[:-1] - start, np.diff(offsets))


def _bytes_scalar(text: bytes) -> tf.Tensor:
    """Bytes as a scalar tf.string, through a 0-d object array: `tf.constant(bytes)` costs
    ~2.5 ms per MB more (measured on 4 MB)."""
    return tf.constant(np.array(text, dtype=object))


def split_ids(array: pa.Array, sep: str = "|") -> tf.Tensor:
    """A text column of `sep`-separated lists ("a|b|c") as a [rows, width] string tensor,
    padded with "" (width: the longest list; empty items and null cells give no entries).
    Each item is stripped of the ASCII spaces and control characters (tab, CR, LF) around it:
    "i1 | i2" gives "i1" and "i2"; an item of blanks only gives no entry.

    The separators are found with NumPy in the column's Arrow buffer and every item is cut
    from it by one `tf.strings.substr`: a third less CPU than `tf.strings.split` of the column
    tensor and `to_tensor` (600 ids per row, BENCHMARKS.md). It runs on one thread kept for
    the process: on the thread that `run_signature`'s reader makes per call, glibc gives the
    temporaries a fresh malloc arena whose pages fault in every time (1,000 rows x 600 ids:
    22 ms there, 13 ms on a thread that has done it before).
    """
    return _split_thread().submit(_split_ids, array, sep).result()


_SPLIT_THREAD: list[ThreadPoolExecutor] = []


def _split_thread() -> ThreadPoolExecutor:
    """The thread `split_ids` runs on, made on first use and kept for the process."""
    if not _SPLIT_THREAD:
        _SPLIT_THREAD.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="split_ids"))
    return _SPLIT_THREAD[0]


# A forked child has no copy of the thread: it makes its own on first use.
os.register_at_fork(after_in_child=_SPLIT_THREAD.clear)


def split_keys(array: pa.Array, sep: str = "|") -> np.ndarray:
    """A text column of `sep`-separated lists as the ids' item keys, int64 [rows, width],
    padded with `fm_keras.exclusion.PAD_KEY` (0): the items of `split_ids`, same order, each
    as `fm_keras.exclusion.item_keys` has it (an id no packable catalog holds, longer than 8
    bytes or with a NUL byte: `UNKNOWN_KEY`). Read from the Arrow buffer with NumPy only, no
    string tensor: about half the CPU of `split_ids` on 1,000 rows of 600 ids, and what
    follows compares integers (BENCHMARKS.md, session 21). Runs on `split_ids`' thread."""
    return _split_thread().submit(_split_keys, array, sep).result()


def _split_keys(array: pa.Array, sep: str) -> np.ndarray:
    """`split_keys` on the calling thread."""
    raw, begin, length, counts = _items(array, sep)
    keys = np.zeros((len(array), _width(counts)), np.int64)
    keys[_filled(counts)] = packed_keys(raw, begin, length)
    return keys


def _split_ids(array: pa.Array, sep: str) -> tf.Tensor:
    """`split_ids` on the calling thread."""
    raw, begin, length, counts = _items(array, sep)
    filled = _filled(counts)  # [rows, width]: the slots holding an item
    pos = np.zeros(filled.shape, np.int32)
    size = np.zeros(filled.shape, np.int32)
    pos[filled], size[filled] = begin, length  # row-major: the items in order
    return tf.strings.substr(_bytes_scalar(raw.tobytes()), pos, size)


def _width(counts: np.ndarray) -> int:
    return int(counts.max()) if len(counts) else 0


def _filled(counts: np.ndarray) -> np.ndarray:
    """bool [rows, width]: the slots of a row-major [rows, longest list] array holding an item."""
    return np.arange(_width(counts)) < counts[:, None]


def _items(array: pa.Array, sep: str
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The items of a column of `sep`-separated lists, found in its Arrow buffer.

    Returns:
        ``(raw, begin, length, counts)``: the column's bytes (uint8 [bytes]); each non-empty
        item's first byte in them and its length, blanks around it cut off (int32 [items], in
        row order); the items per row (int [rows]).
    """
    array = as_text(array)  # Arrow string (32-bit offsets, read below), "" for a null
    _, offsets, data = array.buffers()
    bounds = np.frombuffer(offsets, np.int32, count=len(array) + 1, offset=array.offset * 4)
    start = int(bounds[0])
    bounds = bounds - start
    raw = np.frombuffer(data, np.uint8, count=int(bounds[-1]), offset=start) \
        if data is not None else np.zeros(0, np.uint8)
    seps = np.flatnonzero(raw == ord(sep)).astype(np.int32)
    first = np.searchsorted(seps, bounds)  # per row: index of its first separator
    counts = np.diff(first) + 1  # items per row (a row without separators holds one)
    head = first[:-1] + np.arange(len(array))  # flat index of each row's first item
    end = np.insert(seps, first[1:], bounds[1:])  # a row's last item ends where the row does
    begin = np.empty_like(end)
    begin[1:] = end[:-1] + 1  # an item starts after the separator ending the one before ...
    begin[head] = bounds[:-1]  # ... or where its row starts
    length = end - begin
    last_blank = ord(BLANKS[-1])
    if raw.size and raw.min() <= last_blank:  # a blank somewhere (one fast pass)
        begin, length = _strip(raw <= last_blank, begin, length)
    if not length.all():  # empty items ("a||b", "", " ") give no entry
        some = length > 0
        counts = np.add.reduceat(some, head, dtype=np.int64) if len(array) else counts
        begin, length = begin[some], length[some]
    return raw, begin, length, counts


def _strip(blank: np.ndarray, begin: np.ndarray, length: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray]:
    """The items ``[begin, begin + length)`` of a buffer whose bytes are `blank` (bool [bytes])
    at either end cut off: new (begin, length), int32 [items]; an all-blank item gets length 0.
    A pass per blank byte, over the items that still start (or end) with one: few passes."""
    begin, length = begin.copy(), length.copy()
    items = np.flatnonzero(length > 0)
    while items.size:  # leading blanks
        items = items[blank[begin[items]]]
        begin[items] += 1
        length[items] -= 1
        items = items[length[items] > 0]
    items = np.flatnonzero(length > 0)
    while items.size:  # trailing blanks
        items = items[blank[begin[items] + length[items] - 1]]
        length[items] -= 1
        items = items[length[items] > 0]
    return begin, length
