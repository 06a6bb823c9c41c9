"""The SQLite metadata store: artifacts, executions, lineage, cache lookups, abandoned runs."""

import os

from fm_keras.pipeline.metadata import MetadataStore


def test_lineage_and_cache_lookup(tmp_path):
    store = MetadataStore(str(tmp_path / "m.sqlite"))
    run = store.create_context("run", "r1", {"status": "running"})
    uri = tmp_path / "examples"
    uri.mkdir()
    execution = store.start_execution("examplegen", run, "key-1", {}, {"params": {"a": 1}})
    assert store.cached("examplegen", "key-1") is None  # still RUNNING
    examples = store.put_artifact("Examples", str(uri), "fp-1", {"span": 1})
    store.finish_execution(execution, "COMPLETE", {"examples": examples}, {"seconds": 2.0})
    properties, outputs = store.cached("examplegen", "key-1")
    assert properties == {"params": {"a": 1}, "seconds": 2.0}
    assert outputs["examples"] == examples
    assert store.cached("examplegen", "key-2") is None
    assert store.cached("trainer", "key-1") is None
    trainer = store.start_execution("trainer", run, "key-3", {"examples": examples}, {})
    assert store.events(trainer, "INPUT") == {"examples": examples}
    assert store.producer(examples.id)["id"] == execution
    assert store.artifacts("Examples") == [examples]
    os.rmdir(uri)  # outputs gone: the cache entry is useless
    assert store.cached("examplegen", "key-1") is None
    store.close()


def test_abandon_running_marks_killed_runs(tmp_path):
    path = str(tmp_path / "m.sqlite")
    store = MetadataStore(path)
    run = store.create_context("run", "r1", {"status": "running"})
    store.start_execution("pusher", run, "k", {}, {})
    store.close()
    store = MetadataStore(path)  # as the next process would
    assert store.abandon_running() == 1
    assert store.context("r1")["properties"]["status"] == "abandoned"
    assert [x["state"] for x in store.executions(run)] == ["ABANDONED"]
    assert store.abandon_running() == 0
    store.close()
