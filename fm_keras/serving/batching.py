"""Server-side batching of concurrent requests, with TF Serving's BatchingParameters.

One ``Batcher`` per (model, version, signature). Requests wait in a bounded queue; each of
``num_batch_threads`` workers takes the oldest requests, up to ``max_batch_size`` rows, once
the batch is full or the oldest request has waited ``batch_timeout_micros``; it concatenates
the inputs along dim 0, runs the signature once, and splits the outputs back. When the queue
holds ``max_enqueued_batches`` full batches a new request is answered UNAVAILABLE at once
instead of queueing without bound (TF Serving's "queue ... is full").

Two ways to wait for a request's slice, on the same queue: ``submit`` blocks the calling thread
(gRPC's worker threads); ``submit_async`` returns an asyncio future that the batch thread
completes through ``loop.call_soon_threadsafe``, once per batch and event loop, the loop then
resolving one future per iteration (the REST event loop awaits it: one thread crossing each
way, no thread parked per request).
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time

import numpy as np

from fm_keras.serving.config import BatchingOptions
from fm_keras.serving.errors import ServingError, invalid_argument


_QUEUE_DEADLINE = "Deadline exceeded while waiting in the batch queue"


class _Task:
    """One request in the queue; ``done`` (a threading.Event) or ``future`` (asyncio) is set."""

    __slots__ = ("arrays", "rows", "enqueued", "done", "future", "timer", "outputs", "error",
                 "abandoned")

    def __init__(self, arrays, rows, future=None):
        self.arrays, self.rows = arrays, rows
        self.enqueued = time.monotonic()
        self.future, self.timer = future, None
        self.done = threading.Event() if future is None else None
        self.outputs = self.error = None
        self.abandoned = False


def _resolve(tasks: list[_Task], index: int = 0) -> None:
    """On the event loop: hands ``tasks[index]``'s outputs or error to its future, and the
    next task to the loop's next iteration.

    One task per iteration, so that the loop reads new requests between the answers (each
    iteration polls the sockets first): the answer of the first client's request is written
    and its next request enqueued (which starts the next batch's timeout) while the others are
    answered, as the threads of a thread-per-connection server overlap. Resolving a whole batch
    at once answered all of it before reading anything: ~25% fewer QPS with 32 clients
    (BENCHMARKS.md, "REST: batched calls awaited on the event loop").
    """
    task = tasks[index]
    if index + 1 < len(tasks):
        asyncio.get_running_loop().call_soon(_resolve, tasks, index + 1)
    if task.timer is not None:
        task.timer.cancel()
    if task.future.done():  # the deadline passed first, or the awaiting handler was cancelled
        return
    if task.error is not None:
        task.future.set_exception(task.error)
    else:
        task.future.set_result(task.outputs)


def _expire(task: _Task) -> None:
    """On the event loop, at a queued task's deadline: DEADLINE_EXCEEDED unless answered."""
    task.timer = None
    if not task.future.done():
        task.abandoned = True  # a worker that has not taken it yet skips it
        task.future.set_exception(ServingError("DEADLINE_EXCEEDED", _QUEUE_DEADLINE))


def _trailing_shapes(arrays: dict) -> tuple:
    """The inputs' names and shapes beyond dim 0: requests that agree on them can merge."""
    return tuple((name, array.shape[1:]) for name, array in sorted(arrays.items()))


class Batcher:
    """Batches calls of ``run(arrays) -> outputs`` (dicts of arrays with a shared dim 0)."""

    def __init__(self, run, options: BatchingOptions, name: str = "", on_batch=None):
        self._run = run
        self._options = options
        self._name = name
        self._on_batch = on_batch  # callback(batch_rows) for metrics
        self._queue: collections.deque[_Task] = collections.deque()
        self._queued_rows = 0
        self._capacity = options.max_batch_size * options.max_enqueued_batches
        self._cond = threading.Condition()
        self._stopped = False
        self._threads = [threading.Thread(target=self._work, name=f"batch-{name}-{i}", daemon=True)
                         for i in range(options.num_batch_threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, arrays: dict[str, np.ndarray], rows: int, timeout: float | None = None):
        """Runs ``arrays`` as part of a batch and returns this request's slice of the outputs.

        Raises:
            ServingError: UNAVAILABLE when the queue is full, INVALID_ARGUMENT when one request
                is larger than max_batch_size, DEADLINE_EXCEEDED when ``timeout`` (seconds)
                passes first, or whatever the batched run raised.
        """
        task = _Task(arrays, rows)
        if not self._enqueue(task):
            return self._run(arrays)  # version is unloading: finish in-flight work inline
        if not task.done.wait(timeout):
            task.abandoned = True
            raise ServingError("DEADLINE_EXCEEDED", _QUEUE_DEADLINE)
        if task.error is not None:
            raise task.error
        return task.outputs

    def submit_async(self, arrays: dict[str, np.ndarray], rows: int,
                     deadline: float | None = None) -> asyncio.Future:
        """``submit`` for a coroutine on the running event loop: returns a future of the slice.

        Args:
            arrays: input name -> array with ``rows`` rows (dim 0).
            rows: the request's batch size.
            deadline: the running loop's ``loop.time()`` (seconds) by which the future fails
                with DEADLINE_EXCEEDED if its batch has not finished; None waits without limit.

        Returns:
            An ``asyncio.Future`` of output name -> array (this request's rows), or of the
            error ``submit`` would raise. The batch thread never touches a future that is
            already done (past its deadline, or cancelled with the awaiting handler).

        Raises:
            ServingError: at once, as ``submit`` does for a too-large request or a full queue;
                and whatever the run raises when the batcher has stopped (the version is
                unloading: the request then runs inline, as in ``submit``).
        """
        loop = asyncio.get_running_loop()
        task = _Task(arrays, rows, loop.create_future())
        if not self._enqueue(task):
            task.future.set_result(self._run(arrays))  # unloading: inline, as submit does
            return task.future
        if deadline is not None:
            task.timer = loop.call_at(deadline, _expire, task)
        return task.future

    def _enqueue(self, task: _Task) -> bool:
        """Queues ``task``; False when the batcher has stopped (the caller runs it inline)."""
        if task.rows > self._options.max_batch_size:
            raise invalid_argument(f"Task size {task.rows} is larger than maximum input batch "
                                   f"size {self._options.max_batch_size}")
        with self._cond:
            if self._stopped:
                return False
            if self._queued_rows + task.rows > self._capacity:
                raise ServingError("UNAVAILABLE", "The batch scheduling queue to which this task "
                                   "was submitted is full")
            self._queue.append(task)
            self._queued_rows += task.rows
            # Wake a worker only when it has something new to act on: the first task (it
            # starts the batch timeout) or a full batch. A wake-up per task made the worker
            # contend for the GIL with the threads that enqueue, for nothing.
            if len(self._queue) == 1 or self._queued_rows >= self._options.max_batch_size:
                self._cond.notify()
        return True

    def stop(self) -> None:
        """Stops the workers once the queue is drained."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def _take(self) -> list[_Task] | None:
        opts = self._options
        with self._cond:
            while not self._queue:
                if self._stopped:
                    return None
                self._cond.wait()
            deadline = self._queue[0].enqueued + opts.batch_timeout_micros / 1e6
            while self._queued_rows < opts.max_batch_size and not self._stopped:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._queue:
                    break
                self._cond.wait(remaining)
            # A batch holds requests whose inputs agree beyond dim 0 (e.g. exclude_item_ids
            # [B, n] with one n): the others wait, in order, for a batch of their own. Merging
            # them failed the whole batch (TF Serving fails it too, unless it pads), so one
            # client's request broke another's.
            tasks, rows, shapes, skipped = [], 0, None, []
            while self._queue:
                task = self._queue[0]
                if task.abandoned:
                    self._queue.popleft()
                    self._queued_rows -= task.rows
                    continue
                task_shapes = _trailing_shapes(task.arrays)
                shapes = task_shapes if shapes is None else shapes
                if task_shapes != shapes:
                    skipped.append(self._queue.popleft())
                    continue
                if rows + task.rows > opts.max_batch_size:
                    break
                self._queue.popleft()
                self._queued_rows -= task.rows
                rows += task.rows
                tasks.append(task)
            self._queue.extendleft(reversed(skipped))
            if self._queue:  # more than one batch was waiting: the next is another worker's
                self._cond.notify()
            return tasks

    def _work(self) -> None:
        while True:
            tasks = self._take()
            if tasks is None:
                return
            if tasks:
                self._run_batch(tasks)

    def _run_batch(self, tasks: list[_Task]) -> None:
        total = sum(t.rows for t in tasks)
        try:
            if len(tasks) == 1:
                merged = tasks[0].arrays
            else:
                merged = {k: np.concatenate([t.arrays[k] for t in tasks]) for k in tasks[0].arrays}
            outputs = self._run(merged)
            for name, value in outputs.items():
                if np.ndim(value) == 0 or value.shape[0] != total:
                    raise ServingError(
                        "INTERNAL", f"Batched output tensor {name}'s 0th dimension does not equal "
                        f"the sum of the 0th dimension sizes of the input tensors ({total})")
            if self._on_batch is not None:
                self._on_batch(total)
            start = 0
            for task in tasks:
                task.outputs = {k: v[start:start + task.rows] for k, v in outputs.items()}
                start += task.rows
        except ServingError as err:
            for task in tasks:
                task.error = err
        except Exception as err:  # noqa: BLE001 - a worker must never die with waiters
            for task in tasks:
                task.error = ServingError("INTERNAL", f"batched run failed: {err}")
        waiting: dict[asyncio.AbstractEventLoop, list[_Task]] = {}
        for task in tasks:
            if task.future is None:
                task.done.set()
            else:
                waiting.setdefault(task.future.get_loop(), []).append(task)
        for loop, group in waiting.items():  # one wake-up per loop and batch, not per task
            try:
                loop.call_soon_threadsafe(_resolve, group)
            except RuntimeError:  # the loop has closed (server stopped): nobody is waiting
                pass
