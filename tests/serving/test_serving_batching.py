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


def _one_row(i):
    return {"x": np.full(1, i, dtype=np.float32), "id": np.array([b"r%d" % i], dtype=object)}


def test_awaited_and_blocking_requests_share_one_batch():
    import asyncio

    model = _Model()
    batcher = Batcher(model, BatchingOptions(max_batch_size=8, batch_timeout_micros=10_000_000,
                                             num_batch_threads=1))  # runs when 8 rows are in
    blocking = [None] * 4

    def submit(i):
        blocking[i] = batcher.submit(_one_row(i), 1, timeout=30)

    async def main():
        futures = [batcher.submit_async(_one_row(10 + i), 1) for i in range(4)]
        threads = [threading.Thread(target=submit, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        results = await asyncio.wait_for(asyncio.gather(*futures), 30)
        for t in threads:
            t.join()
        return results

    try:
        awaited = asyncio.run(main())
    finally:
        batcher.stop()
    assert model.batches == [8]
    assert [float(r["y"][0]) for r in awaited] == [20, 22, 24, 26]
    assert [float(r["y"][0]) for r in blocking] == [0, 2, 4, 6]
    assert list(awaited[1]["id"]) == [b"r11"]


def test_awaited_requests_past_their_deadline_or_cancelled_leave_the_worker_serving():
    import asyncio

    model = _Model()
    model.gate.clear()
    batcher = Batcher(model, BatchingOptions(max_batch_size=1, batch_timeout_micros=0,
                                             num_batch_threads=1))
    loop_errors = []

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: loop_errors.append(context))
        running = batcher.submit_async(_one_row(1), 1, loop.time() + 0.05)
        queued = batcher.submit_async(_one_row(2), 1, loop.time() + 0.05)
        cancelled = batcher.submit_async(_one_row(3), 1)
        cancelled.cancel()
        for future in (running, queued):
            with pytest.raises(ServingError) as info:
                await future
            assert info.value.code == "DEADLINE_EXCEEDED"
        model.gate.set()  # the running batch ends after its future failed; 2 is dropped, 3 runs
        after = await asyncio.wait_for(batcher.submit_async(_one_row(4), 1, loop.time() + 30), 30)
        await asyncio.sleep(0.1)  # let the loop resolve what is left
        return after

    try:
        after = asyncio.run(main())
    finally:
        batcher.stop()
    assert float(after["y"][0]) == 8
    assert model.batches == [1, 1, 1]  # 1, 3 (cancelled: its waiter, not its batch) and 4
    assert loop_errors == []  # no callback touched a future that was already done


def test_a_closed_event_loop_does_not_stop_the_worker():
    import asyncio

    model = _Model()
    model.gate.clear()
    batcher = Batcher(model, BatchingOptions(max_batch_size=1, batch_timeout_micros=0,
                                             num_batch_threads=1))

    async def abandon():
        batcher.submit_async(_one_row(1), 1)  # the loop closes before the batch ends

    try:
        asyncio.run(abandon())
        model.gate.set()
        result = batcher.submit(_one_row(2), 1, timeout=30)
    finally:
        batcher.stop()
    assert float(result["y"][0]) == 4


def test_awaited_requests_are_refused_at_once_like_blocking_ones():
    import asyncio

    model = _Model()
    model.gate.clear()
    batcher = Batcher(model, BatchingOptions(max_batch_size=2, batch_timeout_micros=0,
                                             max_enqueued_batches=1, num_batch_threads=1))

    async def main():
        first = batcher.submit_async(_one_row(0), 1)
        while batcher._queued_rows:  # the worker took it and blocks inside the run
            await asyncio.sleep(0.01)
        queued = [batcher.submit_async(_one_row(i), 1) for i in (1, 2)]  # 2 rows fit
        refusals = []
        for rows in (1, 3):
            arrays = {k: np.repeat(v, rows) for k, v in _one_row(9).items()}
            with pytest.raises(ServingError) as info:
                batcher.submit_async(arrays, rows)
            refusals.append(info.value)
        model.gate.set()
        await asyncio.wait_for(asyncio.gather(first, *queued), 30)
        return refusals

    try:
        full, large = asyncio.run(main())
    finally:
        batcher.stop()
    assert full.code == "UNAVAILABLE"
    assert "queue to which this task was submitted is full" in full.message
    assert large.code == "INVALID_ARGUMENT"
    assert "Task size 3 is larger than maximum" in large.message


def test_requests_of_different_trailing_shapes_go_in_separate_batches():
    """exclude_item_ids [1, 2] and [1, 3] (valid requests, padded per request) in one batch
    failed both with INTERNAL: NumPy could not concatenate them."""
    model = _Model()
    model.gate.clear()  # the worker blocks in the first batch while the others queue
    batcher = Batcher(lambda arrays: {**model(arrays), "n": np.full(len(arrays["x"]),
                                                                     arrays["seen"].shape[1])},
                      BatchingOptions(max_batch_size=8, batch_timeout_micros=0,
                                      max_enqueued_batches=4, num_batch_threads=1))
    results = {}

    def one(key, n):
        results[key] = batcher.submit({"x": np.zeros(1, np.float32),
                                       "id": np.array([key.encode()], dtype=object),
                                       "seen": np.full((1, n), b"", dtype=object)}, 1, timeout=30)

    try:
        first = threading.Thread(target=one, args=("first", 1))
        first.start()
        deadline = time.monotonic() + 30
        while batcher._queued_rows and time.monotonic() < deadline:  # the worker took it
            time.sleep(0.01)
        threads = [threading.Thread(target=one, args=(f"r{i}", n))
                   for i, n in enumerate([2, 3, 2, 3])]
        for t in threads:
            t.start()
        while batcher._queued_rows < 4 and time.monotonic() < deadline:  # all four queued
            time.sleep(0.01)
        model.gate.set()
        for t in [first, *threads]:
            t.join(30)
    finally:
        batcher.stop()
    assert sorted(results) == ["first", "r0", "r1", "r2", "r3"]
    assert [int(results[f"r{i}"]["n"][0]) for i in range(4)] == [2, 3, 2, 3]
    assert model.batches[1:] == [2, 2]  # r0 + r2, then r1 + r3
