"""Config reloads and server memory: does RSS plateau? (issue 14, item 5)

`fm-keras serve` runs in its own process with a models.config of a ranking model and its
recall model, each with versions 1 and 2 on disk. Each cycle sends a ModelService
HandleReloadConfigRequest that toggles both models between `specific { versions: 1 }` and
`specific { versions: 2 }` (a load with warmup, then an unload), then a few Predicts per model;
the server's VmRSS is read from /proc after every cycle. Must-show: RSS after cycle 50 within 5%
of RSS after cycle 10. With `--baseline_repo` the server of another checkout runs the same
cycles afterwards (same models, same process).

    python benchmarks/serving_reload_rss.py                 # toy FM + brute-force recall
    python benchmarks/serving_reload_rss.py --ranking saved_models/ctr/1 \\
        --recall saved_models/ctr_recall/1                  # real exports (ScaNN recall)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def _config(models: dict[str, str], version: int) -> str:
    return "model_config_list {\n" + "".join(
        f'  config {{ name: "{name}" base_path: "{base}" model_platform: "tensorflow" '
        f"model_version_policy {{ specific {{ versions: {version} }} }} }}\n"
        for name, base in models.items()) + "}\n"


def _warmup_request(version_dir: str, name: str):
    """The export's first warmup PredictRequest (valid inputs for any model)."""
    from tensorflow_serving.apis import prediction_log_pb2

    from fm_keras._tf import tf

    path = os.path.join(version_dir, "assets.extra", "tf_serving_warmup_requests")
    record = next(iter(tf.data.TFRecordDataset(path)))
    request = prediction_log_pb2.PredictionLog.FromString(record.numpy()).predict_log.request
    request.model_spec.name = name
    return request


def run(models: dict[str, str], repo: str, cycles: int, tmp: str) -> list[float]:
    import grpc
    from google.protobuf import text_format
    from tensorflow_serving.apis import (model_management_pb2, model_service_pb2_grpc,
                                         prediction_service_pb2_grpc)
    from tensorflow_serving.config import model_server_config_pb2

    from fm_keras.loopback import free_ports

    port, rest = free_ports(2)
    config_path = os.path.join(tmp, "models.config")
    with open(config_path, "w") as f:
        f.write(_config(models, 1))
    proc = subprocess.Popen(
        [sys.executable, "-m", "fm_keras.cli", "serve", f"--port={port}",
         f"--rest_api_port={rest}", f"--model_config_file={config_path}", "--host=127.0.0.1",
         "--file_system_poll_wait_seconds=0", "--max_num_load_retries=0"],
        cwd=repo, env={**os.environ, "PYTHONPATH": repo}, stderr=subprocess.DEVNULL)
    requests = {name: _warmup_request(os.path.join(base, "1"), name)
                for name, base in models.items()}
    rss = []
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=600)
        admin = model_service_pb2_grpc.ModelServiceStub(channel)
        predict = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for cycle in range(1, cycles + 1):
            config = model_server_config_pb2.ModelServerConfig()
            text_format.Parse(_config(models, 2 if cycle % 2 else 1), config)
            admin.HandleReloadConfigRequest(
                model_management_pb2.ReloadConfigRequest(config=config), timeout=600)
            for request in requests.values():
                for _ in range(5):
                    predict.Predict(request, timeout=60)
            rss.append(round(_rss_mb(proc.pid), 1))
            print(f"cycle {cycle}: {rss[-1]} MB", file=sys.stderr, flush=True)
        channel.close()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return rss


def _two_versions(source: str, base: str) -> str:
    for version in (1, 2):
        shutil.copytree(source, os.path.join(base, str(version)))
    return base


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--ranking", help="a ranking version directory (default: toy FM)")
    parser.add_argument("--recall", help="a recall version directory (default: toy brute force)")
    parser.add_argument("--baseline_repo", help="also run the server of this checkout")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="reload-rss-")
    try:
        from fm_keras.serving import toy_models

        ranking = args.ranking or toy_models.write_ranking_model(os.path.join(tmp, "toy_r"), 1)
        recall = args.recall or toy_models.write_recall_model(os.path.join(tmp, "toy_c"), 1)
        models = {"ranking": _two_versions(ranking, os.path.join(tmp, "ranking")),
                  "ranking_recall": _two_versions(recall, os.path.join(tmp, "ranking_recall"))}
        print(f"cpus={os.cpu_count()} loadavg={os.getloadavg()} ranking={ranking} "
              f"recall={recall}", flush=True)
        repos = [("this checkout", REPO)]
        if args.baseline_repo:
            repos.append((f"baseline {args.baseline_repo}", os.path.abspath(args.baseline_repo)))
        for tag, repo in repos:
            started = time.time()
            rss = run(models, repo, args.cycles, tmp)
            at10, last = rss[min(9, len(rss) - 1)], rss[-1]
            print(json.dumps({"server": tag, "cycles": len(rss), "rss_mb_cycle_1": rss[0],
                              "rss_mb_cycle_10": at10, f"rss_mb_cycle_{len(rss)}": last,
                              "growth_after_10_pct": round(100 * (last - at10) / at10, 2),
                              "max_mb": max(rss), "seconds": round(time.time() - started),
                              "rss_mb_every_5": rss[4::5]}), flush=True)
        print(f"loadavg after={os.getloadavg()}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
