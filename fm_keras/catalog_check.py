"""Excluded item ids checked against a recall export's catalog, for `recommend`'s summary.

An exclusion list naming ids the catalog does not hold excludes nothing for them, silently
(a different id format, a stale list, a typo): `UnknownIds` counts them as the lists are
read, so that the summary, and a warning, say so. Only the first `CHECKED` ids are looked up:
enough to see a systematic mismatch. Checking every id cost more than the rest of `recommend`
with exclusions: 90 ms per 1,000 users x 600 ids against 13 for their split (100k-item
catalog); the first 10,000 cost 3 ms, once (BENCHMARKS.md, session 10).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from fm_keras._tf import tf
from fm_keras.arrow_text import split_ids
from fm_keras.exclusion import PAD_KEY, fingerprint, fingerprints, item_keys
from fm_keras.progress import log

EXAMPLES = 5  # unknown ids quoted in the summary
CHECKED = 10_000  # excluded ids looked up per run, the first ones read


class UnknownIds:
    """Counts, among the first `CHECKED` excluded ids read, those that are not catalog ids.

    Ids are compared by their 64-bit fingerprints (`fm_keras.exclusion.fingerprint`, what
    ``exclude_seen`` itself compares): an unknown id sharing a catalog id's fingerprint (odds
    about items / 2^64) would be counted as known. Item keys (`count_keys`, what
    ``exclude_seen_keys`` compares) are exact.

    Args:
        catalog_ids: the catalog's item ids, UTF-8 bytes (object array [items]).
        by_item_keys: the ids will come as item keys (`count_keys`), not strings (`count`).

    Attributes:
        checked: the non-empty ids looked up so far (at most `CHECKED`), in reading order.
        unknown: those that are not catalog ids.
        examples: up to `EXAMPLES` distinct unknown ids, as text.
    """

    def __init__(self, catalog_ids: np.ndarray, by_item_keys: bool = False):
        # The catalog's keys, sorted (an export's catalog is never empty), made here: not in
        # the timed reading of the lists.
        self._by_item_keys = by_item_keys
        self._keys = np.sort(item_keys(catalog_ids) if by_item_keys
                             else fingerprints(catalog_ids))
        self.checked, self.unknown, self.examples = 0, 0, []

    def count(self, ids: tf.Tensor) -> tf.Tensor:
        """Looks up the batch's ids while fewer than `CHECKED` have been; returns `ids`.

        Args:
            ids: string [rows, width], "" pads (`fm_keras.arrow_text.split_ids`).
        """
        row, rows, width = 0, int(ids.shape[0]), max(int(ids.shape[1]), 1)
        while self.checked < CHECKED and row < rows:
            end = min(rows, row + -(-(CHECKED - self.checked) // width))
            part = ids[row:end]
            present = tf.boolean_mask(part, tf.strings.length(part) > 0)
            self._look_up(present[:CHECKED - self.checked])
            row = end
        return ids

    def count_keys(self, keys: np.ndarray, lists: pa.Array, sep: str = "|") -> np.ndarray:
        """`count` for item keys: looks up the batch's keys while fewer than `CHECKED` have
        been; returns `keys`.

        Args:
            keys: int64 [rows, width], `fm_keras.exclusion.PAD_KEY` pads
                (`fm_keras.arrow_text.split_keys` of `lists`).
            lists: the text column they were cut from (`sep`-separated), read again for the
                examples only.
        """
        row, rows, width = 0, keys.shape[0], max(keys.shape[1], 1)
        while self.checked < CHECKED and row < rows:
            end = min(rows, row + -(-(CHECKED - self.checked) // width))
            part = keys[row:end]
            present = part[part != PAD_KEY][:CHECKED - self.checked]
            missing = self._missing(present, by_item_keys=True)
            if missing.any() and len(self.examples) < EXAMPLES:
                ids = split_ids(lists.slice(row, end - row), sep).numpy()
                self._quote(ids[ids != b""][:len(present)][missing])
            row = end
        return keys

    def _look_up(self, present: tf.Tensor) -> None:
        missing = self._missing(fingerprint(present).numpy(), by_item_keys=False)
        if missing.any() and len(self.examples) < EXAMPLES:
            self._quote(present.numpy()[missing])

    def _missing(self, keys: np.ndarray, by_item_keys: bool) -> np.ndarray:
        """bool [n]: which of `keys` (of the ids looked up, in reading order) are not the
        catalog's; counts them."""
        if by_item_keys != self._by_item_keys:
            raise ValueError(f"UnknownIds(by_item_keys={self._by_item_keys}) cannot "
                             f"{'count_keys' if by_item_keys else 'count'}")
        at = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
        missing = self._keys[at] != keys
        self.checked += int(keys.size)
        self.unknown += int(missing.sum())
        return missing

    def _quote(self, ids: np.ndarray) -> None:
        """Keeps up to `EXAMPLES` distinct unknown ids (UTF-8 bytes) as text."""
        for value in ids[:EXAMPLES]:
            text = value.decode("utf-8", "replace")
            if text not in self.examples and len(self.examples) < EXAMPLES:
                self.examples.append(text)

    def summary(self) -> dict:
        """``{"excluded_ids_checked", "excluded_ids_not_in_catalog",
        "not_in_catalog_examples"}``; logs a warning when some ids are not in the catalog."""
        if self.unknown:
            log(f"warning: {self.unknown:,} of the first {self.checked:,} excluded ids are not "
                f"in the catalog (e.g. {self.examples[:3]}); they exclude nothing")
        return {"excluded_ids_checked": self.checked, "excluded_ids_not_in_catalog": self.unknown,
                "not_in_catalog_examples": list(self.examples)}
