"""The aiohttp REST front end: limits, deadlines and plumbing, with a stub API (no model)."""

import http.client
import json
import socket
import threading
import time

import numpy as np
import pytest
from serving_testlib import wait_for

from fm_keras.serving.batching import Batcher
from fm_keras.serving.config import BatchingOptions
from fm_keras.serving.http_server import INLINE_MAX_BODY_BYTES, INLINE_MAX_SECONDS, RestServer


class _Call:
    """A parsed stub request; ``/batched`` goes through a real ``Batcher``."""

    def __init__(self, api, method, path, body):
        self.api, self.method, self.path, self.body = api, method, path, body

    def submit(self, deadline):
        if self.path != "/batched":
            return None
        return self.api.batcher.submit_async({"x": np.array([len(self.body)])}, 1, deadline)


class _Api:
    """RestApi's interface: echoes the request; ``/slow`` blocks until released, ``/sleep``
    sleeps 0.3 s, ``/batched`` doubles the body's length in a batch (its model waits for
    ``batch_gate``). ``threads`` records the thread each unbatched call ran on, ``batches`` the
    size and thread of each batch."""

    def __init__(self):
        self.release, self.batch_gate = threading.Event(), threading.Event()
        self.batch_started = threading.Event()
        self.batch_gate.set()
        self.calls = 0
        self.threads, self.batches = [], []
        self.batcher = Batcher(self._model, BatchingOptions(
            max_batch_size=8, batch_timeout_micros=100_000, max_enqueued_batches=1,
            num_batch_threads=1))

    def _model(self, arrays):
        self.batch_started.set()
        self.batch_gate.wait(30)
        self.batches.append((len(arrays["x"]), threading.current_thread().name))
        return {"y": arrays["x"] * 2}

    def handle(self, method, path, body):
        return self.complete(self.parse(method, path, body))

    def parse(self, method, path, body):
        if path == "/answered":  # no model call
            return 200, "application/json", json.dumps({"parsed": True})
        return _Call(self, method, path, body)

    def complete(self, call):
        self.calls += 1
        self.threads.append(threading.current_thread().name)
        if call.path == "/slow":
            self.release.wait(30)
        if call.path == "/sleep":
            time.sleep(0.3)
        return self.answer(call, {"method": call.method, "path": call.path,
                                  "bytes": len(call.body)})

    def answer(self, call, outputs=None, error=None):
        if error is not None:
            return error.http_status, "application/json", json.dumps({"error": error.message})
        if "y" in outputs:
            outputs = {"y": int(outputs["y"][0]), "thread": threading.current_thread().name}
        return 200, "application/json", json.dumps(outputs)


@pytest.fixture
def api():
    stub = _Api()
    yield stub
    stub.release.set()
    stub.batch_gate.set()
    stub.batcher.stop()


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


def test_with_batching_unbatched_calls_run_in_the_pool(api):
    server = _server(api, batching=True)
    try:
        for _ in range(2):
            assert _request(server.port, path="/cheap")[0] == 200
        assert api.threads and all(name.startswith("rest_") for name in api.threads)
        assert _request(server.port, path="/answered") == (200, {"parsed": True})
        assert api.calls == 2  # answered by parse: no model call, no thread
    finally:
        server.stop()


def _concurrently(port, bodies, path="/batched"):
    results = [None] * len(bodies)

    def one(i):
        results[i] = _request(port, path=path, body=bodies[i])

    clients = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(60)
    return results


def test_batched_calls_are_awaited_on_the_loop_not_in_a_pool_thread(api):
    server = _server(api, batching=True)
    try:
        results = _concurrently(server.port, [b"x" * (i + 1) for i in range(6)])
        assert [r[0] for r in results] == [200] * 6
        assert [r[1]["y"] for r in results] == [2 * (i + 1) for i in range(6)]  # each its own
        assert {r[1]["thread"] for r in results} == {"rest"}  # answered on the loop's thread
        assert api.threads == []  # no pool thread took part
        assert sum(size for size, _ in api.batches) == 6 and len(api.batches) < 6  # merged
        assert all(name.startswith("batch-") for _, name in api.batches)
    finally:
        server.stop()


def test_a_batched_call_past_the_deadline_is_504_and_the_batch_thread_survives(api):
    server = _server(api, timeout_ms=1000, batching=True)
    try:
        api.batch_gate.clear()
        running = _request(server.port, path="/batched", body=b"a")  # its batch outlives it
        queued = _request(server.port, path="/batched", body=b"bb")  # waits behind that batch
        for status, body in (running, queued):
            assert status == 504 and "Deadline exceeded" in body["error"]
        api.batch_gate.set()  # the batch ends after its future was answered; "bb" is dropped
        assert _request(server.port, path="/batched", body=b"ccc")[1]["y"] == 6
        assert [size for size, _ in api.batches] == [1, 1]  # "a", then "ccc": "bb" never ran
    finally:
        server.stop()


def test_a_full_batch_queue_is_503_in_tf_serving_words(api):
    server = _server(api, batching=True)
    try:
        api.batch_gate.clear()  # the first batch blocks; the queue holds one batch of 8 rows
        results = []
        clients = [threading.Thread(target=lambda: results.append(
            _request(server.port, path="/batched", body=b"1")))]
        clients[0].start()
        assert api.batch_started.wait(30)
        clients += [threading.Thread(target=lambda: results.append(
            _request(server.port, path="/batched", body=b"22"))) for _ in range(9)]
        for thread in clients[1:]:
            thread.start()
        deadline = time.monotonic() + 30
        while not results and time.monotonic() < deadline:  # the refusal comes at once
            time.sleep(0.01)
        api.batch_gate.set()
        for thread in clients:
            thread.join(60)
        assert sorted(status for status, _ in results) == [200] * 9 + [503]
        refused = next(body for status, body in results if status == 503)
        assert refused["error"] == ("The batch scheduling queue to which this task was "
                                    "submitted is full")
        assert _request(server.port, path="/batched", body=b"1")[0] == 200
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


def test_stop_answers_the_requests_in_progress_before_closing(api):
    """SIGTERM during traffic: stop() closed every connection before aiohttp's graceful
    shutdown, so a request whose model call was running got a connection reset instead of
    its answer (gRPC's stop(grace) answered its calls)."""
    server = _server(api, batching=True)  # every call in the pool
    results, stopper = [], threading.Thread(target=lambda: server.stop(grace=60))
    client = threading.Thread(target=lambda: results.append(_request(server.port, path="/slow")))
    client.start()
    try:
        assert wait_for(lambda: api.calls == 1, 60)  # the model call is running
        stopper.start()
        assert wait_for(lambda: _refused(server.port), 60)  # no longer listening
        api.release.set()
        client.join(60)
        stopper.join(60)
        assert results == [(200, {"method": "POST", "path": "/slow", "bytes": 2})]
    finally:
        api.release.set()
        server.stop()


def _refused(port) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False
