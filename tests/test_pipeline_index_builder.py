"""IndexBuilder: a recall version per pushed ranking version, never rebuilt."""

import os

from fm_keras.pipeline.config import load_pipeline
from fm_keras.pipeline.index_builder import build_recall


def test_existing_recall_version_is_left_alone(pipeline_first_run):
    path, summary = pipeline_first_run
    config = load_pipeline(path)
    recall = os.path.join(config.pusher.base, "ctr_recall")
    assert "1" in os.listdir(recall)
    stamp = os.stat(os.path.join(recall, "1", "saved_model.pb")).st_mtime_ns
    os.makedirs(os.path.join(recall, ".tmp-1-killed"))
    result = build_recall(config, os.path.join(config.pusher.base, "ctr", "1"), 1)
    assert not result["built"] and "exists already" in result["reason"]
    assert os.stat(os.path.join(recall, "1", "saved_model.pb")).st_mtime_ns == stamp
    assert not [d for d in os.listdir(recall) if d.startswith(".tmp-")]
