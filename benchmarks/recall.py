"""Recall benchmark: ScaNN, partitioned (IVF, stock ops) and brute-force recall exports.

Builds the recall exports over the same synthetic catalog (default 1M items, features drawn
like `fm-keras synth`'s catalog, new ids), then for the same users measures recall@k of each
approximate backend against exact search (by score: an item counts if its score reaches the
exact k-th score) and queries/s for single-user and batched requests, every export called
through its serving_default signature in this process, in one run.

    python benchmarks/recall.py [--items 1000000] [--model saved_models/ctr] [--users 1000]
        [--task retrieval]   # the model trained as two towers (task: retrieval) instead
        [--int8]   # also the partitioned index with int8 blocks
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import tempfile
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scann  # noqa: E402,F401  (registers the ScaNN ops for loading)
import tensorflow as tf  # noqa: E402

from fm_keras.config import load_experiment  # noqa: E402
from fm_keras.export import export_run  # noqa: E402
from fm_keras.recall import build_index, index_settings  # noqa: E402
from fm_keras.servables import load_export  # noqa: E402
from fm_keras.synth import SynthSpec, item_catalog, generate  # noqa: E402
from fm_keras.training import train  # noqa: E402


def ranking_model(work: str, rows: int, task: str = "binary") -> tuple[str, str]:
    """A small trained ranking export and its test file (users to query); with
    ``task="retrieval"`` the FM is trained as two towers on the clicks (`task: retrieval`).
    A work directory that holds one already (``--reuse``) gives its export again."""
    data = os.path.join(work, "data")
    exported = sorted(glob.glob(os.path.join(work, "models", "ctr", "*")),
                      key=lambda p: int(os.path.basename(p)))
    if exported and os.path.exists(os.path.join(data, "test.csv")):
        print(f"ranking model: {exported[-1]} (reused)", flush=True)
        return exported[-1], os.path.join(data, "test.csv")
    generate(data, rows=rows, seed=7)
    config = load_experiment(os.path.join(data, "experiment.yaml"))
    config = dataclasses.replace(config, training=dataclasses.replace(config.training, epochs=3))
    if task == "retrieval":
        config = dataclasses.replace(
            config, model=dataclasses.replace(config.model, task="retrieval"),
            data=dataclasses.replace(config.data, items=(os.path.join(data, "items.csv"),)))
    train(config, os.path.join(work, "run"), verbose=0)
    return export_run(os.path.join(work, "run"), "ctr", base=os.path.join(work, "models")), \
        os.path.join(data, "test.csv")


def big_catalog(path: str, n: int, seed: int = 1) -> None:
    spec = dataclasses.replace(SynthSpec(), items=n)
    items = item_catalog(spec, np.random.default_rng(seed))
    pd.DataFrame({"item_id": [f"b{i}" for i in range(n)],
                  "item_category": [f"c{c}" for c in items["category"]],
                  "item_tags": items["tags"], "item_price": items["price"]}).to_csv(path,
                                                                                    index=False)


def user_batches(test_csv: str, query_names: list[str], n: int) -> dict[str, np.ndarray]:
    frame = pd.read_csv(test_csv, dtype=str).drop_duplicates("user_id").head(n)
    return {k: frame[k].to_numpy().astype(object) for k in query_names}


def qps(fn, users: dict[str, np.ndarray], batch: int, seconds: float = 10.0
        ) -> tuple[float, float]:
    """(queries per wall second, queries per CPU second of this process, all threads).

    The second figure is what the machine's other jobs disturb least."""
    n = len(next(iter(users.values())))
    feeds = [{k: tf.constant(v[s:s + batch]) for k, v in users.items()}
             for s in range(0, n - batch + 1, batch)]
    fn(**feeds[0])  # warm up
    done, started, cpu, i = 0, time.perf_counter(), time.process_time(), 0
    while time.perf_counter() - started < seconds:
        fn(**feeds[i % len(feeds)])
        done += batch
        i += 1
    return (done / (time.perf_counter() - started),
            done / max(time.process_time() - cpu, 1e-9))


def model_arguments(parser: argparse.ArgumentParser, items: int) -> None:
    """--items, --model, --users-file, --rows, --task: what `prepare` needs."""
    parser.add_argument("--items", type=int, default=items)
    parser.add_argument("--model", help="ranking export (default: train a small one)")
    parser.add_argument("--users-file", help="CSV with the query features (with --model)")
    parser.add_argument("--rows", type=int, default=200_000, help="synthetic rows to train on")
    parser.add_argument("--task", choices=("binary", "retrieval"), default="binary",
                        help="the objective of the model trained when --model is not given")


def prepare(args, prefix: str) -> tuple[str, str, str, str]:
    """(work dir, ranking export, users file, catalog of --items items) for a benchmark;
    with ``args.reuse`` (an earlier run's work directory) its catalog is used again."""
    work = getattr(args, "reuse", None) or tempfile.mkdtemp(prefix=prefix)
    model, users_file = (args.model, args.users_file) if args.model else \
        ranking_model(work, args.rows, args.task)
    catalog = os.path.join(work, "items.csv")
    if os.path.exists(catalog):
        print(f"catalog: {catalog} (reused)", flush=True)
        return work, model, users_file, catalog
    t0 = time.time()
    big_catalog(catalog, args.items)
    print(f"catalog: {args.items:,} items written in {time.time() - t0:.1f}s", flush=True)
    return work, model, users_file, catalog


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arguments(parser, 1_000_000)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--leaves-to-search", type=int, help="ScaNN: override the tuned setting")
    parser.add_argument("--reorder", type=int, help="ScaNN: override the tuned setting")
    parser.add_argument("--probe", type=int, help="partitioned: blocks searched per query")
    parser.add_argument("--int8", action="store_true", help="also the int8-quantized index")
    parser.add_argument("--seconds", type=float, default=10.0, help="per q/s measurement")
    parser.add_argument("--reuse", help="work directory of an earlier run (printed at the "
                        "end): measure its catalog and exports again")
    args = parser.parse_args()
    work, model, users_file, catalog = prepare(args, "fm-recall-bench-")
    overrides = {"partitions_to_search": args.leaves_to_search, "rescore": args.reorder}
    variants = {"scann": ("scann", index_settings("scann", args.items, args.k, **overrides)),
                "partitioned": ("partitioned", index_settings(
                    "partitioned", args.items, args.k, partitions_to_search=args.probe)),
                "brute_force": ("brute_force", None)}
    if args.int8:
        variants["partitioned_int8"] = ("partitioned", index_settings(
            "partitioned", args.items, args.k, partitions_to_search=args.probe, quantize="int8"))
    base = os.path.join(work, "models")
    built = {}
    for label, (backend, params) in variants.items():
        t0 = time.time()
        if os.path.isdir(os.path.join(base, f"ctr_recall_{label}", "1")):  # --reuse
            built[label] = os.path.join(base, f"ctr_recall_{label}", "1")
            continue
        built[label] = build_index(model, catalog, f"ctr_recall_{label}", base=base,
                                   k=args.k, backend=backend, params=params)
        print(f"{label}: built and exported in {time.time() - t0:.1f}s "
              f"({dataclasses.asdict(params) if params else 'exact'})", flush=True)
    fns = {b: load_export(p)[1].signatures["serving_default"] for b, p in built.items()}
    meta = load_export(model)[2]
    users = user_batches(users_file, meta["query_features"], args.users)
    feed = {k: tf.constant(v) for k, v in users.items()}
    got = {b: fn(**feed) for b, fn in fns.items()}
    exact = got["brute_force"]["scores"].numpy()
    kth = exact[:, -1:]
    print(f"\nrecall@{args.k} vs exact search over {len(exact):,} users, "
          f"{args.items:,} items (uptime: {os.getloadavg()[0]:.1f} load)")
    for label in fns:
        if label == "brute_force":
            continue
        approx = got[label]["scores"].numpy()
        recall = float(np.mean(np.sum(approx >= kth - 1e-5, axis=1) / args.k))
        same_ids = float(np.mean([len(set(a) & set(e)) / args.k for a, e in zip(
            got[label]["item_ids"].numpy(), got["brute_force"]["item_ids"].numpy())]))
        print(f"  {label:18s} {recall:.4f} by score ({same_ids:.4f} by id)")
    print("queries/s (wall clock) | queries per CPU-second, and the ratio to brute force")
    print(f"{'request':16s} " + " ".join(f"{b:>36s}" for b in fns))
    for label, batch in (("single user", 1), (f"batch of {args.batch}", args.batch)):
        rates = {b: qps(fn, users, batch, args.seconds) for b, fn in fns.items()}
        print(f"{label:16s} " + " ".join(
            f"{wall:8,.0f} ({wall / rates['brute_force'][0]:5.1f}x) | "
            f"{cpu:8,.0f} ({cpu / rates['brute_force'][1]:5.1f}x)"
            for b, (wall, cpu) in rates.items()), flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}; work directory {work}")


if __name__ == "__main__":
    main()
