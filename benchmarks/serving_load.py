"""Closed-loop load benchmark for `fm-keras serve`: QPS and latency percentiles.

The server runs in its own process (`python -m fm_keras.cli serve ...`, as in production). The
load generator sends N concurrent closed-loop streams, each sending its next request as soon as
the previous answer arrives. Two generators:
- `h2load` (nghttp2's C load generator; Debian package nghttp2-client), the default when it is on
  PATH: gRPC as HTTP/2 POSTs of the serialized PredictRequest (N streams on one connection), REST
  as HTTP/1.1 keep-alive (N connections). It costs ~10x less CPU per request than a Python client,
  so on a 2-core box the server is measured rather than the client. gRPC answers errors with HTTP
  200 + a grpc-status trailer, so failures are counted from the server's Prometheus
  request_count by status.
- `python`: the official stubs over grpc.aio, REST over asyncio keep-alive HTTP/1.1.
The floor is the in-process SavedModel signature call, sequential; the ceiling of the Python gRPC
stack is a server whose Predict returns a constant response (no parsing, no model).

    python benchmarks/serving_load.py [--seconds 5] [--clients 4] [--batch_clients 32]
    python benchmarks/serving_load.py --model_base_path saved_models/ranking   # a real export
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from fm_keras._tf import tf  # noqa: E402
from fm_keras.serving import toy_models  # noqa: E402


MODEL_NAME = "ranking"
SIGNATURE = None  # the served serving_default SignatureDef, set in main()


def rows(n: int, seed: int = 0) -> dict:
    """n random rows for the served model's serving_default inputs (by dtype and shape)."""
    rng = np.random.default_rng(seed)
    data = {}
    for name, info in SIGNATURE.inputs.items():
        dtype = tf.dtypes.as_dtype(info.dtype)
        inner = [max(d.size, 1) for d in info.tensor_shape.dim[1:]]
        shape = [n, *inner]
        if dtype == tf.string:
            values = np.array([f"{name}_{i}" for i in rng.integers(0, 1_000, int(np.prod(shape)))])
            data[name] = values.reshape(shape).tolist()
        elif dtype.is_floating:
            data[name] = rng.uniform(0, 10, shape).astype(dtype.as_numpy_dtype).tolist()
        else:
            data[name] = rng.integers(0, 100, shape).astype(dtype.as_numpy_dtype).tolist()
    return data


def summary(name, latencies, seconds, rows_per_request):
    lat = np.asarray(latencies) * 1e3
    qps = len(lat) / seconds
    return {"scenario": name, "requests": len(lat), "qps": round(qps, 1),
            "rows_per_s": round(qps * rows_per_request, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 3),
            "p99_ms": round(float(np.percentile(lat, 99)), 3)}


def floor(model_dir, n_rows, seconds):
    fn = tf.saved_model.load(model_dir).signatures["serving_default"]
    inputs = {k: tf.constant(v, dtype=fn.structured_input_signature[1][k].dtype)
              for k, v in rows(n_rows).items()}
    fn(**inputs)
    latencies, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        fn(**inputs)
        latencies.append(time.perf_counter() - start)
    return summary(f"in-process signature call, {n_rows} row(s), 1 caller", latencies, seconds, n_rows)


async def _closed_loop(send, clients, seconds, warmup=1.0):
    latencies, errors = [], []
    t_start = time.perf_counter()
    measure_from, end = t_start + warmup, t_start + warmup + seconds

    async def client():
        while True:
            start = time.perf_counter()
            if start >= end:
                return
            try:
                await send()
            except Exception as err:  # noqa: BLE001 - counted, reported
                errors.append(repr(err)[:200])
                continue
            if start >= measure_from:
                latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies, errors


def predict_request(n_rows):
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL_NAME
    for k, v in rows(n_rows).items():
        request.inputs[k].CopyFrom(tf.make_tensor_proto(
            v, dtype=tf.dtypes.as_dtype(SIGNATURE.inputs[k].dtype)))
    return request


def rest_body(n_rows) -> bytes:
    data = rows(n_rows)
    return json.dumps({"instances": [{k: data[k][i] for k in data} for i in range(n_rows)]}).encode()


def h2load(url, body: bytes, clients, seconds, grpc_call: bool):
    """Runs h2load; returns (latencies in s, errors as h2load counts them)."""
    tmp = tempfile.mkdtemp(prefix="h2load-")
    try:
        body_path, log_path = os.path.join(tmp, "body"), os.path.join(tmp, "log.tsv")
        with open(body_path, "wb") as f:
            # gRPC framing: 1 byte compressed flag + 4 bytes big-endian length + the message
            f.write(b"\x00" + struct.pack(">I", len(body)) + body if grpc_call else body)
        args = ["h2load", "-D", str(max(1, round(seconds))), "--warm-up-time=1", "-d", body_path,
                f"--log-file={log_path}"]
        if grpc_call:
            args += ["-c", "1", "-m", str(clients), "-H", "content-type: application/grpc",
                     "-H", "te: trailers"]
        else:
            args += ["--h1", "-c", str(clients), "-m", "1", "-H", "content-type: application/json"]
        out = subprocess.run(args + [url], capture_output=True, text=True, check=True).stdout
        failed = sum(int(x) for x in re.findall(r"(\d+) (?:failed|errored|timeout)", out))
        latencies = [int(line.split("\t")[2]) / 1e6 for line in open(log_path) if line.strip()]
        return latencies, ["h2load"] * failed
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def grpc_h2load(port, n_rows, clients, seconds):
    url = f"http://127.0.0.1:{port}/tensorflow.serving.PredictionService/Predict"
    return h2load(url, predict_request(n_rows).SerializeToString(), clients, seconds, True)


def rest_h2load(port, n_rows, clients, seconds):
    url = f"http://127.0.0.1:{port}/v1/models/{MODEL_NAME}:predict"
    return h2load(url, rest_body(n_rows), clients, seconds, False)


def grpc_load(port, n_rows, clients, seconds):
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    request = predict_request(n_rows)

    async def run():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            return await _closed_loop(lambda: stub.Predict(request, timeout=10), clients, seconds)
    return asyncio.run(run())


def rest_load(port, n_rows, clients, seconds):
    body = rest_body(n_rows)
    head = (f"POST /v1/models/{MODEL_NAME}:predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()

    async def run():
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(clients)]
        free = asyncio.Queue()
        for conn in conns:
            free.put_nowait(conn)

        async def send():
            reader, writer = await free.get()
            try:
                writer.write(head + body)
                status = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                if b" 200 " not in status:
                    raise RuntimeError(status.decode().strip())
            finally:
                free.put_nowait((reader, writer))

        try:
            return await _closed_loop(send, clients, seconds)
        finally:
            for _, writer in conns:
                writer.close()
    return asyncio.run(run())


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`fm-keras serve` in a process of its own, with Prometheus metrics on."""

    def __init__(self, base, tmp, batching_file=None, extra_flags=(), repo=REPO):
        self.grpc_port, self.rest_port = free_port(), free_port()
        self.repo = repo
        monitoring = os.path.join(tmp, "monitoring.config")
        with open(monitoring, "w") as f:
            f.write('prometheus_config { enable: true, path: "/monitoring/prometheus/metrics" }\n')
        args = [sys.executable, "-m", "fm_keras.cli", "serve", f"--port={self.grpc_port}",
                f"--rest_api_port={self.rest_port}", f"--model_name={MODEL_NAME}",
                f"--model_base_path={base}", "--host=127.0.0.1", "--grpc_max_threads=64",
                f"--monitoring_config_file={monitoring}", *extra_flags]
        if batching_file:
            args += ["--enable_batching", f"--batching_parameters_file={batching_file}"]
        self._start(args)

    def _start(self, args):
        repo = getattr(self, "repo", REPO)
        self.proc = subprocess.Popen(args, cwd=repo, env={**os.environ, "PYTHONPATH": repo},
                                     stderr=subprocess.DEVNULL)
        from fm_keras.serving.client import GrpcClient
        from fm_keras.serving.errors import ServingError

        deadline = time.monotonic() + 600  # TensorFlow's import alone takes a minute under load
        with GrpcClient(f"127.0.0.1:{self.grpc_port}", timeout=2, retries=0) as client:
            while time.monotonic() < deadline:
                try:
                    client.status(MODEL_NAME)
                    return
                except ServingError as err:
                    if err.code == "UNIMPLEMENTED":  # the constant server has no ModelService
                        return
                    time.sleep(0.2)
        raise RuntimeError("server did not become ready")

    def failed_requests(self) -> int:
        """Requests the server answered with a status other than OK (Prometheus request_count)."""
        url = f"http://127.0.0.1:{self.rest_port}/monitoring/prometheus/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return sum(int(float(value)) for status, value in re.findall(
            r':tensorflow:serving:request_count\{[^}]*status="([^"]+)"[^}]*\} (\S+)', text)
            if status != "OK")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (Linux /proc)."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


class ConstantServer(Server):
    """A Python gRPC server (same grpcio, same thread pool) whose Predict returns a constant
    response without parsing the request: the most any Python gRPC server can do here."""

    def __init__(self, threads=64):
        self.grpc_port, self.rest_port = free_port(), None
        self._start([sys.executable, os.path.abspath(__file__), "--_constant_server",
                     str(self.grpc_port), str(threads)])

    def failed_requests(self) -> int:
        return 0  # h2load cannot see grpc-status; this server has no error path


def constant_server(port: int, threads: int) -> None:
    from concurrent import futures

    import grpc
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    response = predict_pb2.PredictResponse()
    response.outputs["probability"].CopyFrom(tf.make_tensor_proto(np.zeros(1, np.float32)))

    class Constant(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):
            return response

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Constant(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--_constant_server":
        return constant_server(int(sys.argv[2]), int(sys.argv[3]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--batch_clients", type=int, default=32)
    parser.add_argument("--model_base_path", help="serve this export instead of the toy FM "
                        "(e.g. saved_models/ranking); requests are random rows for its inputs")
    parser.add_argument("--model_name", default="ranking")
    parser.add_argument("--load_generator", choices=["h2load", "python"],
                        default="h2load" if shutil.which("h2load") else "python")
    parser.add_argument("--server_flag", action="append", default=[],
                        help="extra `fm-keras serve` flag, e.g. --server_flag=--tensorflow_session_parallelism=1")
    parser.add_argument("--rest_only", action="store_true",
                        help="only the REST scenarios (no floor, ceiling or gRPC)")
    parser.add_argument("--baseline_repo", help="also run the REST scenarios on the server of "
                        "this checkout (e.g. the main branch), in the same run: peer comparison")
    args = parser.parse_args()
    global MODEL_NAME, SIGNATURE
    MODEL_NAME = args.model_name
    grpc_send, rest_send = ((grpc_h2load, rest_h2load) if args.load_generator == "h2load"
                            else (grpc_load, rest_load))

    tmp = tempfile.mkdtemp(prefix="serving-bench-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    if args.model_base_path:
        from fm_keras.versions import version_dirs

        base = os.path.abspath(args.model_base_path)
        model_dir = os.path.join(base, str(version_dirs(base)[-1]))
    else:
        base = os.path.join(tmp, "ranking")
        model_dir = toy_models.write_ranking_model(base, 1, k=10, buckets=100_000)
    from tensorflow.python.saved_model import loader_impl

    meta = loader_impl.parse_saved_model(model_dir).meta_graphs[0]
    SIGNATURE = meta.signature_def["serving_default"]
    batching = os.path.join(tmp, "batching.txt")
    with open(batching, "w") as f:
        # one batch thread: in a Python server a second one only contends for the GIL (measured:
        # 1 thread + 5 ms gave ~1.4x the rows/s of 2 threads + 2 ms with 32 clients)
        f.write("max_batch_size { value: 128 }\nbatch_timeout_micros { value: 5000 }\n"
                "max_enqueued_batches { value: 64 }\nnum_batch_threads { value: 1 }\n")
    model = model_dir if args.model_base_path else "toy FM k=10 (3 raw features, hashed ids)"
    print(f"cpus={os.cpu_count()} seconds/scenario={args.seconds} model={model} "
          f"load_generator={args.load_generator} server_flags={args.server_flag} "
          f"inputs={sorted(SIGNATURE.inputs)}", flush=True)
    results = []
    if not args.rest_only:
        results += [floor(model_dir, 1, args.seconds), floor(model_dir, 100, args.seconds)]
        print(json.dumps(results[-2]), json.dumps(results[-1]), sep="\n", flush=True)

    def record(name, n_rows, load, port, clients):
        server_cpu, client_cpu = server.cpu_seconds(), _client_cpu()
        failed = server.failed_requests()
        latencies, errors = load(port, n_rows, clients, args.seconds)
        server_cpu, client_cpu = server.cpu_seconds() - server_cpu, _client_cpu() - client_cpu
        result = summary(name, latencies, args.seconds, n_rows)
        result["errors"] = len(errors) + server.failed_requests() - failed
        # CPU per request over warm-up + measured period (requests counted only when measured,
        # so these slightly overstate; they compare server and client cost, not absolutes)
        n = max(len(latencies), 1) * (args.seconds + 1.0) / args.seconds
        result["server_cpu_us"] = round(server_cpu / n * 1e6)
        result["client_cpu_us"] = round(client_cpu / n * 1e6)
        results.append(result)
        print(json.dumps(result), flush=True)

    c, b = args.clients, args.batch_clients
    if args.rest_only:
        repos = [("", REPO)] + ([("baseline ", os.path.abspath(args.baseline_repo))]
                                if args.baseline_repo else [])
        for _ in range(2):  # twice, alternating, so a change of machine load hits both
            for tag, repo in repos:
                server = Server(base, tmp, extra_flags=args.server_flag, repo=repo)
                try:
                    record(f"{tag}REST 1 row, {c} clients, no batching", 1, rest_send,
                           server.rest_port, c)
                    record(f"{tag}REST 100 rows, {c} clients, no batching", 100, rest_send,
                           server.rest_port, c)
                finally:
                    server.stop()
                server = Server(base, tmp, batching, extra_flags=args.server_flag, repo=repo)
                try:
                    record(f"{tag}REST 1 row, {b} clients, batching", 1, rest_send,
                           server.rest_port, b)
                finally:
                    server.stop()
        return _print_table(results)
    server = ConstantServer()
    try:
        record(f"ceiling: constant-response Python gRPC server, 1 row, {b} clients", 1,
               grpc_send, server.grpc_port, b)
    finally:
        server.stop()
    server = Server(base, tmp, extra_flags=args.server_flag)
    try:
        for n in (1, c, 2 * c):
            record(f"gRPC 1 row, {n} clients, no batching", 1, grpc_send, server.grpc_port, n)
        record(f"REST 1 row, {c} clients, no batching", 1, rest_send, server.rest_port, c)
        record(f"gRPC 100 rows, {c} clients, no batching", 100, grpc_send, server.grpc_port, c)
        record(f"REST 100 rows, {c} clients, no batching", 100, rest_send, server.rest_port, c)
        record(f"gRPC 1 row, {b} clients, no batching", 1, grpc_send, server.grpc_port, b)
    finally:
        server.stop()
    server = Server(base, tmp, batching, extra_flags=args.server_flag)
    try:
        record(f"gRPC 1 row, {c} clients, batching", 1, grpc_send, server.grpc_port, c)
        record(f"gRPC 1 row, {b} clients, batching", 1, grpc_send, server.grpc_port, b)
        record(f"REST 1 row, {b} clients, batching", 1, rest_send, server.rest_port, b)
    finally:
        server.stop()
    by_name = {r["scenario"]: r for r in results}
    ratio = (by_name[f"gRPC 1 row, {b} clients, batching"]["rows_per_s"]
             / by_name[f"gRPC 1 row, {b} clients, no batching"]["rows_per_s"])
    print(f"\nbatching / no batching rows/s with {b} clients (gRPC, 1 row): {ratio:.2f}x")
    _print_table(results)


def _print_table(results):
    print("\n| scenario | QPS | rows/s | p50 ms | p99 ms | errors | server CPU µs/req | "
          "client CPU µs/req |\n|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['scenario']} | {r['qps']:,.0f} | {r['rows_per_s']:,.0f} | {r['p50_ms']:.2f} | "
              f"{r['p99_ms']:.2f} | {r.get('errors', '-')} | {r.get('server_cpu_us', '-')} | "
              f"{r.get('client_cpu_us', '-')} |")


def _client_cpu() -> float:
    """CPU seconds of this process and its finished children (h2load)."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


if __name__ == "__main__":
    main()
