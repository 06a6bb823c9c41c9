"""Server-side batching of concurrent requests, with TF Serving's BatchingParameters.

One ``Batcher`` per (model, version, signature). Requests wait in a bounded queue; each of
``num_batch_threads`` workers takes the oldest requests, up to ``max_batch_size`` rows, once
the batch is full or the oldest request has waited ``batch_timeout_micros``; it concatenates
the inputs along dim 0, runs the signature once, and splits the outputs back. When the queue
holds ``max_enqueued_batches`` full batches a new request is answered UNAVAILABLE at once
instead of queueing without bound (TF Serving's "queue ... is full").
"""

from __future__ import annotations

import collections
import threading
import time

import numpy as np

from fm_keras.serving.config import BatchingOptions
from fm_keras.serving.errors import ServingError, invalid_argument


class _Task:
    __slots__ = ("arrays", "rows", "enqueued", "done", "outputs", "error", "abandoned")

    def __init__(self, arrays, rows):
        self.arrays, self.rows = arrays, rows
        self.enqueued = time.monotonic()
        self.done = threading.Event()
        self.outputs = self.error = None
        self.abandoned = False


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
        if rows > self._options.max_batch_size:
            raise invalid_argument(f"Task size {rows} is larger than maximum input batch size "
                                   f"{self._options.max_batch_size}")
        task = _Task(arrays, rows)
        with self._cond:
            if self._stopped:
                return self._run(arrays)  # version is unloading: finish in-flight work inline
            if self._queued_rows + rows > self._capacity:
                raise ServingError("UNAVAILABLE", "The batch scheduling queue to which this task "
                                   "was submitted is full")
            self._queue.append(task)
            self._queued_rows += rows
            self._cond.notify()
        if not task.done.wait(timeout):
            task.abandoned = True
            raise ServingError("DEADLINE_EXCEEDED", "Deadline exceeded while waiting in the batch queue")
        if task.error is not None:
            raise task.error
        return task.outputs

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
            tasks, rows = [], 0
            while self._queue and rows + self._queue[0].rows <= opts.max_batch_size:
                task = self._queue.popleft()
                self._queued_rows -= task.rows
                rows += task.rows
                if not task.abandoned:
                    tasks.append(task)
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
        for task in tasks:
            task.done.set()
