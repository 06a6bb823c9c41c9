"""Real data on a cluster: MovieLens-100K CTR trained on one machine and on a loopback cluster.

The protocol of `benchmarks/movielens.py` (label rating >= 4, user and item attributes,
genres multi-hot, global time split 80/10/10, the defaults-only experiment). The training
split is converted once (`fm-keras convert`, 2 shard files); then, on those shards:

- one machine, out of core (``strategy: none``);
- MultiWorkerMirrored with 2 workers (every task a process on this machine);
- the same cluster with ``model.l2_prior: 0``: what a cluster trained before the per-id prior
  was applied there (it was dropped with a warning), for comparison;
- with ``--parameter-server``, also a parameter-server cluster (2 workers, 2 ps).

Test AUC, logloss and ECE, and fit seconds, per run. MovieLens is fetched at run time into
``--cache-dir`` (see `benchmarks/movielens.py`); nothing of it is committed.

    python benchmarks/cluster_quality.py [--cache-dir ~/.cache/fm-keras/movielens]
                                         [--parameter-server] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import yaml

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from movielens import write_experiment  # noqa: E402

from fm_keras.loopback import LoopbackCluster, cluster_spec  # noqa: E402

TIMEOUT = 3600


def experiment(root: str, base: dict, distribute: dict, name: str, **model) -> str:
    """An experiment YAML in `root`: `base` training from the shards, on `distribute`."""
    raw = json.loads(json.dumps(base))
    raw["data"].update({"train": os.path.join(root, "shards", "shards.json"),
                        "valid": os.path.join(root, "valid.csv"),
                        "test": os.path.join(root, "test.csv")})
    raw.setdefault("model", {}).update(model)
    raw.setdefault("training", {})["distribute"] = distribute
    path = os.path.join(root, name)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(raw, f, sort_keys=False)
    return path


def summary(run_dir: str, seconds: float) -> dict:
    with open(os.path.join(run_dir, "run.json")) as f:
        record = json.load(f)
    test = record["metrics"]["test"]
    return {"auc": round(test["auc"], 4), "logloss": round(test["logloss"], 4),
            "ece": round(test["ece"], 4), "epochs_run": record["epochs_run"],
            "best_epoch": record["best_epoch"], "seconds": round(seconds, 1),
            "warnings": [w for w in record.get("warnings", []) if "l2_prior" in w]}


def run_cluster(root: str, config: str, name: str, ps: bool) -> dict:
    """Trains `config` on a loopback cluster; the run's `summary`."""
    run_dir = os.path.join(root, name)
    spec = cluster_spec(workers=2, ps=2, chief=True) if ps else cluster_spec(workers=2)
    t0 = time.time()
    with LoopbackCluster(spec, os.path.join(root, f"{name}-logs")) as cluster:
        if ps:
            cluster.start_servers()
            tasks = [cluster.start("chief", 0, ["train", "--config", config, "--out", run_dir,
                                                "--quiet"])]
        else:
            tasks = [cluster.start("worker", i, ["train", "--config", config, "--out", run_dir,
                                                 "--quiet"]) for i in range(2)]
        cluster.wait(tasks, TIMEOUT)
    return summary(run_dir, time.time() - t0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/fm-keras/movielens"))
    parser.add_argument("--parameter-server", action="store_true",
                        help="also train on a parameter-server cluster")
    parser.add_argument("--keep", help="work directory to keep (default: a temp directory)")
    args = parser.parse_args(argv)
    root = args.keep or tempfile.mkdtemp(prefix="fm-cluster-quality-")
    os.makedirs(root, exist_ok=True)
    try:
        from fm_keras.cli import main as fm_keras
        from fm_keras.config import load_experiment
        from fm_keras.training import train

        defaults = write_experiment(root, args.cache_dir)
        with open(defaults) as f:
            base = yaml.safe_load(f)
        if fm_keras(["convert", "--config", defaults, "--input", os.path.join(root, "train.csv"),
                     "--out", os.path.join(root, "shards"), "--shards", "2"]):
            raise SystemExit("convert failed")
        results = {}
        single = experiment(root, base, {"strategy": "none"}, "single.yaml")
        t0 = time.time()
        train(load_experiment(single), os.path.join(root, "single"), verbose=0)
        results["one machine (out of core)"] = summary(os.path.join(root, "single"),
                                                       time.time() - t0)
        mwms = {"strategy": "multi_worker_mirrored"}
        runs = [("multi_worker_mirrored x2", experiment(root, base, mwms, "mwms.yaml"), False),
                ("multi_worker_mirrored x2, l2_prior 0",
                 experiment(root, base, mwms, "mwms-no-prior.yaml", l2_prior=0.0), False)]
        if args.parameter_server:
            runs.append(("parameter_server 2 workers 2 ps",
                         experiment(root, base, {"strategy": "parameter_server"}, "ps.yaml"),
                         True))
        for name, config, ps in runs:
            results[name] = run_cluster(root, config, name.split()[0] + str(len(results)), ps)
        width = max(map(len, results))
        print(f"MovieLens-100K CTR, test rows; load {os.getloadavg()[0]:.1f} at the end")
        for name, r in results.items():
            print(f"{name:<{width}}  AUC {r['auc']:.4f}  logloss {r['logloss']:.4f}  "
                  f"ECE {r['ece']:.4f}  epochs {r['epochs_run']} (best {r['best_epoch']})  "
                  f"{r['seconds']:.0f} s" + (f"  {r['warnings'][0]}" if r["warnings"] else ""))
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
