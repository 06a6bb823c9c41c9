"""Test setup: Keras 2 for TFRS must be selected before TensorFlow is imported."""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests draw the same examples on every run of the suite, so CI never fails on a case
# no earlier run saw; HYPOTHESIS_PROFILE=explore draws fresh ones (run it when a reader changes).
settings.register_profile("suite", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))


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


@pytest.fixture(scope="session")
def regression_export(small_synth, tmp_path_factory):
    """(run directory, ranking export) of a 1-epoch `task: regression` run on the small set."""
    import dataclasses

    from fm_keras.config import load_experiment
    from fm_keras.export import export_run
    from fm_keras.training import train

    config = load_experiment(os.path.join(small_synth[0], "experiment.yaml"))
    config = dataclasses.replace(
        config, model=dataclasses.replace(config.model, task="regression"),
        training=dataclasses.replace(config.training, epochs=1, batch_size=1024))
    base = tmp_path_factory.mktemp("regression")
    run_dir = str(base / "run")
    train(config, run_dir, verbose=0)
    return run_dir, export_run(run_dir, "rating", base=str(base / "models"), parity_rows=2000)


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
    """`first_pipeline_run`, shared by the tests that only read it or run span 1 again (a
    module that runs later spans makes its own: the order of modules is not fixed)."""
    from pipeline_testlib import first_pipeline_run

    return first_pipeline_run(pipeline_logs, tmp_path_factory.mktemp("pipeline_run"))


# ---------------------------------------------------------------------------------------------
# Retrieval: a tiny implicit log with a planted structure (tests/retrieval_testlib.py).

@pytest.fixture(scope="session")
def implicit_data(tmp_path_factory):
    from retrieval_testlib import write_implicit

    return write_implicit(str(tmp_path_factory.mktemp("implicit")))


@pytest.fixture(scope="session")
def retrieval_run(implicit_data, tmp_path_factory):
    """A finished 3-epoch retrieval run on `implicit_data`; returns (run_dir, record)."""
    from retrieval_testlib import implicit_experiment

    from fm_keras.config import experiment_from_dict
    from fm_keras.training import train

    config = experiment_from_dict(implicit_experiment(implicit_data), base_dir=implicit_data,
                                  source="retrieval.yaml")
    run_dir = str(tmp_path_factory.mktemp("runs") / "retrieval")
    return run_dir, train(config, run_dir, verbose=0)
