"""Closed-loop load benchmark for `fm-keras serve`: QPS and latency percentiles.

The server runs in its own process (`python -m fm_keras.cli serve ...`, as in production); the
load generator is this process: N concurrent closed-loop clients (asyncio; gRPC with the official
stubs over grpc.aio, REST over keep-alive HTTP/1.1), each sending its next request as soon as the
previous answer arrives. Both share the machine's cores, so the figures are end-to-end on one box.
The floor is the in-process SavedModel signature call, sequential.

    python benchmarks/serving_load.py [--seconds 5] [--clients 4] [--batch_clients 32]
    python benchmarks/serving_load.py --model_base_path saved_models/ranking   # a real export
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

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


def grpc_load(port, n_rows, clients, seconds):
    import grpc
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL_NAME
    for k, v in rows(n_rows).items():
        request.inputs[k].CopyFrom(tf.make_tensor_proto(
            v, dtype=tf.dtypes.as_dtype(SIGNATURE.inputs[k].dtype)))

    async def run():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            return await _closed_loop(lambda: stub.Predict(request, timeout=10), clients, seconds)
    return asyncio.run(run())


def rest_load(port, n_rows, clients, seconds):
    data = rows(n_rows)
    body = json.dumps({"instances": [{k: data[k][i] for k in data} for i in range(n_rows)]}).encode()
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
    def __init__(self, base, batching_file=None):
        self.grpc_port, self.rest_port = free_port(), free_port()
        args = [sys.executable, "-m", "fm_keras.cli", "serve", f"--port={self.grpc_port}",
                f"--rest_api_port={self.rest_port}", f"--model_name={MODEL_NAME}",
                f"--model_base_path={base}", "--host=127.0.0.1", "--grpc_max_threads=64"]
        if batching_file:
            args += ["--enable_batching", f"--batching_parameters_file={batching_file}"]
        self.proc = subprocess.Popen(args, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
                                     stderr=subprocess.DEVNULL)
        from fm_keras.serving.client import GrpcClient
        from fm_keras.serving.errors import ServingError

        with GrpcClient(f"127.0.0.1:{self.grpc_port}", timeout=2, retries=0) as client:
            for _ in range(300):
                try:
                    client.status(MODEL_NAME)
                    return
                except ServingError:
                    time.sleep(0.2)
        raise RuntimeError("server did not become ready")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (Linux /proc)."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--batch_clients", type=int, default=32)
    parser.add_argument("--model_base_path", help="serve this export instead of the toy FM "
                        "(e.g. saved_models/ranking); requests are random rows for its inputs")
    parser.add_argument("--model_name", default="ranking")
    args = parser.parse_args()
    global MODEL_NAME, SIGNATURE
    MODEL_NAME = args.model_name

    tmp = tempfile.mkdtemp(prefix="serving-bench-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    if args.model_base_path:
        from fm_keras.serving.manager import list_versions

        base = os.path.abspath(args.model_base_path)
        model_dir = os.path.join(base, str(list_versions(base)[-1]))
    else:
        base = os.path.join(tmp, "ranking")
        model_dir = toy_models.write_ranking_model(base, 1, k=10, buckets=100_000)
    from tensorflow.python.saved_model import loader_impl

    meta = loader_impl.parse_saved_model(model_dir).meta_graphs[0]
    SIGNATURE = meta.signature_def["serving_default"]
    batching = os.path.join(tmp, "batching.txt")
    with open(batching, "w") as f:
        f.write("max_batch_size { value: 128 }\nbatch_timeout_micros { value: 2000 }\n"
                "max_enqueued_batches { value: 64 }\nnum_batch_threads { value: 2 }\n")
    model = model_dir if args.model_base_path else "toy FM k=10 (3 raw features, hashed ids)"
    print(f"cpus={os.cpu_count()} seconds/scenario={args.seconds} model={model} "
          f"inputs={sorted(SIGNATURE.inputs)}", flush=True)
    results = [floor(model_dir, 1, args.seconds), floor(model_dir, 100, args.seconds)]
    print(json.dumps(results[-2]), json.dumps(results[-1]), sep="\n", flush=True)

    def record(name, n_rows, load, port, clients):
        server_cpu, client_cpu = server.cpu_seconds(), time.process_time()
        latencies, errors = load(port, n_rows, clients, args.seconds)
        server_cpu, client_cpu = server.cpu_seconds() - server_cpu, time.process_time() - client_cpu
        result = summary(name, latencies, args.seconds, n_rows)
        result["errors"] = len(errors)
        # CPU per request over warm-up + measured period (requests counted only when measured,
        # so these slightly overstate; they compare server and client cost, not absolutes)
        n = max(len(latencies), 1) * (args.seconds + 1.0) / args.seconds
        result["server_cpu_us"] = round(server_cpu / n * 1e6)
        result["client_cpu_us"] = round(client_cpu / n * 1e6)
        results.append(result)
        print(json.dumps(result), flush=True)

    c, b = args.clients, args.batch_clients
    server = Server(base)
    try:
        for n in (1, c, 2 * c):
            record(f"gRPC 1 row, {n} clients, no batching", 1,
                   grpc_load, server.grpc_port, n)
        record(f"REST 1 row, {c} clients, no batching", 1, rest_load, server.rest_port, c)
        record(f"gRPC 100 rows, {c} clients, no batching", 100,
               grpc_load, server.grpc_port, c)
        record(f"REST 100 rows, {c} clients, no batching", 100,
               rest_load, server.rest_port, c)
        record(f"gRPC 1 row, {b} clients, no batching", 1, grpc_load, server.grpc_port, b)
    finally:
        server.stop()
    server = Server(base, batching)
    try:
        record(f"gRPC 1 row, {c} clients, batching", 1, grpc_load, server.grpc_port, c)
        record(f"gRPC 1 row, {b} clients, batching", 1, grpc_load, server.grpc_port, b)
        record(f"REST 1 row, {b} clients, batching", 1, rest_load, server.rest_port, b)
    finally:
        server.stop()
    by_name = {r["scenario"]: r for r in results}
    ratio = (by_name[f"gRPC 1 row, {b} clients, batching"]["rows_per_s"]
             / by_name[f"gRPC 1 row, {b} clients, no batching"]["rows_per_s"])
    print(f"\nbatching / no batching rows/s with {b} clients (gRPC, 1 row): {ratio:.2f}x")

    print("\n| scenario | QPS | rows/s | p50 ms | p99 ms | errors | server CPU µs/req | "
          "client CPU µs/req |\n|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['scenario']} | {r['qps']:,.0f} | {r['rows_per_s']:,.0f} | {r['p50_ms']:.2f} | "
              f"{r['p99_ms']:.2f} | {r.get('errors', '-')} | {r.get('server_cpu_us', '-')} | "
              f"{r.get('client_cpu_us', '-')} |")


if __name__ == "__main__":
    main()
