"""Helpers of the tests that the best-weights copy's trained rows cover every row training
changes (tests/test_training.py, tests/test_retrieval.py)."""

import numpy as np

from fm_keras import checkpoints
from fm_keras.runs import TrainingState


def record_trained_rows(monkeypatch, trainer) -> dict:
    """Makes every table big enough for a partial best-weights copy and records what the
    `trainer` module (`fm_keras.training`, `fm_keras.retrieval`) gives its `TrainingState`:
    ``trained`` (the mask), ``state``, and ``epochs``, the FM weights before training and at
    every epoch end; with `fm_keras.training`, ``counts`` (the l2_prior counts it came from)."""
    monkeypatch.setattr(checkpoints, "PARTIAL_COPY_MIN_ELEMENTS", 0)
    monkeypatch.setattr(checkpoints, "PARTIAL_COPY_MAX_SHARE", 1.0)
    seen = {}

    def recording(num_ids, *ids, counts=None):
        seen["counts"] = counts
        return checkpoints.trained_rows(num_ids, *ids, counts=counts)

    class Recording(TrainingState):
        def __init__(self, run_dir, model, config, resume, **kwargs):
            super().__init__(run_dir, model, config, resume, **kwargs)
            seen.update(trained=kwargs["trained_rows"], state=self,
                        epochs=[[v.numpy().copy() for v in model.fm.trainable_weights]])

        def on_epoch_end(self, epoch, logs=None):
            super().on_epoch_end(epoch, logs)
            seen["epochs"].append([v.numpy().copy() for v in self.model.fm.trainable_weights])

    monkeypatch.setattr(trainer, "trained_rows", recording)
    monkeypatch.setattr(trainer, "TrainingState", Recording)
    return seen


def changed_rows(before, after, num_ids: int) -> np.ndarray:
    """bool [num_ids]: rows of the id tables that differ between two weight snapshots."""
    changed = np.zeros(num_ids, bool)
    for b, a in zip(before, after):
        if b.ndim and b.shape[0] == num_ids:
            changed |= (b != a).reshape(num_ids, -1).any(1)
    return changed


def with_new_catalog_items(data_dir: str, items: int = 20) -> None:
    """Adds `items` items that no interaction holds (ids and genre out of vocabulary) to
    ``items.csv`` of `retrieval_testlib.write_implicit` data."""
    import os

    import pandas as pd

    path = os.path.join(data_dir, "items.csv")
    extra = pd.DataFrame({"item_id": [f"new{j}" for j in range(items)], "genre": "g_new"})
    pd.concat([pd.read_csv(path), extra]).to_csv(path, index=False)
