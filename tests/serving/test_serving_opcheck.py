"""The op check at load: dangerous ops reachable from served signatures, not the restore graph."""

import pytest
from tensorflow.python.saved_model import loader_impl

from fm_keras._tf import tf
from fm_keras.serving import toy_models
from fm_keras.serving.errors import ServingError
from fm_keras.serving.opcheck import (check_served_ops, dangerous_kind, parse_allow_ops,
                                      signature_ops)


def _meta(path):
    return loader_impl.parse_saved_model(str(path)).meta_graphs[0]


@pytest.mark.parametrize("op, kind", [
    ("ReadFile", "file system"), ("WriteFile", "file system"), ("MatchingFiles", "file system"),
    ("TFRecordDataset", "file system"), ("WholeFileReaderV2", "file system"),
    ("InitializeTableFromTextFileV2", "file system"), ("WriteScalarSummary", "file system"),
    ("PrintV2", "print"), ("Print", "print"), ("SaveV2", "save/restore"),
    ("RestoreV2", "save/restore"), ("MergeV2Checkpoints", "save/restore"),
    ("PyFunc", "py_func"), ("EagerPyFunc", "py_func"),
    ("MatMul", None), ("StringToHashBucketFast", None), ("Scann>ScannSearchBatched", None),
    ("LookupTableImportV2", None), ("StatefulPartitionedCall", None),
])
def test_dangerous_kinds(op, kind):
    assert dangerous_kind(op) == kind


class _Nested(tf.Module):
    """A print hidden in a while-loop body inside a nested tf.function, and a py_func in a cond."""

    @tf.function
    def inner(self, x):
        def body(i):
            tf.print("step", i)
            return i + 1
        return tf.while_loop(lambda i: i < x, body, [tf.constant(0)])[0]

    @tf.function(input_signature=[tf.TensorSpec([], tf.int32)])
    def serve(self, x):
        y = tf.cond(x > 0, lambda: tf.numpy_function(lambda v: v, [x], tf.int32),
                    lambda: tf.identity(x))
        return {"y": self.inner(x) + y}

    @tf.function(input_signature=[tf.TensorSpec([], tf.int32)])
    def clean(self, x):
        return {"y": x * 2}


def test_nested_calls_while_bodies_and_cond_branches_are_walked(tmp_path):
    module = _Nested()
    tf.saved_model.save(module, str(tmp_path / "m"),
                        signatures={"serving_default": module.serve, "clean": module.clean})
    meta = _meta(tmp_path / "m")
    served = signature_ops(meta, "serving_default")
    assert {"PrintV2", "PyFunc"} <= set(served)
    assert "body" in served["PrintV2"]  # found inside the while loop's body function
    assert not {"PrintV2", "PyFunc", "SaveV2", "RestoreV2"} & set(signature_ops(meta, "clean"))
    with pytest.raises(ServingError) as info:
        check_served_ops(meta, "m")
    message = info.value.message
    assert info.value.code == "FAILED_PRECONDITION"
    assert "op PrintV2 (print) in signature 'serving_default'" in message
    assert "op PyFunc (py_func) in signature 'serving_default'" in message
    assert "'clean'" not in message and "SaveV2" not in message  # the restore graph is not served
    assert "--allow_ops=PrintV2,PyFunc" in message
    check_served_ops(meta, "m", parse_allow_ops(" PrintV2, PyFunc ,"))


def test_toy_exports_pass_and_their_restore_graph_holds_save_ops(saved_models, scann_models):
    for path in [saved_models / "ranking" / "1", saved_models / "ranking_recall" / "1",
                 scann_models / "ranking_recall" / "1"]:
        meta = _meta(path)
        check_served_ops(meta, str(path))
        every = {n.op for f in meta.graph_def.library.function for n in f.node_def}
        assert {"SaveV2", "RestoreV2"} <= every  # present, but not reachable from a signature


def test_fm_keras_exports_pass_with_the_default_allowlist(exports):
    """The real ranking, ScaNN and brute-force exports (their op sets: serving/README.md)."""
    for kind in ("ranking", "scann", "brute_force"):
        meta = _meta(exports[kind])
        check_served_ops(meta, exports[kind])
        served = set().union(*(signature_ops(meta, k) for k in meta.signature_def))
        assert not {op for op in served if dangerous_kind(op)}
    scann_ops = set(signature_ops(_meta(exports["scann"]), "serving_default"))
    assert {"Scann>ScannSearchBatched", "Scann>TensorsToScann"} <= scann_ops
