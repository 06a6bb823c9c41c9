"""Test setup: Keras 2 for TFRS must be selected before TensorFlow is imported."""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def small_synth(tmp_path_factory):
    """A small synthetic CTR set (shared by tests that only need some realistic data)."""
    from fm_keras.synth import generate

    out = tmp_path_factory.mktemp("synth")
    oracle = generate(str(out), rows=20_000, seed=3)
    return out, oracle


@pytest.fixture(scope="session")
def small_run(small_synth, tmp_path_factory):
    """A finished 2-epoch run on the small synthetic set, calibrated by isotonic regression
    (the in-graph calibrator with the most ops: every export built from it carries it)."""
    import dataclasses

    from fm_keras.config import load_experiment
    from fm_keras.training import train

    synth_dir, _ = small_synth
    config = load_experiment(os.path.join(synth_dir, "experiment.yaml"))
    config = dataclasses.replace(config, training=dataclasses.replace(
        config.training, epochs=2, steps_per_execution=8, batch_size=1024, pos_weight=4.0,
        learning_rate=0.02,  # two short epochs on 16k rows: big steps
        calibration="isotonic"))
    run_dir = str(tmp_path_factory.mktemp("runs") / "run")
    train(config, run_dir, verbose=0)
    return run_dir


@pytest.fixture(scope="session")
def exports(small_run, small_synth, tmp_path_factory):
    """The ranking export of `small_run` and its ScaNN, brute-force and partitioned recall
    exports (k = 20 over the 5k-item catalog: every backend searches it exactly)."""
    from fm_keras.export import export_run
    from fm_keras.recall import build_index

    synth_dir, _ = small_synth
    base = str(tmp_path_factory.mktemp("saved_models"))
    ranking = export_run(small_run, "ctr", base=base, parity_rows=3000)
    items = os.path.join(synth_dir, "items.csv")
    return {
        "base": base, "ranking": ranking,
        "scann": build_index(ranking, items, "ctr_recall", base=base, k=20),
        "brute_force": build_index(ranking, items, "ctr_recall_bf", base=base, k=20,
                                   backend="brute_force"),
        "partitioned": build_index(ranking, items, "ctr_recall_ivf", base=base, k=20,
                                   backend="partitioned"),
    }


# ---------------------------------------------------------------------------------------------
# Pipelines: small synthetic spans and a pipeline YAML writer (tests/test_pipeline_*.py).

PIPELINE_ROWS = 30_000


@pytest.fixture(scope="session")
def pipeline_logs(tmp_path_factory):
    """``logs/span-1`` and ``span-2`` (good), ``span-3`` (shuffled labels), ``span-4``
    (item_id renamed), with items.csv and features.yaml; returns the logs directory."""
    from fm_keras.synth import generate_span

    logs = tmp_path_factory.mktemp("pipeline") / "logs"
    for span, kwargs in [(1, {}), (2, {}), (3, {"shuffle_labels": True}),
                         (4, {"schema_change": True})]:
        generate_span(str(logs), span, rows=PIPELINE_ROWS, seed=11, **kwargs)
    return logs


@pytest.fixture(scope="session")
def pipeline_first_run(pipeline_logs, tmp_path_factory):
    """A pipeline run on span 1 (pushes version 1); returns (yaml path, summary)."""
    from pipeline_testlib import write_pipeline_yaml

    from fm_keras.pipeline.config import load_pipeline
    from fm_keras.pipeline.runner import run_pipeline

    work = tmp_path_factory.mktemp("pipeline_run")
    path = write_pipeline_yaml(work / "pipeline.yaml", pipeline_logs, work / "root",
                               work / "saved_models")
    summary = run_pipeline(load_pipeline(path), span=1)
    return path, summary


# ---------------------------------------------------------------------------------------------
# Retrieval: a tiny implicit log with a planted structure (users pick their segment's genre).

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


@pytest.fixture(scope="session")
def implicit_data(tmp_path_factory):
    return write_implicit(str(tmp_path_factory.mktemp("implicit")))


@pytest.fixture(scope="session")
def retrieval_run(implicit_data, tmp_path_factory):
    """A finished 3-epoch retrieval run on `implicit_data`; returns (run_dir, record)."""
    from fm_keras.config import experiment_from_dict
    from fm_keras.training import train

    config = experiment_from_dict(implicit_experiment(implicit_data), base_dir=implicit_data,
                                  source="retrieval.yaml")
    run_dir = str(tmp_path_factory.mktemp("runs") / "retrieval")
    return run_dir, train(config, run_dir, verbose=0)
