"""Classify / Regress / MultiInference input handling and their errors on predict signatures."""

import numpy as np
import pytest
from tensorflow_serving.apis import inference_pb2, input_pb2

from fm_keras._tf import tf
from fm_keras.serving import inference
from fm_keras.serving.errors import ServingError


def _example(**features):
    example = tf.train.Example()
    for name, value in features.items():
        example.features.feature[name].bytes_list.value.append(value.encode())
    return example


def test_examples_with_context_are_merged():
    request_input = input_pb2.Input()
    lists = request_input.example_list_with_context
    lists.context.CopyFrom(_example(user_id="u1"))
    lists.examples.append(_example(item_id="i1"))
    lists.examples.append(_example(item_id="i2"))
    serialized = inference.serialized_examples(request_input)
    parsed = [tf.train.Example.FromString(s) for s in serialized]
    assert [p.features.feature["item_id"].bytes_list.value[0] for p in parsed] == [b"i1", b"i2"]
    assert all(p.features.feature["user_id"].bytes_list.value[0] == b"u1" for p in parsed)
    with pytest.raises(ServingError, match="Input is empty"):
        inference.serialized_examples(input_pb2.Input())


class _Servable:
    name, version = "ranking", 1

    def signature(self, name):
        from fm_keras.serving.predict import Signature

        return Signature(name or "serving_default", None, {"inputs": (object, (None,))}, {},
                         ["scores"])


class _Manager:
    def lookup(self, *args):
        return _Servable()


def test_tasks_on_a_predict_signature_answer_invalid_argument():
    request_input = input_pb2.Input()
    request_input.example_list.examples.append(_example(user_id="u1"))
    with pytest.raises(ServingError, match="Expected regression signature method_name") as info:
        inference.regress(_Servable(), "", request_input, None)
    assert info.value.code == "INVALID_ARGUMENT"
    request = inference_pb2.MultiInferenceRequest(input=request_input)
    for signature in ("a", "a"):
        task = request.tasks.add(method_name=inference.CLASSIFY_METHOD)
        task.model_spec.name, task.model_spec.signature_name = "ranking", signature
    with pytest.raises(ServingError, match="Duplicate evaluation of signature"):
        inference.multi_inference(_Manager(), request, inference_pb2.MultiInferenceResponse())
    assert np.array_equal(inference.serialized_examples(request_input),
                          [request_input.example_list.examples[0].SerializeToString()])
