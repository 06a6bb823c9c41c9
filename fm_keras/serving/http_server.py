"""The REST front end: HTTP/1.1 on aiohttp, on one event loop; slow model calls in a pool.

``RestApi`` (rest.py) does the work (``handle``, or its steps: parse, model call, answer);
this module is the plumbing around it, with the protections a Python ``http.server`` lacked
(issue 14, item 9):

- **Where the model call runs.** A cheap call runs inline on the event loop's thread: no
  hand-off to a pool thread and back, which cost ~110 µs of CPU per request and a GIL wait on
  each crossing (BENCHMARKS.md, "REST: model calls inline on the event loop"). Cheap means:
  no server-side batching, a body of at most ``INLINE_MAX_BODY_BYTES``, and the fastest of the
  last ``_RECENT_CALLS`` calls on the same path took at most ``INLINE_MAX_SECONDS``, which
  bounds how long one request can hold up the others. (The fastest, not an average: a call
  preempted on a busy machine, or waiting for the GIL in the pool, measures long although the
  model is cheap; with a moving average the path went to the pool on a loaded machine and
  stayed there.) With server-side batching a request of at most ``INLINE_MAX_BODY_BYTES`` is
  parsed on the loop and its batched call awaited there: ``Batcher.submit_async``'s future,
  which the batch thread completes (one thread crossing each way, as ``http.server``'s
  connection thread blocking in the batch queue had; a hand-off to a pool thread that then
  blocked cost ~32% of the QPS, BENCHMARKS.md). Every other call (large, slow, or not
  batched: classify, regress) runs on a pool of ``--rest_api_num_threads`` threads.
- **Request timeout** (``--rest_api_timeout_in_ms``, TF Serving's flag, default 30 s). A
  request must arrive completely within the timeout from its first byte (a connection that
  sends nothing, or headers without the end of the body, is closed when it runs out), and the
  model call gets what is left of it (then 504 DEADLINE_EXCEEDED; an inline call, which cannot
  be interrupted, is answered 504 if it ends past the deadline; an awaited batched call is
  answered 504 at the deadline, and its batch, if already running, finishes unheard). An idle
  keep-alive connection is closed after the same timeout, as TF Serving's libevent server does.
- **Bounded work.** The pool has ``--rest_api_num_threads`` threads; requests beyond that wait
  in the event loop (not in a thread) until a slot frees or their deadline passes. At most
  ``--rest_api_max_connections`` connections are open; more are answered 503 and closed.
- **Body size limit** (``--rest_api_max_body_bytes``): a larger body is 413 before it is read.

aiohttp parses HTTP (keep-alive, chunked bodies, ``Expect: 100-continue``, header limits).
Each connection's aiohttp protocol is wrapped by ``_Connection``, which sees every byte
arrive and so can time out requests whose headers never finish (aiohttp calls the handler
only after the headers).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import json
import logging
import threading
import time

from aiohttp import web

log = logging.getLogger("fm_keras.serving")

INLINE_MAX_BODY_BYTES = 64 * 1024  # a 1,000-row request to a small model is ~70 KiB of JSON
INLINE_MAX_SECONDS = 0.005  # the longest a cheap call may hold up the other connections
_RECENT_CALLS = 16  # call times kept per path
_MAX_PATHS = 1024  # the paths are the client's: forget them all beyond this many

_WAITING, _RECEIVING, _HANDLING = 0, 1, 2
_REJECT = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
           b"Connection: close\r\nContent-Length: %d\r\n\r\n%s")


class _Connection(asyncio.Protocol):
    """One client connection: aiohttp's protocol plus the request deadline.

    States: WAITING (no byte of a request yet; the timer is the keep-alive timeout),
    RECEIVING (the timer runs from the request's first byte), HANDLING (the request has fully
    arrived; the handler owns the deadline). The timer closes the connection.
    """

    __slots__ = ("front", "inner", "transport", "state", "started", "timer")

    def __init__(self, front: "RestServer", inner):
        self.front, self.inner = front, inner
        self.transport = self.timer = None
        self.state, self.started = _RECEIVING, 0.0

    def _arm(self) -> None:
        # The timer is not moved per request (a cancel and a new heap entry each time cost ~10%
        # of the loop's time per request): it stays at its earlier, sooner time and, when it
        # fires, checks whether the deadline has moved since.
        self.started = self.front.loop.time()
        if self.timer is None:
            self.timer = self.front.loop.call_at(self.started + self.front.timeout, self._expire)

    def _expire(self) -> None:
        self.timer = None
        if self.state == _HANDLING or self.transport is None:
            return  # waiting() arms it again
        due = self.started + self.front.timeout
        if self.front.loop.time() < due:
            self.timer = self.front.loop.call_at(due, self._expire)
            return
        log.debug("REST: closing a connection idle or incomplete for %.1f s", self.front.timeout)
        self.transport.close()

    def handling(self) -> float:
        """The request has arrived: the timer leaves it open; returns its deadline (loop time)."""
        self.state = _HANDLING
        return self.started + self.front.timeout

    def waiting(self) -> None:
        """The answer is written: the connection may idle until the keep-alive timeout."""
        if self.transport is not None and not self.transport.is_closing():
            self.state = _WAITING
            self._arm()

    # asyncio.Protocol, delegated to aiohttp's RequestHandler
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.front.connections[self.inner] = self
        self._arm()  # a connection that sends nothing is an incomplete request too
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.state == _WAITING:
            self.state = _RECEIVING
            self._arm()
        self.inner.data_received(data)

    def eof_received(self):
        return self.inner.eof_received()

    def connection_lost(self, exc) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport = None
        self.front.connections.pop(self.inner, None)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class _Reject(asyncio.Protocol):
    """Over the connection limit: 503 and close."""

    def connection_made(self, transport) -> None:
        body = json.dumps({"error": "Too many open connections to the REST API "
                                    "(--rest_api_max_connections)"}).encode()
        transport.write(_REJECT % (len(body), body))
        transport.close()


def _timed(function, *args):
    """(seconds, function(*args)): a pool call's duration, its wait for the pool excluded."""
    start = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - start, result


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _response(reply: tuple[int, str, str]) -> web.Response:
    """A ``RestApi`` reply (HTTP status, content type, body text) -> an aiohttp response."""
    status, content_type, text = reply
    return web.Response(status=status, body=text.encode("utf-8"),
                        headers={"Content-Type": content_type})


def _json_response(status: int, message: str) -> web.Response:
    return web.Response(status=status, body=json.dumps({"error": message}).encode(),
                        headers={"Content-Type": "application/json"})


class RestServer:
    """Serves a ``RestApi`` on an asyncio event loop in a thread of its own.

    Args:
        api: the request handler (``RestApi``).
        host: address to bind; port: 0 picks a free one (see ``port`` after ``start``).
        timeout_ms: request timeout in milliseconds (> 0).
        threads: threads for the model calls that do not run inline (> 0).
        max_connections: open connections allowed (> 0).
        max_body_bytes: largest request body accepted (> 0).
        batching: model calls wait in a server-side batch queue (``--enable_batching``):
            none runs inline; small predicts are awaited on the loop, the rest run in the pool.
    """

    def __init__(self, api, host: str, port: int, timeout_ms: int, threads: int,
                 max_connections: int, max_body_bytes: int, batching: bool = False):
        for name, value in (("timeout_ms", timeout_ms), ("threads", threads),
                            ("max_connections", max_connections),
                            ("max_body_bytes", max_body_bytes)):
            if value <= 0:
                raise ValueError(f"RestServer {name} must be > 0, got {value}")
        self.api, self.host, self.port = api, host, port
        self.timeout = timeout_ms / 1000
        self.threads, self.max_connections, self.max_body_bytes = (
            threads, max_connections, max_body_bytes)
        self.batching = batching
        self._recent: dict[str, collections.deque] = {}  # path -> its last call times (s)
        self.connections: dict = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="rest")
        self._slots = None
        self._server = self._aiohttp = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        """Binds and starts serving; returns the bound port.

        Raises:
            OSError: the address cannot be bound.
        """
        ready = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="rest", daemon=True)
        self._thread.start()
        self.port = ready.result()
        return self.port

    def _run(self, ready: concurrent.futures.Future) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._listen())
        except BaseException as err:  # noqa: BLE001 - handed to start()
            ready.set_exception(err)
            self.loop.close()
            return
        ready.set_result(self._server.sockets[0].getsockname()[1])
        try:
            self.loop.run_forever()
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    async def _listen(self) -> None:
        self._slots = asyncio.Semaphore(self.threads)
        self._aiohttp = web.Server(self._handle, access_log=None,
                                   keepalive_timeout=self.timeout)
        self._server = await self.loop.create_server(self._protocol, self.host, self.port,
                                                     reuse_address=True, backlog=1024)

    def _protocol(self) -> asyncio.Protocol:
        if len(self.connections) >= self.max_connections:
            return _Reject()
        return _Connection(self, self._aiohttp())

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        loop = self.loop
        connection = self.connections.get(request.protocol)
        try:
            body = await self._read_body(request)
        except _TooLarge as err:
            return _json_response(413, str(err))
        except ConnectionError:  # closed (by the timeout or the client) before the body came:
            raise asyncio.CancelledError from None  # what aiohttp itself does then, quietly
        deadline = connection.handling() if connection else loop.time() + self.timeout
        method, path = request.method, request.raw_path.split("?", 1)[0]
        try:
            if self.inline(path, len(body)):
                response = self._call_inline(method, path, body, deadline)
            elif self.batching and len(body) <= INLINE_MAX_BODY_BYTES:
                response = await self._call_batched(method, path, body, deadline)
            else:
                response = await self._call(
                    functools.partial(self.api.handle, method, path, body), path, deadline)
        finally:
            if connection is not None:
                connection.waiting()
        return response

    async def _read_body(self, request) -> bytes:
        length = request.content_length
        if length is not None and length > self.max_body_bytes:
            raise _TooLarge(length, self.max_body_bytes)
        if request.headers.get("Expect", "").lower() == "100-continue":
            # curl sends this for bodies over 1 KiB and would wait a second for the answer
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if length is not None:
            return await request.content.readexactly(length) if length else b""
        chunks, size = [], 0
        async for chunk in request.content.iter_any():  # chunked transfer encoding
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _TooLarge(size, self.max_body_bytes)
            chunks.append(chunk)
        return b"".join(chunks)

    def inline(self, path: str, body_bytes: int) -> bool:
        """Whether a request's model call runs on the event loop's thread (see the module doc)."""
        return (not self.batching and body_bytes <= INLINE_MAX_BODY_BYTES
                and self.call_seconds(path) <= INLINE_MAX_SECONDS)

    def call_seconds(self, path: str) -> float:
        """The fastest of the path's recent model calls, in seconds (0 before the first)."""
        recent = self._recent.get(path)
        return min(recent) if recent else 0.0

    def _record_cost(self, path: str, seconds: float) -> None:
        recent = self._recent.get(path)
        if recent is None:
            if len(self._recent) >= _MAX_PATHS:
                self._recent.clear()
            recent = self._recent[path] = collections.deque(maxlen=_RECENT_CALLS)
        recent.append(seconds)

    def _call_inline(self, method: str, path: str, body: bytes, deadline: float):
        start = time.perf_counter()
        try:
            reply = self.api.handle(method, path, body)
        except Exception as err:  # noqa: BLE001 - RestApi.handle answers its errors itself
            log.exception("REST %s %s failed", method, path)
            return _json_response(500, f"REST handler failed: {err!r}")
        finally:
            self._record_cost(path, time.perf_counter() - start)
        if self.loop.time() > deadline:
            return _json_response(504, "Deadline Exceeded")
        return _response(reply)

    async def _call_batched(self, method: str, path: str, body: bytes, deadline: float):
        """Parses on the loop and awaits the batch (the batch thread wakes the loop itself)."""
        call = self.api.parse(method, path, body)
        if isinstance(call, tuple):  # answered without a model call (or a bad request)
            return _response(call)
        try:
            future = call.submit(deadline)
        except Exception as err:  # noqa: BLE001 - refused at once: queue full, too large
            return _response(self.api.answer(call, error=err))
        if future is None:  # not batched (classify, regress, no batch dimension): the pool
            return await self._call(functools.partial(self.api.complete, call), path, deadline)
        try:
            outputs = await future
        except Exception as err:  # noqa: BLE001 - DEADLINE_EXCEEDED, the run's error
            return _response(self.api.answer(call, error=err))
        return _response(self.api.answer(call, outputs))

    async def _call(self, work, path: str, deadline: float):
        """Runs ``work()`` (-> a reply) on a pool thread, waiting for a free one on the loop."""
        loop = self.loop
        if self._slots.locked():  # all threads busy: wait in the loop, not in a thread
            try:
                await asyncio.wait_for(self._slots.acquire(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return _json_response(504, "Deadline Exceeded: no free REST worker thread "
                                           "within --rest_api_timeout_in_ms")
        else:
            await self._slots.acquire()  # free: returns at once
        future = loop.run_in_executor(self._pool, _timed, work)
        # The slot frees when the call ends, even one whose client has given up on it. A plain
        # timer + waiter instead of asyncio.wait_for: no extra task per request.
        waiter = loop.create_future()
        future.add_done_callback(lambda _: (self._slots.release(), _wake(waiter)))
        timer = loop.call_at(deadline, _wake, waiter)
        await waiter
        timer.cancel()
        if not future.done():
            return _json_response(504, "Deadline Exceeded")
        if future.cancelled() or future.exception() is not None:  # RestApi.handle answers
            return _json_response(500, f"REST worker failed: {future.exception()!r}")  # errors
        seconds, reply = future.result()
        self._record_cost(path, seconds)
        return _response(reply)

    def stop(self, grace: float = 1.0) -> None:
        """Stops listening, lets the requests in progress finish and be answered for up to
        ``grace`` seconds (as gRPC's ``stop(grace)``; idle and half-received connections close
        at once), then closes every connection and the event loop; idempotent."""
        if self.loop is None or self.loop.is_closed():
            return

        async def close():
            self._server.close()
            # Closing the transports first, as this did, reset the requests in progress.
            await self._aiohttp.shutdown(grace)
            for connection in list(self.connections.values()):
                if connection.transport is not None:
                    connection.transport.close()
            self.loop.stop()

        asyncio.run_coroutine_threadsafe(close(), self.loop)
        self._thread.join(timeout=grace + 10)
        self._pool.shutdown(wait=False, cancel_futures=True)


class _TooLarge(Exception):
    def __init__(self, size: int, limit: int):
        super().__init__(f"Request body of {size} bytes is larger than the limit of {limit} "
                         "bytes (--rest_api_max_body_bytes)")


def start_rest_server(api, host: str, port: int, timeout_ms: int, threads: int,
                      max_connections: int, max_body_bytes: int,
                      batching: bool = False) -> tuple[RestServer, int]:
    """Starts a ``RestServer``; returns (server, bound port)."""
    server = RestServer(api, host, port, timeout_ms, threads, max_connections, max_body_bytes,
                        batching)
    return server, server.start()
