"""Scale-out figures: training rows/s on loopback clusters, Beam vs tf.data scoring, memory.

In one run, on the same synthetic rows converted once (`fm-keras convert`: encoded shards):

1. training: one machine (`strategy: none`, out of core from the same shards), MultiWorkerMirrored with 1 and with 2 workers
   (same input pipeline, so 1 vs 2 is the scaling figure), and ParameterServer with 2 workers
   and 2 parameter servers; rows/s over the fit (validation each epoch included) and test AUC;
2. scoring the test rows with `fm-keras score` (tf.data) and with Beam RunInference on
   DirectRunner (needs fm-keras[beam]);
3. memory per million embedding rows: variable bytes and the measured RSS growth of a fresh
   process that builds an FM with 1M and 2M hashed ids and takes one Adagrad step.

Every cluster task is a process on this machine: with 2 cores, 2 workers cannot run faster
than 1; the figures say what the coordination costs, not what a real cluster gains.

    python benchmarks/distributed.py [--rows 200000] [--epochs 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import yaml

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

from fm_keras.loopback import LoopbackCluster, cluster_spec  # noqa: E402

TIMEOUT = 1800


def experiment(root: str, distribute: dict, epochs: int, name: str) -> str:
    synth = os.path.join(root, "synth")
    raw = {
        "data": {"train": os.path.join(root, "shards", "shards.json"),
                 "valid": os.path.join(synth, "valid.csv"), "test": os.path.join(synth, "test.csv"),
                 "label": "click",
                 "filters": [{"name": "cached_exposures", "column": "is_cached", "op": "==",
                              "value": 1}]},
        "features": os.path.join(synth, "features.yaml"),
        "model": {"task": "binary", "embedding_dim": 10, "l2_embeddings": 3.0e-4,
                  "l2_linear": 3.0e-5},
        "training": {"optimizer": "adagrad", "learning_rate": 0.3, "batch_size": 1024,
                     "epochs": epochs, "pos_weight": 4.0, "seed": 42,
                     "early_stopping_patience": 2, "distribute": distribute},
    }
    path = os.path.join(root, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    return path


def run_record(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "run.json")) as f:
        record = json.load(f)
    return {"rows_per_s": record["train_samples_per_second"],
            "fit_s": record["seconds"]["fit"], "epochs": record["epochs_run"],
            "test_auc": round(record["metrics"]["test"]["auc"], 4)}


def train_cluster(root: str, name: str, cluster: dict, distribute: dict, epochs: int) -> dict:
    config = experiment(root, distribute, epochs, name)
    run_dir = os.path.join(root, f"run-{name}")
    args = ["train", "--config", config, "--out", run_dir, "--quiet"]
    with LoopbackCluster(cluster, os.path.join(root, f"logs-{name}")) as loop:
        if "chief" in cluster:  # parameter servers: workers and ps serve, the chief trains
            servers = loop.start_servers()
            time.sleep(2)
            before = [t.rss_bytes() for t in servers if t.type == "ps"]
            loop.wait([loop.start("chief", 0, args)], TIMEOUT)
            after = [t.rss_bytes() for t in servers if t.type == "ps"]
            result = run_record(run_dir)
            result["ps_rss_growth_mib"] = [round((a - b) / 2**20) for a, b in zip(after, before)]
            return result
        workers = [loop.start("worker", i, args) for i in range(len(cluster["worker"]))]
        loop.wait(workers, TIMEOUT)
    return run_record(run_dir)


def scoring(root: str) -> dict:
    from fm_keras.export import export_run
    from fm_keras.scoring import run_signature

    model = export_run(os.path.join(root, "run-single"), "ctr", base=os.path.join(root, "models"))
    rows = os.path.join(root, "synth", "test.csv")
    local = run_signature(model, [rows], os.path.join(root, "scores.csv"), progress=False)
    out = {"rows": local["rows"], "tf_data_rows_per_s": local["rows_per_second"]}
    try:
        from fm_keras.beam_scoring import score_with_beam

        beam = score_with_beam(model, [rows], os.path.join(root, "beam.csv"),
                               runner="DirectRunner")
        out["beam_direct_rows_per_s"] = beam["rows_per_second"]
    except ImportError as err:
        out["beam_direct_rows_per_s"] = f"not measured: {err}"
    return out


_PROBE = """
import os, sys, json
os.environ["TF_USE_LEGACY_KERAS"] = "1"; os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
from fm_keras._tf import tf
from fm_keras.config import FeatureConfig, ModelConfig, TrainingConfig
from fm_keras.features import FittedFeature
from fm_keras.model import build_model, make_optimizer
build_model([FittedFeature(FeatureConfig("x", "categorical", "user", hash_buckets=10))],
            ModelConfig())  # TensorFlow warmed up
base = rss()
ids = int(sys.argv[1])
model = build_model([FittedFeature(FeatureConfig("u", "categorical", "user", hash_buckets=ids))],
                    ModelConfig())
built = rss()
model.compile(make_optimizer(TrainingConfig(optimizer="adagrad")))
model.train_on_batch({"ids": tf.zeros([1024, 1], tf.int32), "values": tf.ones([1024, 1])},
                     tf.zeros([1024]), tf.ones([1024]))
print(json.dumps({"model": built - base, "trained": rss() - base}))
"""


def memory() -> dict:
    out = {"variable_mib_per_million_rows": round(1e6 * 11 * 4 / 2**20, 1),
           "with_adagrad_mib_per_million_rows": round(2e6 * 11 * 4 / 2**20, 1)}
    for ids in (1_000_000, 2_000_000):
        probe = subprocess.run([sys.executable, "-c", _PROBE, str(ids)], capture_output=True,
                               text=True, check=True, timeout=600)
        got = json.loads(probe.stdout.strip().splitlines()[-1])
        out[f"rss_growth_mib_{ids // 1_000_000}M"] = {k: round(v / 2**20)
                                                      for k, v in got.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--keep", help="work directory to keep (default: a temp directory)")
    args = parser.parse_args()
    root = args.keep or tempfile.mkdtemp(prefix="fm-distributed-")
    from fm_keras.cli import main as cli
    from fm_keras.synth import generate

    generate(os.path.join(root, "synth"), rows=args.rows, seed=7)
    single = experiment(root, {"strategy": "none"}, args.epochs, "single")
    cli(["convert", "--config", single, "--input", os.path.join(root, "synth", "train.csv"),
         "--out", os.path.join(root, "shards"), "--shards", str(args.shards)])
    subprocess.run([sys.executable, "-m", "fm_keras.cli", "train", "--config", single,
                    "--out", os.path.join(root, "run-single"), "--quiet"], check=True,
                   stdout=subprocess.DEVNULL, timeout=TIMEOUT)
    results = {"rows": args.rows, "epochs": args.epochs, "cores": os.cpu_count(),
               "single_machine": run_record(os.path.join(root, "run-single"))}
    mwms = {"strategy": "multi_worker_mirrored"}
    results["mwms_1_worker"] = train_cluster(root, "mwms1", cluster_spec(1), mwms, args.epochs)
    results["mwms_2_workers"] = train_cluster(root, "mwms2", cluster_spec(2), mwms, args.epochs)
    results["ps_2_workers_2_ps"] = train_cluster(
        root, "ps", cluster_spec(2, ps=2, chief=True),
        {"strategy": "parameter_server", "min_shard_bytes": 1024}, args.epochs)
    results["scoring"] = scoring(root)
    results["memory"] = memory()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
