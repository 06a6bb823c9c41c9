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

from fm_keras._tf import tf
from fm_keras.exclusion import fingerprint, fingerprints
from fm_keras.progress import log

EXAMPLES = 5  # unknown ids quoted in the summary
CHECKED = 10_000  # excluded ids looked up per run, the first ones read


class UnknownIds:
    """Counts, among the first `CHECKED` excluded ids read, those that are not catalog ids.

    Ids are compared by their 64-bit fingerprints (`fm_keras.exclusion.fingerprint`, what
    ``exclude_seen`` itself compares): an unknown id sharing a catalog id's fingerprint (odds
    about items / 2^64) would be counted as known.

    Args:
        catalog_ids: the catalog's item ids, UTF-8 bytes (object array [items]).

    Attributes:
        checked: the non-empty ids looked up so far (at most `CHECKED`), in reading order.
        unknown: those that are not catalog ids.
        examples: up to `EXAMPLES` distinct unknown ids, as text.
    """

    def __init__(self, catalog_ids: np.ndarray):
        self.keys = np.sort(fingerprints(catalog_ids))  # an export's catalog is never empty
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

    def _look_up(self, present: tf.Tensor) -> None:
        keys = fingerprint(present).numpy()
        at = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        missing = self.keys[at] != keys
        self.checked += int(keys.size)
        self.unknown += int(missing.sum())
        if missing.any() and len(self.examples) < EXAMPLES:
            for value in present.numpy()[missing][:EXAMPLES]:
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
