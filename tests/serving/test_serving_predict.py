"""Signature loading, the fast call path and TensorProto conversion against TF's own."""

import numpy as np
import pytest
from tensorflow.python.saved_model import loader_impl

from fm_keras._tf import tf
from fm_keras.serving.errors import ServingError
from fm_keras.serving.predict import (array_from_proto, arrays_from_request, check_output_filter,
                                      find_signature, load_signatures, proto_from_array,
                                      run_signature)


@pytest.fixture(scope="module")
def signatures(saved_models):
    path = str(saved_models / "ranking" / "1")
    meta = loader_impl.parse_saved_model(path).meta_graphs[0]
    return load_signatures(tf.saved_model.load(path), meta.signature_def)


def test_signatures_declare_inputs_and_outputs(signatures):
    assert set(signatures) == {"serving_default", "user_tower", "item_tower"}
    sig = signatures["serving_default"]
    assert sig.inputs["price"] == (np.float32, (None,))
    assert sig.inputs["user_id"] == (object, (None,))
    assert sig.outputs == ["logit", "probability", "raw_probability"]
    assert sig.batchable


@pytest.mark.parametrize("name", ["serving_default", "user_tower", "item_tower"])
def test_fast_call_equals_the_public_signature_call(signatures, name):
    sig = signatures[name]
    assert sig.fast_call is not None
    rng = np.random.default_rng(0)
    arrays = {a: (np.array([f"v{i}".encode() for i in rng.integers(0, 99, 7)], dtype=object)
                  if dtype == object else rng.normal(size=7).astype(np.float32))
              for a, (dtype, _) in sig.inputs.items()}
    fast = run_signature(sig, arrays)
    public = {k: v.numpy() for k, v in sig.function(**arrays).items()}
    assert fast.keys() == public.keys()
    for key in fast:
        np.testing.assert_array_equal(fast[key], public[key])


@pytest.mark.parametrize("value", [
    np.array([1.5, -2.0], np.float32), np.array([[1, 2], [3, 4]], np.int64),
    np.array([b"a", b"\xff\x00"], dtype=object), np.zeros((0,), np.float32)])
def test_tensor_proto_conversion_matches_tf(value):
    ours = tf.make_tensor_proto(value)  # proto -> array
    np.testing.assert_array_equal(array_from_proto(ours, value.dtype.type if value.dtype != object
                                                   else object), value)
    proto = type(ours)()
    proto_from_array(value, proto)  # array -> proto, read back by TF itself
    np.testing.assert_array_equal(tf.make_ndarray(proto), value)
    float_val = tf.make_tensor_proto([0.5, 1.5], dtype=tf.float32)
    float_val.ClearField("tensor_content")
    float_val.float_val.extend([0.5, 1.5])
    np.testing.assert_array_equal(array_from_proto(float_val, np.float32), [0.5, 1.5])


def test_validation_messages(signatures):
    sig = signatures["serving_default"]
    with pytest.raises(ServingError, match="Missing but required: {price}") as info:
        arrays_from_request(sig, {"user_id": tf.make_tensor_proto(["u"]),
                                  "item_id": tf.make_tensor_proto(["i"])})
    assert info.value.code == "INVALID_ARGUMENT"
    with pytest.raises(ServingError, match=r"Expects arg\[0\] \(item_id\) to be string but float"):
        arrays_from_request(sig, {"user_id": tf.make_tensor_proto(["u"]),
                                  "item_id": tf.make_tensor_proto([1.0]),
                                  "price": tf.make_tensor_proto([1.0])})
    with pytest.raises(ServingError, match="not found") as info:
        find_signature(signatures, "nope")
    assert info.value.code == "FAILED_PRECONDITION"
    with pytest.raises(ServingError, match="output tensor alias not found"):
        check_output_filter(sig, ["nope"])
