"""gRPC PredictionService + ModelService over loopback with the official stubs.

Known answers: the served toy models are called in-process through their SavedModel signature
and compared with what the server returns. Every bad request must be answered with TF
Serving's status code, and the next valid request must still succeed.
"""

import grpc
import numpy as np
import pytest
from serving_testlib import RANKING_ROW, outputs, predict_request
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2,
                                     get_model_status_pb2, model_management_pb2)

from fm_keras._tf import tf


def _code(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def _assert_still_serving(predict_stub):
    response = predict_stub.Predict(predict_request(), timeout=10)
    assert response.model_spec.version.value >= 1
    assert outputs(response)["probability"].shape == (1,)


def test_predict_ranking_matches_in_process_signature(stubs, saved_models):
    predict_stub, _ = stubs
    response = predict_stub.Predict(predict_request(), timeout=10)
    expected = tf.saved_model.load(str(saved_models / "ranking" / "1")).signatures[
        "serving_default"](**{k: tf.constant(v) for k, v in RANKING_ROW.items()})
    got = outputs(response)
    assert set(got) == {"probability", "logit", "raw_probability"}
    np.testing.assert_allclose(got["logit"], expected["logit"].numpy(), rtol=1e-6)
    assert response.model_spec.name == "ranking"
    assert response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "serving_default"


def test_predict_second_signature_label_and_output_filter(stubs):
    predict_stub, _ = stubs
    request = predict_request(inputs={"user_id": ["u1", "u2", "u3"]}, signature="user_tower",
                              label="stable")
    request.output_filter.append("user_vector")
    got = outputs(predict_stub.Predict(request, timeout=10))
    assert list(got) == ["user_vector"]
    assert got["user_vector"].shape == (3, 5)
    np.testing.assert_array_equal(got["user_vector"][:, 0], 1.0)


def test_predict_recall_model_returns_top_items(stubs):
    predict_stub, _ = stubs
    response = predict_stub.Predict(
        predict_request("ranking_recall", {"user_id": ["u1", "u2"]}), timeout=10)
    got = outputs(response)
    assert got["item_ids"].shape == (2, 10) and got["scores"].shape == (2, 10)
    assert all(s[0] >= s[-1] for s in got["scores"])  # best first
    assert got["item_ids"][0][0].decode().startswith("item_")


def test_metadata_lists_signatures_with_their_inputs(stubs):
    predict_stub, _ = stubs
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "ranking"
    response = predict_stub.GetModelMetadata(request, timeout=10)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    assert {"serving_default", "user_tower", "item_tower"} <= set(signatures.signature_def)
    inputs = signatures.signature_def["serving_default"].inputs
    assert inputs["user_id"].dtype == tf.string.as_datatype_enum
    assert inputs["price"].dtype == tf.float32.as_datatype_enum
    assert response.model_spec.version.value == 1


def test_model_status(stubs):
    _, model_stub = stubs
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "ranking_recall"
    (status,) = model_stub.GetModelStatus(request, timeout=10).model_version_status
    assert status.version == 1
    assert status.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert status.status.error_code == 0
    request.model_spec.name = "nope"
    assert _code(lambda: model_stub.GetModelStatus(request, timeout=10))[0] == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("make_request, code, words", [
    (lambda: predict_request(inputs={**RANKING_ROW, "price": ["cheap"]}),
     grpc.StatusCode.INVALID_ARGUMENT, ["price", "float", "string"]),
    (lambda: predict_request(inputs={"user_id": ["u1"], "item_id": ["i"]}),
     grpc.StatusCode.INVALID_ARGUMENT, ["Missing but required: {price}"]),
    (lambda: predict_request(inputs={**RANKING_ROW, "colour": ["red"]}),
     grpc.StatusCode.INVALID_ARGUMENT, ["Sent extra: {colour}"]),
    (lambda: predict_request(inputs={**RANKING_ROW, "price": [[1.0]]}),
     grpc.StatusCode.INVALID_ARGUMENT, ["price", "shape"]),
    (lambda: predict_request(inputs={**RANKING_ROW, "price": [1.0, 2.0]}),
     grpc.StatusCode.INVALID_ARGUMENT, ["batch size"]),
    (lambda: predict_request("unknown_model"),
     grpc.StatusCode.NOT_FOUND, ["Servable not found for request: Latest(unknown_model)"]),
    (lambda: predict_request(version=7),
     grpc.StatusCode.NOT_FOUND, ["Servable not found for request: Specific(ranking, 7)"]),
    (lambda: predict_request(label="canary"),
     grpc.StatusCode.INVALID_ARGUMENT, ["Unrecognized servable version label: canary"]),
    (lambda: predict_request(signature="nope"),
     grpc.StatusCode.FAILED_PRECONDITION, ['Serving signature key "nope" not found.']),
])
def test_bad_predict_answers_like_tf_serving_and_server_stays_up(stubs, make_request, code, words):
    predict_stub, _ = stubs
    got_code, details = _code(lambda: predict_stub.Predict(make_request(), timeout=10))
    assert got_code == code, details
    for word in words:
        assert word in details
    _assert_still_serving(predict_stub)


def test_bad_output_filter_and_metadata_field(stubs):
    predict_stub, _ = stubs
    request = predict_request()
    request.output_filter.append("nope")
    code, details = _code(lambda: predict_stub.Predict(request, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "nope" in details
    metadata = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["weights"])
    metadata.model_spec.name = "ranking"
    assert _code(lambda: predict_stub.GetModelMetadata(metadata, timeout=10))[0] == \
        grpc.StatusCode.INVALID_ARGUMENT
    _assert_still_serving(predict_stub)


@pytest.fixture(scope="module")
def batching_stub(saved_models, tmp_path_factory):
    """A server that batches, holding a lone request up to 300 ms for company."""
    from serving_testlib import start_server
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    params = tmp_path_factory.mktemp("batching") / "batching_parameters.txt"
    params.write_text("max_batch_size { value: 64 }\nbatch_timeout_micros { value: 300000 }\n"
                      "max_enqueued_batches { value: 4 }\nnum_batch_threads { value: 1 }\n")
    server = start_server(model_name="ranking", model_base_path=str(saved_models / "ranking"),
                          enable_batching=True, batching_parameters_file=str(params))
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    yield prediction_service_pb2_grpc.PredictionServiceStub(channel)
    channel.close()
    server.stop()


def test_batched_concurrent_predicts_get_their_own_answers(batching_stub, stubs):
    from concurrent.futures import ThreadPoolExecutor

    predict_stub, _ = stubs
    requests = [predict_request(inputs={**RANKING_ROW, "user_id": [f"user{i}"]}) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        batched = list(pool.map(lambda r: batching_stub.Predict(r, timeout=10), requests))
    for request, response in zip(requests, batched):
        alone = predict_stub.Predict(request, timeout=10)
        np.testing.assert_allclose(outputs(response)["logit"], outputs(alone)["logit"], rtol=1e-6)


def test_batched_predict_without_a_deadline(batching_stub):
    # regression: a call with no deadline has an "infinite" time_remaining, which made the
    # batch queue's wait raise OverflowError (INTERNAL) for every request
    response = batching_stub.Predict(predict_request())
    assert outputs(response)["probability"].shape == (1,)


def test_expired_deadline(batching_stub):
    # the request waits in the batch queue past its 50 ms deadline
    code, _ = _code(lambda: batching_stub.Predict(predict_request(), timeout=0.05))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    _assert_still_serving(batching_stub)


def test_classify_on_a_predict_signature_is_a_clear_error(stubs):
    predict_stub, _ = stubs
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "ranking"
    request.input.example_list.examples.add()
    code, details = _code(lambda: predict_stub.Classify(request, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "Expected classification signature method_name to be tensorflow/serving/classify" in details
    _assert_still_serving(predict_stub)


def test_oversize_message_is_resource_exhausted(saved_models):
    from serving_testlib import start_server

    server = start_server(model_name="ranking", model_base_path=str(saved_models / "ranking"),
                          grpc_channel_arguments="grpc.max_receive_message_length=4096")
    try:
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            big = {"user_id": ["u" * 100] * 100, "item_id": ["i"] * 100, "price": [1.0] * 100}
            code, _ = _code(lambda: stub.Predict(predict_request(inputs=big), timeout=10))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            _assert_still_serving(stub)
    finally:
        server.stop()


def test_reload_config_adds_label_and_removes_model(stubs, saved_models):
    from serving_testlib import models_config

    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    predict_stub, model_stub = stubs
    reload = model_management_pb2.ReloadConfigRequest()
    text_format.Parse(models_config(saved_models, {"canary": 1}, models=("ranking",)), reload.config)
    model_stub.HandleReloadConfigRequest(reload, timeout=60)
    assert outputs(predict_stub.Predict(predict_request(label="canary"), timeout=10))
    code, _ = _code(lambda: predict_stub.Predict(
        predict_request("ranking_recall", {"user_id": ["u1"]}), timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND

    # a label on a version that is not loaded is refused, as by TF Serving
    bad = model_management_pb2.ReloadConfigRequest()
    text_format.Parse(models_config(saved_models, {"canary": 9}, models=("ranking",)), bad.config)
    code, details = _code(lambda: model_stub.HandleReloadConfigRequest(bad, timeout=60))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "version 9" in details

    # an empty config is no action and OK, as in TF Serving's ServerCore::ReloadConfig (was
    # INVALID_ARGUMENT naming a custom_model_config the request did not have)
    model_stub.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(), timeout=60)
    assert outputs(predict_stub.Predict(predict_request(label="canary"), timeout=10))

    # restore both models for the tests that follow
    back = model_management_pb2.ReloadConfigRequest()
    back.config.CopyFrom(text_format.Parse(models_config(saved_models, {"stable": 1}),
                                           model_server_config_pb2.ModelServerConfig()))
    model_stub.HandleReloadConfigRequest(back, timeout=60)
    assert outputs(predict_stub.Predict(
        predict_request("ranking_recall", {"user_id": ["u1"]}), timeout=10))["scores"].shape == (1, 10)


def test_a_request_without_model_spec_is_invalid_argument(stubs):
    """TF Serving answers "Missing ModelSpec"; this said NOT_FOUND for a model named ""."""
    from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2,
                                         get_model_status_pb2, predict_pb2)

    predict_stub, model_stub = stubs
    calls = [
        lambda: predict_stub.Predict(predict_pb2.PredictRequest(), timeout=10),
        lambda: predict_stub.GetModelMetadata(get_model_metadata_pb2.GetModelMetadataRequest(
            metadata_field=["signature_def"]), timeout=10),
        lambda: predict_stub.Classify(classification_pb2.ClassificationRequest(), timeout=10),
        lambda: model_stub.GetModelStatus(get_model_status_pb2.GetModelStatusRequest(),
                                          timeout=10),
    ]
    for call in calls:
        assert _code(call) == (grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
