"""IndexBuilder: the recall model is built and checked from the candidate before any push."""

import os

from fm_keras.pipeline.config import load_pipeline
from fm_keras.pipeline.index_builder import build_recall
from pipeline_testlib import last_examples, write_pipeline_yaml


def test_recall_model_is_checked_then_pushed_beside_its_ranking_version(pipeline_first_run):
    from fm_keras import fsutil
    from fm_keras.pipeline.metadata import MetadataStore

    path, summary = pipeline_first_run
    config = load_pipeline(path)
    store = MetadataStore(os.path.join(config.root, "metadata.sqlite"))
    try:
        steps = store.executions(store.context(summary["run_id"])["id"])
    finally:
        store.close()
    assert [x["type"] for x in steps][-2:] == ["index_builder", "pusher"]
    index = steps[-2]
    # every signature queried in the server before the push
    assert index["properties"]["valid"] and index["properties"]["signatures"] == [
        "exclude_seen", "exclude_seen_keys", "serving_default"]
    assert sorted(os.listdir(os.path.join(config.pusher.base, "ctr_recall"))) == ["1"]
    meta = fsutil.read_json(os.path.join(config.pusher.base, "ctr_recall", "1", "assets.extra",
                                         "fm_keras.json"))
    assert (meta["name"], meta["version"], meta["ranking_version"]) == ("ctr_recall", 1, 1)
    assert meta["ranking_model"] == os.path.abspath(os.path.join(config.pusher.base, "ctr", "1"))


def test_recall_model_that_fails_its_check_pushes_nothing(pipeline_first_run, pipeline_logs,
                                                          tmp_path, monkeypatch):
    """Regression: the ranking version was pushed before the recall model was built, so a
    recall failure left serving with ctr vN beside ctr_recall vN-1. Now nothing is pushed."""
    from fm_keras.pipeline import infra_validator
    from fm_keras.pipeline.runner import run_pipeline

    first = load_pipeline(pipeline_first_run[0])
    base = tmp_path / "saved_models"
    index = {"k": 20, "backend": "scann", "num_leaves": 20, "leaves_to_search": 5,
             "reorder": 150}  # not the first run's: the index is built again, not cached
    path = write_pipeline_yaml(tmp_path / "pipeline.yaml", pipeline_logs, first.root, base,
                               index=index)
    monkeypatch.setattr(infra_validator, "infra_validate",
                        lambda *a, **k: {"valid": False, "error": "the model did not load"})
    summary = run_pipeline(load_pipeline(path), span=1)
    assert summary["status"] == "recall_invalid" and summary["pushed_version"] is None
    assert [s["step"] for s in summary["steps"]][-1] == "index_builder"
    assert not os.path.exists(base / "ctr") and not os.path.exists(base / "ctr_recall")
    assert not os.path.exists(base / "models.config")


def test_partitioned_backend_is_built_and_checked(pipeline_first_run, tmp_path):
    """index: {backend: partitioned}: the stock-op recall model passes the server check."""
    import dataclasses
    import json

    path, _ = pipeline_first_run
    config = load_pipeline(path)
    examples = last_examples(config)
    config = dataclasses.replace(
        config, index=dataclasses.replace(config.index, backend="partitioned"))
    result = build_recall(config, os.path.join(config.pusher.base, "ctr", "1"),
                          str(tmp_path / "staging"), examples.uri)
    assert result["built"] and result["valid"], result
    assert result["path"] == str(tmp_path / "staging" / "ctr_recall" / "1")
    with open(os.path.join(result["path"], "assets.extra", "fm_keras.json")) as f:
        meta = json.load(f)
    assert meta["backend"] == "partitioned" and meta["custom_ops"] == []
