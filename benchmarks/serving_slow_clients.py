"""REST under slow clients: does a normal client notice 200 idle partial requests? (issue 14)

The server (`fm-keras serve`, its own process, REST on, toy FM model) gets one normal client:
sequential 1-row predicts on one keep-alive connection, latency measured per request. Phase 1
alone; phase 2 while 200 more connections each hold a partial request (headers promising a
100-byte body, 10 bytes sent). Then the partial connections are watched until the server
closes them (`--rest_api_timeout_in_ms`, short here) and the server's thread count is read
from /proc. With `--baseline_repo` the same runs on the server of another checkout (e.g. the
main branch) in the same process: peers compared under the same machine load.

    python benchmarks/serving_slow_clients.py [--requests 500] [--timeout_ms 5000]
    python benchmarks/serving_slow_clients.py --baseline_repo /work/main
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import selectors
import socket
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serving_load  # noqa: E402  (the server process helper and the toy model)

ROW = {"user_id": "u1", "item_id": "item_1", "price": 1.0}


def _latencies(port: int, n: int) -> list[float]:
    body = json.dumps({"instances": [ROW]}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    result = []
    for _ in range(n):
        start = time.perf_counter()
        conn.request("POST", "/v1/models/ranking:predict", body=body,
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}")
        result.append(time.perf_counter() - start)
    conn.close()
    return result


def _partial(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(b"POST /v1/models/ranking:predict HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"instances")
    return sock


def _wait_closed(socks, limit_s: float, since: float) -> tuple[int, float]:
    """(connections the server closed, seconds from ``since`` to the last close) in limit_s."""
    selector = selectors.DefaultSelector()
    for sock in socks:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    start, closed, last = time.monotonic(), 0, 0.0
    while closed < len(socks) and time.monotonic() - start < limit_s:
        for key, _ in selector.select(timeout=0.5):
            try:
                data = key.fileobj.recv(4096)
            except (ConnectionResetError, BlockingIOError):
                data = b""
            if not data:
                selector.unregister(key.fileobj)
                closed += 1
                last = time.monotonic() - since
    selector.close()
    return closed, last


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _pct(latencies, q) -> float:
    return round(float(np.percentile(np.asarray(latencies) * 1e3, q)), 3)


def run(base: str, tmp: str, repo: str, tag: str, args) -> dict:
    flags = [f"--rest_api_timeout_in_ms={args.timeout_ms}"]
    server = serving_load.Server(base, tmp, extra_flags=flags, repo=repo)
    try:
        _latencies(server.rest_port, 50)  # warm-up
        alone = _latencies(server.rest_port, args.requests)
        threads_before = _threads(server.proc.pid)
        opened = time.monotonic()
        socks = [_partial(server.rest_port) for _ in range(args.partial)]
        during = _latencies(server.rest_port, args.requests)
        threads_during = _threads(server.proc.pid)
        closed, last = _wait_closed(socks, args.timeout_ms / 1000 * 2 + 10, opened)
        for sock in socks:
            sock.close()
        after = _latencies(server.rest_port, 50)
    finally:
        server.stop()
    return {"server": tag, "timeout_ms": args.timeout_ms, "requests": args.requests,
            "alone_p50_ms": _pct(alone, 50), "alone_p99_ms": _pct(alone, 99),
            f"with_{args.partial}_partial_p50_ms": _pct(during, 50),
            f"with_{args.partial}_partial_p99_ms": _pct(during, 99),
            "p99_ratio": round(_pct(during, 99) / _pct(alone, 99), 2),
            "partial_closed": f"{closed}/{args.partial}",
            "last_closed_after_s": round(last, 2) if closed else None,
            "server_threads_before": threads_before,
            "server_threads_with_partial": threads_during, "after_ok": len(after) == 50}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--partial", type=int, default=200)
    parser.add_argument("--timeout_ms", type=int, default=5000)
    parser.add_argument("--baseline_repo", help="also run the server of this checkout")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="slow-clients-")
    base = os.path.join(tmp, "ranking")
    serving_load.toy_models.write_ranking_model(base, 1, k=10, buckets=100_000)
    print(f"cpus={os.cpu_count()} loadavg={os.getloadavg()}", flush=True)
    results = [run(base, tmp, serving_load.REPO, "this checkout", args)]
    print(json.dumps(results[-1]), flush=True)
    if args.baseline_repo:
        results.append(run(base, tmp, os.path.abspath(args.baseline_repo),
                           f"baseline {args.baseline_repo}", args))
        print(json.dumps(results[-1]), flush=True)
    print(f"loadavg after={os.getloadavg()}")


if __name__ == "__main__":
    main()
