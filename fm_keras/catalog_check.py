"""Excluded item ids checked against a recall export's catalog, for `recommend`'s summary.

An exclusion list naming ids the catalog does not hold excludes nothing for them, silently
(a different id format, a stale list, a typo): `UnknownIds` counts them as the lists are
read, so that the summary, and a warning, say so.
"""

from __future__ import annotations

import numpy as np

from fm_keras._tf import tf
from fm_keras.exclusion import fingerprint, fingerprints
from fm_keras.progress import log

EXAMPLES = 5  # unknown ids quoted in the summary


class UnknownIds:
    """Counts the excluded ids that are not catalog ids.

    Ids are compared by their 64-bit fingerprints (`fm_keras.exclusion.fingerprint`, what
    ``exclude_seen`` itself compares): an unknown id sharing a catalog id's fingerprint (odds
    about items / 2^64) would be counted as known.

    Args:
        catalog_ids: the catalog's item ids, UTF-8 bytes (object array [items]).

    Attributes:
        excluded: the non-empty ids seen so far.
        unknown: those that are not catalog ids.
        examples: up to `EXAMPLES` distinct unknown ids, as text.
    """

    def __init__(self, catalog_ids: np.ndarray):
        self.keys = np.sort(fingerprints(catalog_ids))  # an export's catalog is never empty
        self.excluded, self.unknown, self.examples = 0, 0, []

    def count(self, ids: tf.Tensor) -> tf.Tensor:
        """Counts one batch of exclusion lists and returns it unchanged.

        Args:
            ids: string [rows, width], "" pads (`fm_keras.arrow_text.split_ids`).
        """
        present = tf.boolean_mask(ids, tf.strings.length(ids) > 0)
        keys = fingerprint(present).numpy()
        at = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        missing = self.keys[at] != keys
        self.excluded += int(keys.size)
        self.unknown += int(missing.sum())
        if missing.any() and len(self.examples) < EXAMPLES:
            for value in present.numpy()[missing][:EXAMPLES]:
                text = value.decode("utf-8", "replace")
                if text not in self.examples and len(self.examples) < EXAMPLES:
                    self.examples.append(text)
        return ids

    def summary(self) -> dict:
        """``{"excluded_ids", "excluded_ids_not_in_catalog", "not_in_catalog_examples"}``;
        logs a warning when some ids are not in the catalog."""
        if self.unknown:
            log(f"warning: {self.unknown:,} of {self.excluded:,} excluded ids are not in the "
                f"catalog (e.g. {self.examples[:3]}); they exclude nothing")
        return {"excluded_ids": self.excluded, "excluded_ids_not_in_catalog": self.unknown,
                "not_in_catalog_examples": list(self.examples)}
