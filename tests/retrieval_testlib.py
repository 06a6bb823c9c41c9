"""Helpers shared by the retrieval tests: a tiny implicit log with a planted structure
(users pick their segment's genre). A module of its own, not conftest.py: tests/serving has a
conftest too, and ``from conftest import ...`` would pick whichever was imported first."""

import os

IMPLICIT_FEATURES = [
    {"name": "user_id", "kind": "categorical", "tower": "user"},
    {"name": "segment", "kind": "categorical", "tower": "user"},
    {"name": "item_id", "kind": "categorical", "tower": "item"},
    {"name": "genre", "kind": "categorical", "tower": "item"},
]


def write_implicit(out, users: int = 120, items: int = 60, per_user: int = 12, seed: int = 0):
    """Writes items.csv (item_id, genre) and train/valid/test.csv logs (user_id, segment,
    item_id, genre, click=1) split at random 80/10/10; returns the directory."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    os.makedirs(out, exist_ok=True)
    catalog = pd.DataFrame({"item_id": [f"i{j}" for j in range(items)],
                            "genre": [f"g{j % 5}" for j in range(items)]})
    catalog.to_csv(os.path.join(out, "items.csv"), index=False)
    segment = rng.integers(0, 5, users)
    rows = []
    for u in range(users):
        liked = np.arange(segment[u], items, 5)
        picks = rng.choice(liked, per_user, replace=True)
        picks = np.where(rng.random(per_user) < 0.2, rng.integers(0, items, per_user), picks)
        rows += [(f"u{u}", f"s{segment[u]}", f"i{j}") for j in picks]
    log = pd.DataFrame(rows, columns=["user_id", "segment", "item_id"]).drop_duplicates()
    log = log.merge(catalog, on="item_id").assign(click=1).sample(frac=1.0, random_state=seed)
    n = len(log)
    for name, part in (("train", log[:int(0.8 * n)]), ("valid", log[int(0.8 * n):int(0.9 * n)]),
                       ("test", log[int(0.9 * n):])):
        part.to_csv(os.path.join(out, f"{name}.csv"), index=False)
    return out


def implicit_experiment(data_dir, task: str = "retrieval", **training) -> dict:
    """An experiment dict over `write_implicit` data (paths relative to `data_dir`)."""
    settings = {"epochs": 3, "batch_size": 64, "learning_rate": 0.05, "steps_per_execution": 4,
                "early_stopping_patience": 2}
    if task == "retrieval":
        settings["retrieval"] = {"recall_at": 10, "catalog_negatives": 8}
    settings.update(training)
    return {"data": {"train": "train.csv", "valid": "valid.csv", "test": "test.csv",
                     "label": "click", "items": "items.csv"},
            "features": IMPLICIT_FEATURES,
            "model": {"task": task, "embedding_dim": 8},
            "training": settings}
