"""The REST API over loopback with plain HTTP: formats, status, metadata, errors, metrics."""

import base64
import http.client
import json
import re

import numpy as np
import pytest

ROW = {"user_id": "u1", "item_id": "item_1", "price": 1.0}


def _request(server, method, path, body=None, raw=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=30)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        text = response.read().decode()
        return response.status, text
    finally:
        conn.close()


def post(server, path, body=None, raw=None):
    status, text = _request(server, "POST", path, body, raw)
    return status, json.loads(text)


def get(server, path):
    status, text = _request(server, "GET", path)
    return status, text


def _valid_predict_works(server):
    status, body = post(server, "/v1/models/ranking:predict", {"instances": [ROW]})
    assert status == 200 and 0 < body["predictions"][0]["probability"] < 1


def test_row_and_columnar_formats_agree(server):
    status, rows = post(server, "/v1/models/ranking:predict", {"instances": [ROW, ROW]})
    assert status == 200
    assert set(rows["predictions"][0]) == {"probability", "logit", "raw_probability"}
    status, cols = post(server, "/v1/models/ranking/versions/1:predict",
                        {"inputs": {k: [v, v] for k, v in ROW.items()}})
    assert status == 200
    np.testing.assert_allclose(cols["outputs"]["logit"], [r["logit"] for r in rows["predictions"]])


def test_single_input_signature_label_and_b64(server):
    status, body = post(server, "/v1/models/ranking/labels/stable:predict",
                        {"signature_name": "user_tower",
                         "instances": ["u1", {"b64": base64.b64encode(b"u1").decode()}]})
    assert status == 200
    first, second = body["predictions"]
    assert first == second and len(first["user_vector"]) == 5


def test_recall_model_strings_out(server):
    status, body = post(server, "/v1/models/ranking_recall:predict", {"inputs": {"user_id": ["u1"]}})
    assert status == 200
    assert body["outputs"]["item_ids"][0][0].startswith("item_")
    assert len(body["outputs"]["scores"][0]) == 10


def test_status_and_metadata(server):
    status, text = get(server, "/v1/models/ranking")
    assert status == 200
    assert json.loads(text) == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    status, text = get(server, "/v1/models/ranking/versions/1/metadata")
    body = json.loads(text)
    assert status == 200 and body["model_spec"]["name"] == "ranking"
    sigs = body["metadata"]["signature_def"]["signature_def"]
    assert sigs["serving_default"]["inputs"]["price"]["dtype"] == "DT_FLOAT"
    status, text = get(server, "/v1/models/nope")
    assert status == 404 and "nope" in json.loads(text)["error"]


@pytest.mark.parametrize("path, body, raw, http_status, words", [
    ("/v1/models/ranking:predict", None, b"{not json", 400, ["JSON Parse error"]),
    ("/v1/models/ranking:predict", None, b"[" * 100_000 + b"]" * 100_000, 400, ["too deep"]),
    ("/v1/models/ranking:predict", {"instances": [{**ROW, "price": "x"}]}, None, 400, ["price"]),
    ("/v1/models/ranking:predict", {"instances": [{**ROW, "price": 1e39}]}, None, 400,
     ["input price: value 1e+39 is out of float32 range"]),
    ("/v1/models/ranking:predict", {"instances": [{"user_id": "u"}]}, None, 400, ["Missing but required"]),
    ("/v1/models/ranking:predict", {"instances": [{**ROW, "extra": 1}]}, None, 400, ["Sent extra: {extra}"]),
    ("/v1/models/ranking:predict", {"instances": [ROW], "inputs": {}}, None, 400, ["only one of"]),
    ("/v1/models/ranking:predict", {"signature_name": "nope", "instances": [ROW]}, None, 400,
     ['Serving signature key "nope" not found']),
    ("/v1/models/unknown:predict", {"instances": [ROW]}, None, 404, ["Servable not found"]),
    ("/v1/models/ranking/versions/9:predict", {"instances": [ROW]}, None, 404, ["Specific(ranking, 9)"]),
    ("/v1/models/ranking/labels/canary:predict", {"instances": [ROW]}, None, 400,
     ["Unrecognized servable version label: canary"]),
    ("/v1/models/ranking:explode", {"instances": [ROW]}, None, 400, ["Malformed request"]),
    ("/v1/models/ranking:classify", {"examples": [ROW]}, None, 400,
     ["Expected classification signature method_name to be tensorflow/serving/classify"]),
    ("/v1/models/ranking:regress", {"instances": [ROW]}, None, 400, ["'examples'"]),
    # A user's trial: these were answered 200 (5 read as the signature "5", null as the default
    # one, true as 1.0, 1e400 as inf) or with a message about something else.
    ("/v1/models/ranking:predict", {"signature_name": 5, "instances": [ROW]}, None, 400,
     ["'signature_name' key must be a string value"]),
    ("/v1/models/ranking:predict", {"signature_name": None, "instances": [ROW]}, None, 400,
     ["'signature_name' key must be a string value"]),
    ("/v1/models/ranking:regress", {"signature_name": 5, "examples": [ROW]}, None, 400,
     ["'signature_name' key must be a string value"]),
    ("/v1/models/ranking:predict", None,
     b'{"instances": [{"user_id": "u1", "item_id": "i", "price": 1e400}]}', 400,
     ["JSON Parse error: Number too big to be stored in double: 1e400"]),
    ("/v1/models/ranking:predict", {"instances": [{**ROW, "price": True}]}, None, 400,
     ["is not of expected type: float32 (input price)"]),
    ("/v1/models/ranking:predict", {"inputs": {"user_id": ["u1", "u2"], "item_id": ["a", "b"],
                                               "price": [1.0, False]}}, None, 400,
     ["is not of expected type: float32 (input price)"]),
    ("/v1/models/ranking:predict", {"instances": ["u1"]}, None, 400,
     ["instances is a plain list, but expecting list of objects"]),
    ("/v1/models/ranking:predict", {"instances": [ROW, "u1"]}, None, 400,
     ["Expecting object but got list at item 1 of input list"]),
    ("/v1/models/ranking:predict", {"inputs": ["u1"]}, None, 400,
     ["inputs is a plain value/list, but expecting an object"]),
])
def test_bad_requests_get_tf_serving_errors_and_server_stays_up(server, path, body, raw,
                                                                http_status, words):
    status, reply = post(server, path, body, raw)
    assert status == http_status, reply
    assert set(reply) == {"error"}
    for word in words:
        assert word in reply["error"]
    _valid_predict_works(server)


def test_prometheus_metrics_count_requests(server):
    _valid_predict_works(server)
    status, text = get(server, "/monitoring/prometheus/metrics")
    assert status == 200
    assert ':tensorflow:serving:request_count{model_name="ranking",status="OK"}' in text
    assert ":tensorflow:serving:request_latency_bucket" in text


def test_metrics_use_tf_servings_api_labels_and_time_only_successes(server, stubs):
    """Dashboards written for TF Serving select API="Predict" (gRPC) and API="predict"
    (REST); this server labelled them "predict" and "rest", counted metadata and status
    calls as requests, and put failed requests into request_latency."""
    from serving_testlib import predict_request
    from tensorflow_serving.apis import get_model_metadata_pb2

    def latency_count(api, entrypoint, model):
        _, text = get(server, "/monitoring/prometheus/metrics")
        prefix = (f':tensorflow:serving:request_latency_count{{API="{api}",'
                  f'entrypoint="{entrypoint}",model_name="{model}"}} ')
        return sum(int(line[len(prefix):]) for line in text.splitlines()
                   if line.startswith(prefix))

    predict_stub, _ = stubs
    before = {(api, entry): latency_count(api, entry, "ranking")
              for api, entry in (("Predict", "GRPC"), ("predict", "REST"))}
    predict_stub.Predict(predict_request(), timeout=10)
    metadata = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    metadata.model_spec.name = "ranking"
    predict_stub.GetModelMetadata(metadata, timeout=10)
    _valid_predict_works(server)
    post(server, "/v1/models/ranking:predict", {"instances": [{"user_id": "u"}]})  # a 400
    assert latency_count("Predict", "GRPC", "ranking") == before["Predict", "GRPC"] + 1
    assert latency_count("predict", "REST", "ranking") == before["predict", "REST"] + 1
    _, text = get(server, "/monitoring/prometheus/metrics")
    assert 'API="predict",entrypoint="GRPC"' not in text and 'API="rest"' not in text
    assert 'API="metadata"' not in text


def test_rest_metadata_and_status_are_not_counted_as_requests(server):
    """As over gRPC: a REST GET of a model's metadata or status is no request of the metrics
    (it was counted, and timed under API="")."""
    def request_count():
        _, text = get(server, "/monitoring/prometheus/metrics")
        prefix = ':tensorflow:serving:request_count{model_name="ranking",status="OK"} '
        return sum(int(line[len(prefix):]) for line in text.splitlines()
                   if line.startswith(prefix))

    _valid_predict_works(server)
    before = request_count()
    assert get(server, "/v1/models/ranking/metadata")[0] == 200
    assert get(server, "/v1/models/ranking")[0] == 200
    assert request_count() == before
    _, text = get(server, "/monitoring/prometheus/metrics")
    assert 'API=""' not in text


def test_examples_json_becomes_tf_examples():
    from fm_keras.serving.rest import examples_from_json

    request_input = examples_from_json({
        "context": {"user_id": "u1", "age": 31},
        "examples": [{"item_id": "i1", "price": 2.5, "tags": ["a", "b"]},
                     {"item_id": {"b64": base64.b64encode(b"\x00i2").decode()}, "price": [1, 2.5]}]})
    lists = request_input.example_list_with_context
    assert lists.context.features.feature["user_id"].bytes_list.value == [b"u1"]
    assert lists.context.features.feature["age"].int64_list.value == [31]
    first, second = lists.examples
    assert first.features.feature["price"].float_list.value == [2.5]
    assert first.features.feature["tags"].bytes_list.value == [b"a", b"b"]
    assert second.features.feature["item_id"].bytes_list.value == [b"\x00i2"]
    assert list(second.features.feature["price"].float_list.value) == [1.0, 2.5]
    assert examples_from_json({"examples": [{"a": 1}]}).WhichOneof("kind") == "example_list"


@pytest.mark.parametrize("request_body, words", [
    ([1, 2], "'examples'"), ({"examples": [[1]]}, "examples[0] must be a JSON object"),
    ({"examples": [{"a": True}]}, "booleans"), ({"examples": [{"a": {"x": 1}}]}, "examples[0].a"),
])
def test_bad_examples_json_names_the_problem(request_body, words):
    from fm_keras.serving.errors import ServingError
    from fm_keras.serving.rest import examples_from_json

    with pytest.raises(ServingError, match=re.escape(words)) as info:
        examples_from_json(request_body)
    assert info.value.code == "INVALID_ARGUMENT"


class _ExampleServable:
    """A servable with TF Serving's classify and regress signatures (one string input)."""
    name, version = "m", 1

    def signature(self, name):
        from fm_keras._tf import tf
        from fm_keras.serving import inference
        from fm_keras.serving.predict import Signature

        def classify(inputs):
            n = len(inputs)
            return {"classes": tf.constant([[b"no", b"yes"]] * n),
                    "scores": tf.constant([[0.25, 0.75]] * n)}

        def regress(inputs):
            return {"outputs": tf.constant([[float(len(e))] for e in np.asarray(inputs)])}

        method, function = ((inference.CLASSIFY_METHOD, classify) if name == "classify"
                            else (inference.REGRESS_METHOD, regress))
        return Signature(name, function, {"inputs": (object, (None,))}, {}, [], method)


class _ExampleManager:
    def lookup(self, model, version, label):
        return _ExampleServable()


def test_classify_and_regress_answer_in_tf_serving_json():
    from fm_keras._tf import tf
    from fm_keras.serving.rest import RestApi

    api = RestApi(_ExampleManager())
    body = {"signature_name": "classify", "examples": [{"user_id": "u1"}, {"user_id": "u2"}]}
    status, _, text = api.handle("POST", "/v1/models/m:classify", json.dumps(body).encode())
    assert status == 200, text
    assert json.loads(text) == {"result": [[["no", 0.25], ["yes", 0.75]]] * 2}
    body = {"signature_name": "regress", "context": {"user_id": "u1"}, "examples": [{"x": 1.5}]}
    status, _, text = api.handle("POST", "/v1/models/m:regress", json.dumps(body).encode())
    assert status == 200, text
    example = tf.train.Example()
    example.features.feature["user_id"].bytes_list.value.append(b"u1")
    example.features.feature["x"].float_list.value.append(1.5)
    # the regress signature returns the serialized example's length: context merged in
    assert json.loads(text) == {"result": [float(len(example.SerializeToString()))]}


@pytest.fixture(scope="module")
def batching_server(saved_models, tmp_path_factory):
    """REST with server-side batching: a lone request waits up to 300 ms for company."""
    from serving_testlib import start_server

    root = tmp_path_factory.mktemp("rest_batching")
    params = root / "batching_parameters.txt"
    params.write_text("max_batch_size { value: 64 }\nbatch_timeout_micros { value: 300000 }\n"
                      "max_enqueued_batches { value: 4 }\nnum_batch_threads { value: 1 }\n")
    monitoring = root / "monitoring.config"
    monitoring.write_text('prometheus_config { enable: true, path: "/metrics" }\n')
    srv = start_server(model_name="ranking", model_base_path=str(saved_models / "ranking"),
                       enable_batching=True, batching_parameters_file=str(params),
                       monitoring_config_file=str(monitoring))
    yield srv
    srv.stop()


def test_batched_rest_predicts_get_their_own_answers(batching_server, server):
    from concurrent.futures import ThreadPoolExecutor

    bodies = [{"instances": [{**ROW, "user_id": f"user{i}", "price": float(i)}] * (1 + i % 2)}
              for i in range(8)]
    bodies.append({"inputs": {k: [v] for k, v in ROW.items()}})  # the columnar format too
    with ThreadPoolExecutor(len(bodies)) as pool:
        batched = list(pool.map(lambda b: post(batching_server, "/v1/models/ranking:predict", b),
                                bodies))
    for body, (status, reply) in zip(bodies, batched):
        alone_status, alone = post(server, "/v1/models/ranking:predict", body)
        assert status == alone_status == 200, reply
        assert reply.keys() == alone.keys()
        if "predictions" in reply:
            assert len(reply["predictions"]) == len(body["instances"])
            np.testing.assert_allclose([r["logit"] for r in reply["predictions"]],
                                       [r["logit"] for r in alone["predictions"]], rtol=1e-6)
        else:
            np.testing.assert_allclose(reply["outputs"]["logit"], alone["outputs"]["logit"],
                                       rtol=1e-6)
    status, text = get(batching_server, "/metrics")
    assert status == 200
    sizes = re.search(r'processed_batch_size_sum\{model_name="ranking"\} (\S+)', text)
    counts = re.search(r'processed_batch_size_count\{model_name="ranking"\} (\S+)', text)
    assert float(sizes.group(1)) == 13 and float(counts.group(1)) < len(bodies)  # merged
    assert ':tensorflow:serving:request_count{model_name="ranking",status="OK"} 9' in text


def test_batched_rest_errors_answer_like_tf_serving(batching_server):
    status, reply = post(batching_server, "/v1/models/ranking:predict",
                         {"instances": [{**ROW, "extra": 1}]})
    assert status == 400 and "Sent extra: {extra}" in reply["error"]
    status, reply = post(batching_server, "/v1/models/ranking:predict",
                         {"instances": [ROW] * 65})  # more rows than max_batch_size
    assert status == 400 and reply["error"] == ("Task size 65 is larger than maximum input "
                                                "batch size 64")
    status, reply = post(batching_server, "/v1/models/ranking:classify", {"examples": [ROW]})
    assert status == 400 and "Expected classification signature" in reply["error"]
    status, reply = post(batching_server, "/v1/models/ranking:predict", {"instances": [ROW]})
    assert status == 200 and len(reply["predictions"]) == 1


def _exclude_signature():
    from fm_keras.serving.predict import Signature

    inputs = {"user_id": (np.dtype(object), (None,)),
              "exclude_item_ids": (np.dtype(object), (None, None))}
    return Signature("exclude_seen", None, inputs, {"user_id": 7, "exclude_item_ids": 7},
                     ["item_ids"])


@pytest.mark.parametrize("body", [
    {"instances": [{"user_id": "u1", "exclude_item_ids": ["i1"]},
                   {"user_id": "u2", "exclude_item_ids": ["i1", "i2"]}]},
    {"inputs": {"user_id": ["u1", "u2"], "exclude_item_ids": [["i1"], ["i1", "i2"]]}},
])
def test_ragged_exclude_rows_say_to_pad_with_empty_strings(body):
    """A new user's trial: rows of exclude_item_ids of different lengths got a shape error
    that did not say what to do."""
    from fm_keras.serving.errors import ServingError
    from fm_keras.serving.rest import arrays_from_json

    with pytest.raises(ServingError) as err:
        arrays_from_json(_exclude_signature(), body)
    assert err.value.http_status == 400
    assert err.value.message == ('input exclude_item_ids: rows of different lengths [1, 2]; '
                                 'pad the rows with "" to one length')
    padded = {"inputs": {"user_id": ["u1", "u2"], "exclude_item_ids": [["i1", ""], ["i1", "i2"]]}}
    arrays, _ = arrays_from_json(_exclude_signature(), padded)
    assert arrays["exclude_item_ids"].shape == (2, 2)


def test_ragged_numbers_say_rows_of_one_length():
    from fm_keras.serving.errors import ServingError
    from fm_keras.serving.rest import ragged_lengths, to_array

    with pytest.raises(ServingError, match=r"input x: rows of different lengths \[1, 2\]; "
                                           "send rows of one length"):
        to_array([[1.0], [1.0, 2.0]], np.float32, "x")
    with pytest.raises(ServingError, match=r"input exclude_item_keys: rows of different lengths "
                                           r"\[1, 2\]; pad the rows with 0 \(no item\)"):
        to_array([[12393], [12393, 12649]], np.int64, "exclude_item_keys")
    assert ragged_lengths([[["a"], ["b", "c"]]]) == [1, 2]
    assert ragged_lengths([["a", "b"], ["", ""]]) is None and ragged_lengths("a") is None


def test_a_number_beyond_float32_is_a_400_not_an_overflow_warning():
    """A new user's trial: {"age": 1e39} logged numpy's "overflow encountered in cast"
    RuntimeWarning and went on as inf."""
    import warnings

    from fm_keras.serving.errors import ServingError
    from fm_keras.serving.rest import to_array

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning fails the test
        for value in (1e39, [1.0, -1e39]):
            with pytest.raises(ServingError) as err:
                to_array(value, np.float32, "age")
            assert err.value.http_status == 400
            assert err.value.message == (f"input age: value {1e39 if value == 1e39 else -1e39:g} "
                                         "is out of float32 range (+-3.4028235e+38)")
        assert to_array([3e38, float("inf"), float("nan")], np.float32, "age").dtype == np.float32


def test_json_numbers_take_the_kind_of_the_tensor():
    """As json_tensor.cc: an integer tensor takes integers only (1.5 was cast to 1), a bool
    tensor booleans only, a float tensor any number but not a boolean; a huge exponent
    without overflow (1e-400, 1e300) is a number."""
    from fm_keras.serving.errors import ServingError
    from fm_keras.serving.rest import parse_json, to_array

    for value, dtype in [([1.5], np.int64), ([1, 2.0], np.int32), ([1, True], np.int64),
                         ([1], np.bool_), ([[1.0], [True]], np.float32)]:
        with pytest.raises(ServingError, match="is not of expected type") as err:
            to_array(value, dtype, "x")
        assert err.value.http_status == 400
    assert to_array([1, 2], np.int64, "x").tolist() == [1, 2]
    assert to_array([True, False], np.bool_, "x").tolist() == [True, False]
    assert to_array([1, 2.5], np.float32, "x").tolist() == [1.0, 2.5]
    assert to_array([], np.int64, "x").shape == (0,)
    # An integer beyond the tensor's range is refused, as json_tensor.cc's IsInt64 / IsInt
    # checks do, not wrapped by the cast (2**64 - 1 became -1, an item key's UNKNOWN_KEY).
    for value, dtype in [([2**63], np.int64), ([[2**64 - 1]], np.int64), ([2**31], np.int32),
                         ([-2**31 - 1], np.int32), ([[1, 2**63]], np.int64)]:
        with pytest.raises(ServingError, match="is not of expected type") as err:
            to_array(value, dtype, "x")
        assert err.value.http_status == 400
    assert to_array([[2**63 - 1, -2**63]], np.int64, "x").tolist() == [[2**63 - 1, -2**63]]
    assert to_array([2**31 - 1, -2**31], np.int32, "x").tolist() == [2**31 - 1, -2**31]
    assert parse_json(b'[1e-400, 1e300, -Infinity]') == [0.0, 1e300, float("-inf")]
    for body in (b'[1E+0400]', b'[-1' + b'0' * 400 + b'.5]'):
        with pytest.raises(ServingError, match="JSON Parse error: Number too big"):
            parse_json(body)
