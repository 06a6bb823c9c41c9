"""Recall benchmark: the ScaNN recall export vs the brute-force one on a large catalog.

Builds both recall exports over the same synthetic catalog (default 1M items, features drawn
like `fm-keras synth`'s catalog, new ids), then for the same users measures recall@k of ScaNN
against exact search (by score: an item counts if its score reaches the exact k-th score) and
queries/s for single-user and batched requests, both exports called in this process.

    python benchmarks/recall.py [--items 1000000] [--model saved_models/ctr] [--users 1000]
        [--task retrieval]   # the model trained as two towers (task: retrieval) instead
"""

from __future__ import annotations

import argparse
import dataclasses
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
from fm_keras.recall import ScannParams, build_index  # noqa: E402
from fm_keras.servables import load_export  # noqa: E402
from fm_keras.synth import SynthSpec, _catalog, generate  # noqa: E402
from fm_keras.training import train  # noqa: E402


def ranking_model(work: str, rows: int, task: str = "binary") -> tuple[str, str]:
    """A small trained ranking export and its test file (users to query); with
    ``task="retrieval"`` the FM is trained as two towers on the clicks (`task: retrieval`)."""
    data = os.path.join(work, "data")
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
    items = _catalog(spec, np.random.default_rng(seed))
    pd.DataFrame({"item_id": [f"b{i}" for i in range(n)],
                  "item_category": [f"c{c}" for c in items["category"]],
                  "item_tags": items["tags"], "item_price": items["price"]}).to_csv(path,
                                                                                    index=False)


def user_batches(test_csv: str, query_names: list[str], n: int) -> dict[str, np.ndarray]:
    frame = pd.read_csv(test_csv, dtype=str).drop_duplicates("user_id").head(n)
    return {k: frame[k].to_numpy().astype(object) for k in query_names}


def qps(fn, users: dict[str, np.ndarray], batch: int, seconds: float = 10.0) -> float:
    n = len(next(iter(users.values())))
    feeds = [{k: tf.constant(v[s:s + batch]) for k, v in users.items()}
             for s in range(0, n - batch + 1, batch)]
    fn(**feeds[0])  # warm up
    done, started, i = 0, time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        fn(**feeds[i % len(feeds)])
        done += batch
        i += 1
    return done / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--model", help="ranking export (default: train a small one)")
    parser.add_argument("--users-file", help="CSV with the query features (with --model)")
    parser.add_argument("--rows", type=int, default=200_000, help="synthetic rows to train on")
    parser.add_argument("--task", choices=("binary", "retrieval"), default="binary",
                        help="the objective of the model trained when --model is not given")
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--leaves-to-search", type=int, help="override the tuned setting")
    parser.add_argument("--reorder", type=int, help="override the tuned setting")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="fm-recall-bench-")
    model, users_file = (args.model, args.users_file) if args.model else \
        ranking_model(work, args.rows, args.task)
    catalog = os.path.join(work, "items.csv")
    t0 = time.time()
    big_catalog(catalog, args.items)
    print(f"catalog: {args.items:,} items written in {time.time() - t0:.1f}s", flush=True)
    params = ScannParams.for_catalog(args.items, args.k)
    if params and (args.leaves_to_search or args.reorder):
        params = dataclasses.replace(params, leaves_to_search=args.leaves_to_search
                                     or params.leaves_to_search,
                                     reorder=args.reorder or params.reorder)
    base = os.path.join(work, "models")
    built = {}
    for backend in ("scann", "brute_force"):
        t0 = time.time()
        built[backend] = build_index(model, catalog, f"ctr_recall_{backend}", base=base,
                                     k=args.k, backend=backend, scann=params)
        print(f"{backend}: built and exported in {time.time() - t0:.1f}s", flush=True)
    fns = {b: load_export(p)[1].signatures["serving_default"] for b, p in built.items()}
    meta = load_export(model)[2]
    users = user_batches(users_file, meta["query_features"], args.users)
    feed = {k: tf.constant(v) for k, v in users.items()}
    got = {b: fn(**feed) for b, fn in fns.items()}
    exact = got["brute_force"]["scores"].numpy()
    approx = got["scann"]["scores"].numpy()
    kth = exact[:, -1:]
    recall = float(np.mean(np.sum(approx >= kth - 1e-5, axis=1) / args.k))
    same_ids = float(np.mean([len(set(a) & set(e)) / args.k for a, e in zip(
        got["scann"]["item_ids"].numpy(), got["brute_force"]["item_ids"].numpy())]))
    print(f"\nScaNN settings: {dataclasses.asdict(params) if params else 'exact'}")
    print(f"recall@{args.k} vs exact search over {len(exact):,} users: {recall:.4f} by score "
          f"({same_ids:.4f} by id)")
    print(f"{'request':22s} {'ScaNN q/s':>10s} {'brute force q/s':>16s} {'ratio':>7s}")
    for label, batch in (("single user", 1), (f"batch of {args.batch}", args.batch)):
        rates = {b: qps(fn, users, batch) for b, fn in fns.items()}
        print(f"{label:22s} {rates['scann']:10,.0f} {rates['brute_force']:16,.0f} "
              f"{rates['scann'] / rates['brute_force']:6.1f}x", flush=True)


if __name__ == "__main__":
    main()
