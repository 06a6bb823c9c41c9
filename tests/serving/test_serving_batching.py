"""Batcher: concurrent requests merge into one run, outputs split back, bounded queue."""

import threading
import time

import numpy as np
import pytest

from fm_keras.serving.batching import Batcher
from fm_keras.serving.config import BatchingOptions
from fm_keras.serving.errors import ServingError


class _Model:
    """Doubles x; records batch sizes; can be slowed down or blocked."""

    def __init__(self, delay=0.0):
        self.batches, self.delay = [], delay
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, arrays):
        self.gate.wait()
        time.sleep(self.delay)
        self.batches.append(len(arrays["x"]))
        return {"y": arrays["x"] * 2, "id": arrays["id"]}


def _submit_all(batcher, n, rows=1):
    results, errors = [None] * n, []

    def one(i):
        x = np.full(rows, i, dtype=np.float32)
        try:
            results[i] = batcher.submit({"x": x, "id": np.array([b"r%d" % i] * rows, dtype=object)},
                                        rows, timeout=10)
        except ServingError as err:
            errors.append(err)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


def test_concurrent_requests_are_merged_and_split_back():
    model = _Model()
    batcher = Batcher(model, BatchingOptions(max_batch_size=64, batch_timeout_micros=50_000,
                                             max_enqueued_batches=4, num_batch_threads=1))
    try:
        results, errors = _submit_all(batcher, 32, rows=2)
    finally:
        batcher.stop()
    assert errors == []
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result["y"], [2 * i, 2 * i])
        assert list(result["id"]) == [b"r%d" % i] * 2
    assert sum(model.batches) == 64 and len(model.batches) < 32


def test_full_queue_answers_unavailable_instead_of_queueing():
    model = _Model()
    model.gate.clear()  # the worker blocks inside its first batch
    batcher = Batcher(model, BatchingOptions(max_batch_size=2, batch_timeout_micros=0,
                                             max_enqueued_batches=2, num_batch_threads=1))
    outcomes = []

    def one():
        try:
            batcher.submit({"x": np.zeros(1, np.float32), "id": np.array([b""], dtype=object)}, 1,
                           timeout=30)
            outcomes.append("OK")
        except ServingError as err:
            outcomes.append(err)

    try:
        first = threading.Thread(target=one)
        first.start()
        deadline = time.monotonic() + 10
        while batcher._queued_rows and time.monotonic() < deadline:  # worker took it
            time.sleep(0.01)
        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        # 4 rows fit the queue (2 batches x 2 rows); the other 4 are refused at once
        while len(outcomes) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        refused = list(outcomes)
        model.gate.set()
        for t in [first, *threads]:
            t.join()
    finally:
        batcher.stop()
    assert len(refused) == 4
    assert all(e.code == "UNAVAILABLE" and "queue" in e.message for e in refused)
    assert outcomes.count("OK") == 5


def test_request_larger_than_max_batch_size_is_invalid():
    batcher = Batcher(_Model(), BatchingOptions(max_batch_size=4, num_batch_threads=1))
    try:
        with pytest.raises(ServingError) as info:
            batcher.submit({"x": np.zeros(5, np.float32), "id": np.array([b""] * 5, dtype=object)}, 5)
        assert info.value.code == "INVALID_ARGUMENT"
    finally:
        batcher.stop()


def test_deadline_while_queued():
    model = _Model(delay=0.5)
    batcher = Batcher(model, BatchingOptions(max_batch_size=1, num_batch_threads=1))
    try:
        first = threading.Thread(target=_submit_all, args=(batcher, 1))
        first.start()
        time.sleep(0.1)
        with pytest.raises(ServingError) as info:
            batcher.submit({"x": np.zeros(1, np.float32), "id": np.array([b""], dtype=object)}, 1,
                           timeout=0.05)
        assert info.value.code == "DEADLINE_EXCEEDED"
        first.join()
    finally:
        batcher.stop()
