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
    """A finished 2-epoch run on the small synthetic set."""
    import dataclasses

    from fm_keras.config import load_experiment
    from fm_keras.training import train

    synth_dir, _ = small_synth
    config = load_experiment(os.path.join(synth_dir, "experiment.yaml"))
    config = dataclasses.replace(config, training=dataclasses.replace(
        config.training, epochs=2, steps_per_execution=8))
    run_dir = str(tmp_path_factory.mktemp("runs") / "run")
    train(config, run_dir, verbose=0)
    return run_dir


@pytest.fixture(scope="session")
def exports(small_run, small_synth, tmp_path_factory):
    """The ranking export of `small_run` and its ScaNN and brute-force recall exports."""
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
    }
