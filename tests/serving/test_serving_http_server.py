"""The aiohttp REST front end: limits, deadlines and plumbing, with a stub API (no model)."""

import http.client
import json
import socket
import threading
import time

import pytest

from fm_keras.serving.http_server import INLINE_MAX_BODY_BYTES, INLINE_MAX_SECONDS, RestServer


class _Api:
    """RestApi's interface: echoes the request; ``/slow`` blocks until released, ``/sleep``
    sleeps 0.3 s. ``threads`` records the thread each call ran on."""

    def __init__(self):
        self.release = threading.Event()
        self.calls = 0
        self.threads = []

    def handle(self, method, path, body):
        self.calls += 1
        self.threads.append(threading.current_thread().name)
        if path == "/slow":
            self.release.wait(30)
        if path == "/sleep":
            time.sleep(0.3)
        return 200, "application/json", json.dumps({"method": method, "path": path,
                                                    "bytes": len(body)})


@pytest.fixture
def api():
    stub = _Api()
    yield stub
    stub.release.set()


def _server(api, **kw):
    options = dict(timeout_ms=30000, threads=4, max_connections=100, max_body_bytes=1000)
    options.update(kw)
    server = RestServer(api, "127.0.0.1", 0, **options)
    server.start()
    return server


def _request(port, method="POST", path="/v1/models/m:predict", body=b"{}", headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_paths_bodies_and_keep_alive(api):
    server = _server(api)
    try:
        assert _request(server.port, path="/v1/models/m:predict?x=1", body=b"abc") == (
            200, {"method": "POST", "path": "/v1/models/m:predict", "bytes": 3})
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        for i in range(3):  # one keep-alive connection, several requests
            conn.request("GET", f"/v1/models/m{i}")
            response = conn.getresponse()
            assert response.status == 200
            assert json.loads(response.read())["path"] == f"/v1/models/m{i}"
        conn.close()
        chunked = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        chunked.request("POST", "/c", body=iter([b"ab", b"cde"]),
                        headers={"Transfer-Encoding": "chunked"}, encode_chunked=True)
        assert json.loads(chunked.getresponse().read())["bytes"] == 5
        chunked.close()
    finally:
        server.stop()


def test_expect_100_continue_is_answered_before_the_body(api):
    server = _server(api)
    try:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        sock.sendall(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(b"body")
        reply = b""
        while not reply.endswith(b"}"):
            reply += sock.recv(4096)
        assert reply.startswith(b"HTTP/1.1 200") and b'"bytes": 4' in reply
        sock.close()
    finally:
        server.stop()


def test_body_over_the_limit_is_413_without_calling_the_api(api):
    server = _server(api, max_body_bytes=10)
    try:
        status, body = _request(server.port, body=b"x" * 11)
        assert status == 413 and "--rest_api_max_body_bytes" in body["error"]
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("POST", "/c", body=iter([b"x" * 6, b"x" * 6]),
                     headers={"Transfer-Encoding": "chunked"}, encode_chunked=True)
        assert conn.getresponse().status == 413
        conn.close()
        assert api.calls == 0
        assert _request(server.port, body=b"x" * 10)[0] == 200
    finally:
        server.stop()


def test_connections_over_the_limit_get_503(api):
    server = _server(api, max_connections=3)
    try:
        held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]
        time.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        reply = extra.recv(4096)
        assert reply.startswith(b"HTTP/1.1 503") and b"--rest_api_max_connections" in reply
        extra.close()
        for sock in held:
            sock.close()
        deadline = time.monotonic() + 30
        while len(server.connections) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _request(server.port)[0] == 200
    finally:
        server.stop()


def test_a_model_call_past_the_deadline_is_504_and_threads_stay_bounded(api):
    server = _server(api, timeout_ms=1000, threads=2, batching=True)  # every call in the pool
    try:
        results = []
        clients = [threading.Thread(
            target=lambda: results.append(_request(server.port, path="/slow"))) for _ in range(4)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(60)
        assert [status for status, _ in results] == [504] * 4
        assert all("Deadline Exceeded" in body["error"] for _, body in results)
        assert api.calls == 2  # two threads; the other two waited in the event loop
        api.release.set()
        assert _request(server.port)[0] == 200
    finally:
        server.stop()


def test_cheap_calls_run_on_the_loop_thread_and_slow_or_large_ones_in_the_pool(api):
    server = _server(api, max_body_bytes=2 * INLINE_MAX_BODY_BYTES)
    try:
        for _ in range(3):
            assert _request(server.port, path="/cheap")[0] == 200
        assert api.threads == ["rest"] * 3  # the event loop's thread: no hand-off
        assert server.call_seconds("/cheap") < INLINE_MAX_SECONDS
        assert _request(server.port, body=b"x" * (INLINE_MAX_BODY_BYTES + 1))[0] == 200
        assert api.threads[-1].startswith("rest_")  # a large body: a pool thread
        assert _request(server.port, path="/sleep")[0] == 200  # cost unknown yet: inline
        assert api.threads[-1] == "rest"
        assert server.call_seconds("/sleep") >= 0.3
        assert _request(server.port, path="/sleep")[0] == 200  # known to be slow: the pool
        assert api.threads[-1].startswith("rest_")
        assert _request(server.port, path="/cheap")[0] == 200  # per path
        assert api.threads[-1] == "rest"
    finally:
        server.stop()


def test_with_batching_every_call_runs_in_the_pool(api):
    server = _server(api, batching=True)
    try:
        for _ in range(2):
            assert _request(server.port, path="/cheap")[0] == 200
        assert all(name.startswith("rest_") for name in api.threads)
    finally:
        server.stop()


def test_an_inline_call_that_ends_past_the_deadline_is_504(api):
    server = _server(api, timeout_ms=100)
    try:
        status, body = _request(server.port, path="/sleep")  # 0.3 s, inline (cost unknown)
        assert status == 504 and "Deadline Exceeded" in body["error"]
        assert api.threads == ["rest"]
        assert _request(server.port, path="/cheap")[0] == 200
    finally:
        server.stop()


def test_a_keep_alive_connection_times_out_from_its_last_request_not_its_first(api):
    server = _server(api, timeout_ms=2000)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        for _ in range(3):  # the last request 2.4 s after the first, 1.2 s after the one before
            conn.request("GET", "/v1/models/m")
            response = conn.getresponse()
            assert response.status == 200
            response.read()
            time.sleep(1.2)
        conn.close()
        idle = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        assert idle.recv(1) == b""  # closed by the server after the timeout (not never)
        idle.close()
    finally:
        server.stop()


@pytest.mark.parametrize("kw", [{"timeout_ms": 0}, {"threads": 0}, {"max_connections": -1},
                                {"max_body_bytes": 0}])
def test_arguments_are_checked(api, kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        RestServer(api, "127.0.0.1", 0, **{**dict(timeout_ms=1, threads=1, max_connections=1,
                                                  max_body_bytes=1), **kw})


def test_bind_failure_raises(api):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = RestServer(api, "127.0.0.1", taken.getsockname()[1], 1000, 1, 1, 1)
        with pytest.raises(OSError):
            server.start()
