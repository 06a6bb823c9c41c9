"""The end of `make demo`: serve the ranking and recall exports, query them over gRPC, stop.

Starts ``fm-keras serve`` on free loopback ports with a models.config naming both exports,
waits until both are AVAILABLE, asks the recall model for one user's top items and the
ranking model for the same (user, item) pairs, with the official tensorflow-serving-api stubs,
prints the user's top items with their probabilities, and stops the server.

    python -m fm_keras.serving.demo --base demo/saved_models --users demo/data/test.csv \
        --items demo/data/items.csv
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

import grpc

from fm_keras.loopback import free_ports
import numpy as np
import pandas as pd
from tensorflow_serving.apis import (get_model_status_pb2, model_service_pb2_grpc,
                                     predict_pb2, prediction_service_pb2_grpc)

from fm_keras._tf import tf

AVAILABLE = 30  # ModelVersionStatus.State.AVAILABLE


def models_config(base: str, names: list[str]) -> str:
    entries = "".join(
        f'  config {{ name: "{n}" base_path: "{os.path.abspath(os.path.join(base, n))}" '
        'model_platform: "tensorflow" }\n' for n in names)
    return f"model_config_list {{\n{entries}}}\n"


def wait_available(channel, names: list[str], timeout: float = 180.0) -> None:
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    deadline = time.time() + timeout
    pending = set(names)
    while pending and time.time() < deadline:
        for name in list(pending):
            request = get_model_status_pb2.GetModelStatusRequest()
            request.model_spec.name = name
            try:
                status = stub.GetModelStatus(request, timeout=2)
                if any(v.state == AVAILABLE for v in status.model_version_status):
                    pending.discard(name)
            except grpc.RpcError:
                pass
        time.sleep(0.3)
    if pending:
        raise SystemExit(f"fm-keras demo: models {sorted(pending)} not available after "
                         f"{timeout:.0f}s")


def predict(stub, model: str, inputs: dict[str, np.ndarray], signature: str = "") -> dict:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    response = stub.Predict(request, timeout=10)
    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}


def _column(values: pd.Series, numeric: bool) -> np.ndarray:
    return values.astype(np.float32).to_numpy() if numeric else \
        np.array([str(v).encode() for v in values], dtype=object)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="directory holding the exports")
    parser.add_argument("--ranking", default="ctr")
    parser.add_argument("--recall", default="ctr_recall")
    parser.add_argument("--users", required=True, help="CSV with user/context features")
    parser.add_argument("--items", required=True, help="the item catalog CSV")
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args(argv)

    port = free_ports(1)[0]
    config = tempfile.NamedTemporaryFile("w", suffix=".config", delete=False)
    config.write(models_config(args.base, [args.ranking, args.recall]))
    config.close()
    server = subprocess.Popen([sys.executable, "-m", "fm_keras.cli", "serve", f"--port={port}",
                               "--host=127.0.0.1", f"--model_config_file={config.name}"])
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        wait_available(channel, [args.ranking, args.recall])
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        user = pd.read_csv(args.users, dtype=str, nrows=1)
        ranking_inputs = _signature_inputs(stub, args.ranking)
        recall_inputs = _signature_inputs(stub, args.recall)
        query = {n: _column(user[n], numeric) for n, numeric in recall_inputs.items()}
        recalled = predict(stub, args.recall, query)
        top = recalled["item_ids"][0][:args.top]
        items = pd.read_csv(args.items, dtype=str).set_index("item_id").loc[
            [i.decode() for i in top]].reset_index()
        rows = {n: _column(items[n] if n in items else user[n].repeat(len(items)), numeric)
                for n, numeric in ranking_inputs.items()}
        ranked = predict(stub, args.ranking, rows)
        print(f"\nfm-keras demo: top {args.top} items for user {user['user_id'][0]} "
              f"(recall over gRPC from {args.recall!r}, probability re-scored by {args.ranking!r})")
        print(f"{'rank':>4s}  {'item_id':10s} {'category':9s} {'recall p':>9s} {'ranking p':>10s}")
        for r, item in enumerate(top):
            print(f"{r + 1:4d}  {item.decode():10s} {items['item_category'][r]:9s} "
                  f"{recalled['probabilities'][0][r]:9.4f} {ranked['probability'][r]:10.4f}")
        if not np.allclose(recalled["probabilities"][0][:args.top], ranked["probability"],
                           atol=1e-4):
            raise SystemExit("fm-keras demo: recall and ranking probabilities disagree")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        os.unlink(config.name)
    print("fm-keras demo: server stopped")
    return 0


def _signature_inputs(stub, model: str) -> dict[str, bool]:
    """{input name: is numeric} of the model's serving_default, from GetModelMetadata."""
    from tensorflow_serving.apis import get_model_metadata_pb2

    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = model
    response = stub.GetModelMetadata(request, timeout=10)
    sigs = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(sigs)
    inputs = sigs.signature_def["serving_default"].inputs
    return {name: info.dtype == tf.float32.as_datatype_enum for name, info in inputs.items()}


if __name__ == "__main__":
    sys.exit(main())
