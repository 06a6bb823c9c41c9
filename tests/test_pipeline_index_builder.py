"""IndexBuilder: a checked recall version per pushed ranking version, never rebuilt."""

import os

from fm_keras.pipeline.config import load_pipeline
from fm_keras.pipeline.index_builder import build_recall
from pipeline_testlib import last_examples


def test_recall_version_is_checked_and_pushed_once(pipeline_first_run, tmp_path):
    from fm_keras.pipeline.metadata import MetadataStore

    path, summary = pipeline_first_run
    config = load_pipeline(path)
    store = MetadataStore(os.path.join(config.root, "metadata.sqlite"))
    try:
        index = next(x for x in store.executions(store.context(summary["run_id"])["id"])
                     if x["type"] == "index_builder")
        examples = store.artifacts("Examples")[-1]
    finally:
        store.close()
    assert index["properties"]["valid"] and index["properties"]["signatures"] == [
        "exclude_seen", "serving_default"]  # queried in the server before the push
    recall = os.path.join(config.pusher.base, "ctr_recall")
    assert sorted(os.listdir(recall)) == ["1"]
    stamp = os.stat(os.path.join(recall, "1", "saved_model.pb")).st_mtime_ns
    os.makedirs(os.path.join(recall, ".tmp-push-killed"))
    result = build_recall(config, os.path.join(config.pusher.base, "ctr", "1"), 1,
                          str(tmp_path), examples.uri)
    assert not result["built"] and "exists already" in result["reason"]
    assert os.stat(os.path.join(recall, "1", "saved_model.pb")).st_mtime_ns == stamp
    assert sorted(os.listdir(recall)) == ["1"]


def test_partitioned_backend_is_built_checked_and_pushed(pipeline_first_run, tmp_path):
    """index: {backend: partitioned}: the stock-op recall model passes the server check."""
    import dataclasses
    import json

    path, _ = pipeline_first_run
    config = load_pipeline(path)
    examples = last_examples(config)
    config = dataclasses.replace(
        config, index=dataclasses.replace(config.index, backend="partitioned"),
        pusher=dataclasses.replace(config.pusher, base=str(tmp_path / "pushed")))
    result = build_recall(config, os.path.join(load_pipeline(path).pusher.base, "ctr", "1"), 1,
                          str(tmp_path / "staging"), examples.uri)
    assert result["built"] and result["valid"], result
    with open(os.path.join(result["path"], "assets.extra", "fm_keras.json")) as f:
        meta = json.load(f)
    assert meta["backend"] == "partitioned" and meta["custom_ops"] == []
