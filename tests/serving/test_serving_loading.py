"""Loading SavedModels: the ScaNN recall export next to the ranking model, custom ops, errors."""

import sys

import grpc
import numpy as np
import pytest
from serving_testlib import models_config, outputs, predict_request, start_server
from tensorflow.python.saved_model import loader_impl
from tensorflow_serving.apis import prediction_service_pb2_grpc

from fm_keras.serving import loading
from fm_keras.serving.errors import ServingError


def test_scann_export_lists_its_custom_ops(scann_models):
    meta = loader_impl.parse_saved_model(str(scann_models / "ranking_recall" / "1")).meta_graphs[0]
    assert {"Scann>TensorsToScann", "Scann>ScannSearchBatched"} <= loading.custom_ops(meta)
    stock = loader_impl.parse_saved_model(str(scann_models / "ranking" / "1")).meta_graphs[0]
    assert loading.custom_ops(stock) == set()


def test_ranking_and_scann_recall_side_by_side_from_one_models_config(scann_models, tmp_path):
    config = tmp_path / "models.config"
    config.write_text(models_config(scann_models))
    server = start_server(model_config_file=str(config))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            recall = outputs(stub.Predict(predict_request("ranking_recall", {"user_id": ["u1", "u2"]}),
                                          timeout=10))
            assert recall["item_ids"].shape == (2, 10)
            assert np.all(np.diff(recall["scores"], axis=1) <= 1e-6)  # best first
            ranking = outputs(stub.Predict(predict_request(), timeout=10))
            assert ranking["probability"].shape == (1,)
    finally:
        server.stop()


def test_missing_scann_says_which_server_is_needed(monkeypatch):
    monkeypatch.setitem(sys.modules, "scann", None)  # makes `import scann` raise ImportError
    with pytest.raises(ServingError, match="ScaNN-enabled server") as info:
        loading._import_scann()
    assert info.value.code == "FAILED_PRECONDITION"


def test_missing_and_corrupt_saved_models(tmp_path):
    with pytest.raises(ServingError) as info:
        loading.load_saved_model(str(tmp_path))
    assert info.value.code == "NOT_FOUND" and str(tmp_path) in info.value.message
    (tmp_path / "saved_model.pb").write_bytes(b"garbage")
    with pytest.raises(ServingError) as info:
        loading.load_saved_model(str(tmp_path))
    assert info.value.code == "DATA_LOSS"


def _table_model(path):
    from fm_keras._tf import tf

    class Lookup(tf.Module):
        def __init__(self):
            super().__init__()
            self.table = tf.lookup.StaticHashTable(
                tf.lookup.KeyValueTensorInitializer(["a", "b"], [1, 2], tf.string, tf.int64), -1)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def serve(self, key):
            return {"id": self.table.lookup(key)}

    module = Lookup()
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})


def test_a_freed_models_lookup_tables_are_destroyed_and_its_copy_keeps_serving(tmp_path):
    """TensorFlow never destroys a restored resource: each reload of a model with vocabulary
    tables left them in the process (issue 14, item 5: RSS +3 MB per reload cycle)."""
    import gc

    from tensorflow.python.trackable.resource import RestoredResource

    from fm_keras._tf import tf

    path = str(tmp_path / "lookup")
    _table_model(path)
    loaded, _ = loading.load_saved_model(path)
    copy, _ = loading.load_saved_model(path)  # another version of the same export
    handle = next(obj.resource_handle for obj in tf.train.TrackableView(loaded).descendants()
                  if isinstance(obj, RestoredResource))
    assert int(tf.raw_ops.LookupTableSizeV2(table_handle=handle)) == 2
    del loaded
    gc.collect()
    assert int(tf.raw_ops.LookupTableSizeV2(table_handle=handle)) == 2  # queued, not yet
    loading.release_memory()  # what an unload runs
    with pytest.raises(tf.errors.NotFoundError):
        tf.raw_ops.LookupTableSizeV2(table_handle=handle)
    result = copy.signatures["serving_default"](key=tf.constant(["b", "z"]))
    assert result["id"].numpy().tolist() == [2, -1]


def test_a_model_collected_while_a_graph_is_traced_runs_no_op_there(tmp_path):
    """A collection can free a model inside any TensorFlow call: in `fm-keras export` after a
    parity load, one came while `tf.saved_model.save` traced a signature with the graph's
    lock held, and the finalizer's destroy op deadlocked the process. Now the finalizer only
    queues; the next load (or unload) destroys."""
    import gc

    from tensorflow.python.trackable.resource import RestoredResource

    from fm_keras._tf import tf

    path = str(tmp_path / "lookup")
    _table_model(path)
    loaded, _ = loading.load_saved_model(path)
    handle = next(obj.resource_handle for obj in tf.train.TrackableView(loaded).descendants()
                  if isinstance(obj, RestoredResource))
    del loaded

    @tf.function
    def traced(x):
        gc.collect()  # the model is freed here, while this graph is being built
        return x + 1

    graph = traced.get_concrete_function(tf.TensorSpec([], tf.int32)).graph
    assert not [op.type for op in graph.get_operations() if "Destroy" in op.type]
    assert int(tf.raw_ops.LookupTableSizeV2(table_handle=handle)) == 2
    loading.load_saved_model(path)  # the next load destroys the freed model's table
    with pytest.raises(tf.errors.NotFoundError):
        tf.raw_ops.LookupTableSizeV2(table_handle=handle)
