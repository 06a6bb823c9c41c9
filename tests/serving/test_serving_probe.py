"""The TF Serving behaviour probe of issue 14, over real loopback sockets.

One test per numbered item (item 8, UTF-8 ids in ``index``, belongs to tests/test_recall.py;
item 5, the reload RSS plateau, is measured by benchmarks/serving_reload_rss.py); each sends
what the probe sent, checks the answer TF Serving's behaviour implies, then sends a valid
request that must succeed. Clients are the official tensorflow-serving-api stubs and plain HTTP.
"""

import http.client
import json
import logging
import os
import socket
import threading
import time

import grpc
import pytest
from serving_testlib import predict_request, start_server, wait_for
from tensorflow_serving.apis import (get_model_status_pb2, model_service_pb2_grpc,
                                     prediction_service_pb2_grpc)

from fm_keras.serving import toy_models

ROW = {"user_id": "u1", "item_id": "item_1", "price": 1.0}


def _http(port, method, path, body=None, timeout=30):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _rest_predict_works(port, model="ranking"):
    status, body = _http(port, "POST", f"/v1/models/{model}:predict", {"instances": [ROW]})
    assert status == 200, body
    assert 0 < body["predictions"][0]["probability"] < 1


def _grpc_predict(port, request=None, timeout=10):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        return stub.Predict(request or predict_request(), timeout=timeout)


def _grpc_error(port, request):
    with pytest.raises(grpc.RpcError) as info:
        _grpc_predict(port, request)
    return info.value.code(), info.value.details()


def _status(port, model="ranking"):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = model
        return {s.version: s for s in stub.GetModelStatus(request, timeout=10).model_version_status}


@pytest.fixture
def base(saved_models, tmp_path):
    """A fresh base path holding version 1 of the toy ranking model."""
    path = str(tmp_path / "ranking")
    os.makedirs(path)
    toy_models.copy_version(str(saved_models / "ranking" / "1"), path, 1)
    return path


# 1 ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["18446744073709551616", "9223372036854775808", "%C2%B2", "-1",
                                     "1e3", "%31"])
def test_1_a_version_that_is_not_an_int64_is_invalid_argument(server, version):
    for method, path, body in [
            ("GET", f"/v1/models/ranking/versions/{version}", None),
            ("GET", f"/v1/models/ranking/versions/{version}/metadata", None),
            ("POST", f"/v1/models/ranking/versions/{version}:predict", {"instances": [ROW]})]:
        status, reply = _http(server.rest_port, method, path, body)
        assert status == 400, (path, reply)
        assert "version" in reply["error"].lower()
    _rest_predict_works(server.rest_port)


def test_1_grpc_negative_version_is_invalid_argument(server):
    request = predict_request()
    request.model_spec.version.value = -1
    code, details = _grpc_error(server.grpc_port, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "version" in details
    request.model_spec.version.value = 2**63 - 1  # valid int64, not loaded
    assert _grpc_error(server.grpc_port, request)[0] == grpc.StatusCode.NOT_FOUND
    assert _grpc_predict(server.grpc_port).model_spec.version.value == 1


# 2 ----------------------------------------------------------------------------------------------
def _with_input(name, proto):
    request = predict_request()
    request.inputs[name].CopyFrom(proto)
    return request


def test_2_tensor_protos_are_checked_before_allocation(server):
    from tensorflow.core.framework import tensor_pb2, types_pb2

    negative = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_content=b"\0" * 16)
    negative.tensor_shape.dim.add(size=-1)
    huge = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING)
    huge.tensor_shape.dim.add(size=2**62)
    short = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_content=b"\0" * 12)
    short.tensor_shape.dim.add(size=4)
    overflow = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[b"u"])
    for _ in range(3):
        overflow.tensor_shape.dim.add(size=2**62)  # product wraps in int64 arithmetic
    unknown = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[1.0])
    unknown.tensor_shape.unknown_rank = True
    for name, proto, words in [("price", negative, "negative dimension"),
                               ("user_id", huge, "holds 0 values"),
                               ("price", short, "got 12 bytes"),
                               ("user_id", overflow, "holds 1 values"),
                               ("price", unknown, "unknown_rank")]:
        code, details = _grpc_error(server.grpc_port, _with_input(name, proto))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert f"input tensor alias {name}" in details and words in details
        assert _grpc_predict(server.grpc_port).model_spec.version.value == 1


# 3 ----------------------------------------------------------------------------------------------
def test_3_only_ascii_digit_directories_are_versions(saved_models, base):
    for odd in ("²", "٣", "1e3", "00x", "9223372036854775808"):
        os.makedirs(os.path.join(base, odd))
    server = start_server(model_name="ranking", model_base_path=base)
    try:
        assert set(_status(server.grpc_port)) == {1}
        toy_models.copy_version(str(saved_models / "ranking" / "1"), base, 2)
        assert wait_for(lambda: _grpc_predict(server.grpc_port).model_spec.version.value == 2)
        assert set(_status(server.grpc_port)) == {1, 2}
    finally:
        server.stop()


# 4 ----------------------------------------------------------------------------------------------
def test_4_a_failed_base_path_listing_keeps_the_loaded_version(base, monkeypatch, caplog):
    """The base path unreadable (EACCES; the test runs as root, so os.listdir is made to fail
    the way it does for a server without DAC override), then gone: version 1 keeps serving."""
    server = start_server(model_name="ranking", model_base_path=base)
    real_listdir = os.listdir

    def unreadable(path="."):
        if os.path.abspath(str(path)) == os.path.abspath(base):
            raise PermissionError(13, "Permission denied", str(path))
        return real_listdir(path)

    try:
        with caplog.at_level(logging.ERROR, logger="fm_keras.serving"):
            monkeypatch.setattr(os, "listdir", unreadable)
            failed = []
            for _ in range(30):  # 3 s: ~3 polls at --file_system_poll_wait_seconds=1
                try:
                    assert _grpc_predict(server.grpc_port).model_spec.version.value == 1
                except grpc.RpcError as err:
                    failed.append(err.code())
                time.sleep(0.1)
            assert failed == []
            assert wait_for(lambda: "Permission denied" in caplog.text)
            monkeypatch.setattr(os, "listdir", real_listdir)
            moved = base + ".away"
            os.rename(base, moved)  # a missing base path is a failed listing too
            time.sleep(2.5)
            assert _grpc_predict(server.grpc_port).model_spec.version.value == 1
            os.rename(moved, base)
        assert caplog.text.count("File system poll for servable ranking failed") == 2  # once each
        assert _status(server.grpc_port)[1].state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
        _rest_predict_works(server.rest_port)
    finally:
        server.stop()


# 6 ----------------------------------------------------------------------------------------------
def test_6_a_model_that_reads_writes_and_prints_is_refused(saved_models, tmp_path):
    secret, target = tmp_path / "secret.txt", tmp_path / "written.txt"
    secret.write_text("server-side secret")
    hostile = str(tmp_path / "hostile")
    toy_models.write_file_access_model(hostile, str(secret), str(target))
    config = tmp_path / "models.config"
    config.write_text(
        'model_config_list {\n'
        f'  config {{ name: "hostile" base_path: "{hostile}" model_platform: "tensorflow" }}\n'
        f'  config {{ name: "ranking" base_path: "{saved_models / "ranking"}" '
        'model_platform: "tensorflow" }\n}\n')
    server = start_server(model_config_file=str(config))
    try:
        (state,) = _status(server.grpc_port, "hostile").values()
        assert state.state == get_model_status_pb2.ModelVersionStatus.END
        message = state.status.error_message
        for words in ["ReadFile (file system)", "WriteFile (file system)", "PrintV2 (print)",
                      "signature 'serving_default'", "--allow_ops=PrintV2,ReadFile,WriteFile"]:
            assert words in message, message
        assert not target.exists()  # refused before warmup could run it
        code, _ = _grpc_error(server.grpc_port, predict_request("hostile", {"user_id": ["u1"]}))
        assert code == grpc.StatusCode.NOT_FOUND
        _rest_predict_works(server.rest_port)
    finally:
        server.stop()
    server = start_server(model_config_file=str(config), allow_ops="ReadFile,WriteFile,PrintV2")
    try:
        response = _grpc_predict(server.grpc_port, predict_request("hostile", {"user_id": ["u1"]}))
        assert list(response.outputs) == ["length"]
        assert target.read_text() == "server-side secret"  # accepted knowingly: it runs
    finally:
        server.stop()


# 7 ----------------------------------------------------------------------------------------------
def test_7_serve_warns_about_a_newer_fm_keras_export_format(base, caplog):
    from fm_keras import fsutil

    version_dir = os.path.join(base, "1")
    fsutil.write_json(os.path.join(version_dir, "assets.extra", "fm_keras.json"),
                      {"format": "fm_keras.ranking", "format_version": 99,
                       "versions": {"fm_keras_export": "9.9.9"}})
    with caplog.at_level(logging.WARNING, logger="fm_keras.serving"):
        server = start_server(model_name="ranking", model_base_path=base)
    try:
        assert "format_version 99 (written by fm_keras 9.9.9)" in caplog.text
        assert "newer than format_version 1" in caplog.text
        _rest_predict_works(server.rest_port)  # TF Serving serves it by its SignatureDefs
    finally:
        server.stop()


# 9 ----------------------------------------------------------------------------------------------
def _partial_request(port) -> socket.socket:
    """Headers that promise a body of 100 bytes, and 10 of them."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(b"POST /v1/models/ranking:predict HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"instances")
    return sock


def _closed(sock) -> bool:
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True


def test_9_partial_requests_are_closed_by_the_timeout_and_do_not_hold_threads(base):
    timeout_ms = 1500
    server = start_server(model_name="ranking", model_base_path=base,
                          rest_api_timeout_in_ms=timeout_ms)
    try:
        _rest_predict_works(server.rest_port)
        threads_before = threading.active_count()
        started = time.monotonic()
        lone = _partial_request(server.rest_port)
        headers_only = socket.create_connection(("127.0.0.1", server.rest_port), timeout=60)
        headers_only.sendall(b"GET /v1/models/ranking HTTP/1.1\r\nHost: x\r\n")  # no end
        silent = socket.create_connection(("127.0.0.1", server.rest_port), timeout=60)
        idle = [_partial_request(server.rest_port) for _ in range(200)]
        for _ in range(20):  # a normal client is answered while 200 partial requests wait
            _rest_predict_works(server.rest_port)
        assert threading.active_count() - threads_before < 40  # no thread per connection
        for sock in [lone, headers_only, silent, *idle]:
            assert _closed(sock)  # blocks until the server closes it (socket timeout 60 s)
        elapsed = time.monotonic() - started
        assert elapsed >= 0.9 * timeout_ms / 1000  # closed by the timeout, not at once
        for sock in [lone, headers_only, silent, *idle]:
            sock.close()
        _rest_predict_works(server.rest_port)
    finally:
        server.stop()


def test_9_a_complete_request_on_a_slow_connection_is_answered(base):
    server = start_server(model_name="ranking", model_base_path=base, rest_api_timeout_in_ms=5000)
    try:
        body = json.dumps({"instances": [ROW]}).encode()
        sock = socket.create_connection(("127.0.0.1", server.rest_port), timeout=30)
        sock.sendall(b"POST /v1/models/ranking:predict HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        for i in range(0, len(body), 16):  # dribbled, well within the timeout
            sock.sendall(body[i:i + 16])
            time.sleep(0.01)
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            reply += sock.recv(65536)
        assert reply.startswith(b"HTTP/1.1 200")
        sock.close()
        _rest_predict_works(server.rest_port)
    finally:
        server.stop()
