"""Retrieval benchmark on MovieLens-100K: fm-keras retrieval vs sampled-negative CTR, popularity
and LightFM (WARP), Recall@50 / NDCG@50 / training time, all in one run.

Protocol (issue 12): the ratings of ml-100k (from the ``recbole==1.2.1`` wheel, downloaded at
run time with ``pip download`` into ``--cache``, never committed) split by global timestamp
80/10/10; a positive is any rated (user, item) pair; test users are test users seen in train;
each user's train items are excluded from their recommendations; exact search over the whole
catalog (1,682 items). Validation (the middle 10%) is used for early stopping / choosing
LightFM's epochs only.

fm-keras uses the user features (age, gender, occupation, zip region) and item features
(genres, release year) that LightFM leaves unused here (LightFM: ids only, its usual setup).

Item popularity drifts over the 7 months of ml-100k (the items users pick in the test period
are the recently popular ones: the train counts of the last 10% of train recall twice what
all-time counts do), so the benchmark gives every training row a recency weight
``0.5 ** (days before the end of train / --half-life)`` (``data: weight`` of fm-keras;
``sample_weight`` of LightFM; ``--half-life 0``: no weights). Each stochastic method runs
once per ``--seeds`` seed (69 test users: one run moves by several points of Recall@50);
the mean, the standard deviation and each run are reported. The popularity baseline is the
train counts (the issue's baseline); recency-weighted counts are reported beside it.

    python benchmarks/retrieval.py [--cache ~/.cache/fm_keras] [--methods all] [--seeds 42,1,2]

LightFM is optional: ``pip install 'fm-keras[bench]'`` installs ``lightfm-next`` (a maintained
fork with Python 3.11 wheels); without it the method is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import fm_keras  # noqa: E402,F401
from fm_keras._tf import tf  # noqa: E402
from fm_keras.config import experiment_from_dict  # noqa: E402
from fm_keras.recall_metrics import exact_top_k, group_by_query, popularity_top_k, \
    ranking_metrics  # noqa: E402
from fm_keras.runs import load_run  # noqa: E402
from fm_keras.training import train  # noqa: E402

WHEEL = "recbole-1.2.1-py3-none-any.whl"
K = 50

FEATURES = [
    {"name": "user_id", "kind": "categorical", "tower": "user"},
    {"name": "age", "kind": "numeric", "tower": "user", "buckets": [18, 25, 35, 45, 50, 56]},
    {"name": "gender", "kind": "categorical", "tower": "user"},
    {"name": "occupation", "kind": "categorical", "tower": "user"},
    {"name": "zip_region", "kind": "categorical", "tower": "user"},
    {"name": "item_id", "kind": "categorical", "tower": "item"},
    {"name": "genres", "kind": "multi_hot", "tower": "item", "separator": " ",
     "combiner": "sqrtn"},
    {"name": "release_year", "kind": "numeric", "tower": "item",
     "buckets": [1950, 1970, 1980, 1990, 1994, 1996, 1997, 1998]},
]


def movielens(cache: str) -> dict[str, pd.DataFrame]:
    """ml-100k interactions, users and items from the recbole wheel (downloaded once)."""
    os.makedirs(cache, exist_ok=True)
    wheel = os.path.join(cache, WHEEL)
    if not os.path.exists(wheel):
        print(f"downloading {WHEEL} into {cache}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                        "recbole==1.2.1", "-d", cache], check=True)
    out = {}
    with zipfile.ZipFile(wheel) as z:
        for part in ("inter", "user", "item"):
            with z.open(f"recbole/dataset_example/ml-100k/ml-100k.{part}") as f:
                frame = pd.read_csv(f, sep="\t", dtype=str, keep_default_na=False)
            frame.columns = [c.split(":")[0] for c in frame.columns]
            out[part] = frame
    return out


def split_protocol(ml: dict[str, pd.DataFrame], work: str, half_life: float = 0.0) -> dict:
    """Writes train/valid/test logs (features joined, a ``recency`` weight column) and the
    catalog; returns the frames and ``end``, the last training timestamp."""
    inter = ml["inter"].assign(timestamp=lambda d: d["timestamp"].astype(float))
    inter = inter.sort_values("timestamp", kind="stable").reset_index(drop=True)
    n = len(inter)
    parts = {"train": inter.iloc[:int(0.8 * n)], "valid": inter.iloc[int(0.8 * n):int(0.9 * n)],
             "test": inter.iloc[int(0.9 * n):]}
    users = ml["user"].assign(zip_region=lambda d: d["zip_code"].str[:1])
    users = users[["user_id", "age", "gender", "occupation", "zip_region"]]
    items = ml["item"].rename(columns={"class": "genres"})[["item_id", "genres", "release_year"]]
    year = pd.to_numeric(items["release_year"], errors="coerce")  # one is 'unkonwn'
    items = items.assign(release_year=year.map(lambda y: "" if pd.isna(y) else str(int(y))))
    items.to_csv(os.path.join(work, "items.csv"), index=False)
    end = parts["train"]["timestamp"].max()
    for name, frame in parts.items():
        full = frame[["user_id", "item_id", "timestamp"]].merge(users, on="user_id").merge(
            items, on="item_id")
        full.assign(label=1, recency=recency(full["timestamp"], end, half_life)).to_csv(
            os.path.join(work, f"{name}.csv"), index=False)
    return {**parts, "users": users, "items": items, "end": end}


def recency(timestamps: pd.Series, end: float, half_life_days: float) -> np.ndarray:
    """Row weights 0.5 ** (age in days / half-life), age = end of train - timestamp (>= 0);
    1.0 everywhere when `half_life_days` is 0."""
    if not half_life_days:
        return np.ones(len(timestamps))
    age_days = np.clip(end - timestamps.to_numpy(float), 0, None) / 86400.0
    return 0.5 ** (age_days / half_life_days)


def features(args) -> list[dict]:
    """The fm-keras feature spec; ``--context-time N`` adds the interaction's time as a context
    feature in N quantile buckets (set to the end of train for the evaluated queries: the
    "example age" idea of Covington et al., RecSys 2016)."""
    extra = [{"name": "timestamp", "kind": "numeric", "tower": "context",
              "buckets": args.context_time}] if args.context_time else []
    return FEATURES + extra


def fm_config(work: str, task: str, args) -> dict:
    features_ = [dict(f, l2=args.id_l2) if f["name"] in ("user_id", "item_id") and args.id_l2
                 else f for f in features(args)]
    training = {"optimizer": args.optimizer, "learning_rate": args.lr, "batch_size": args.batch,
                "epochs": args.epochs, "early_stopping_patience": 3, "seed": args.seed}
    if task == "retrieval":
        training["retrieval"] = {"temperature": args.temperature, "recall_at": K,
                                 "logq_correction": not args.no_logq,
                                 "catalog_negatives": args.catalog_negatives}
        training["learning_rate"] = args.lr
    else:
        training.update(negatives={"per_positive": args.negatives, "sampler": "uniform"},
                        learning_rate=args.binary_lr)
    weight = {"weight": "recency"} if task == "retrieval" and args.half_life else {}
    return {"data": {"train": "train.csv", "valid": "valid.csv", "label": "label",
                     "items": "items.csv", **weight},
            "features": features_,
            "model": {"task": task, "embedding_dim": args.dim, "l2_embeddings": args.l2},
            "training": training}


def evaluate(top: np.ndarray, relevant) -> dict:
    m = ranking_metrics(top, relevant, [K], top_catalog)
    return {"recall@50": m[f"recall@{K}"], "ndcg@50": m[f"ndcg@{K}"],
            "hit_rate@50": m[f"hit_rate@{K}"], "coverage@50": m[f"coverage@{K}"]}


def run_fm(task: str, work: str, data: dict, ev: dict, args) -> dict:
    config = experiment_from_dict(fm_config(work, task, args), base_dir=work,
                                  source=f"{task}.yaml")
    run_dir = os.path.join(work, f"run-{task}-{args.seed}")
    t0 = time.time()
    record = train(config, run_dir, verbose=0)
    seconds = time.time() - t0
    model = load_run(run_dir).model
    users = data["users"].set_index("user_id").loc[ev["user_ids"]].reset_index()
    users["timestamp"] = data["end"]  # the context of a query made now
    query = {n: tf.constant(_raw(users[n], n)) for n in model.user_tower.feature_names}
    items = data["items"]
    cand = {n: tf.constant(_raw(items[n], n)) for n in model.item_tower.feature_names}
    # The Python towers (Keras models) give the vectors; the offset does not change one
    # user's order.
    u = model.user_tower(query)["user_vector"].numpy()
    v = model.item_tower(cand).numpy()
    top = exact_top_k(u, v, K, ev["exclude"])
    valid = record["metrics"]["valid"]
    return {**evaluate(top, ev["relevant"]), "train_seconds": round(seconds, 1),
            "epochs": record["epochs_run"], "best_epoch": record["best_epoch"],
            "valid_recall@50": valid.get(f"recall@{K}")}


def _raw(series: pd.Series, name: str) -> np.ndarray:
    kind = next(f["kind"] for f in FEATURES + [{"name": "timestamp", "kind": "numeric"}]
                if f["name"] == name)
    if kind == "numeric":
        return pd.to_numeric(series, errors="coerce").to_numpy(np.float32)
    return series.astype(str).to_numpy(dtype=object)


def run_lightfm(data: dict, ev: dict, valid_ev: dict, args, weighted: bool) -> dict:
    from lightfm import LightFM
    from scipy.sparse import coo_matrix

    users, items = ev["user_index"], ev["item_index"]
    # One entry per (user, item): ml-100k has one rating per pair.
    train = data["train"].drop_duplicates(["user_id", "item_id"], keep="last")
    rows, cols = users.get_indexer(train["user_id"]), items.get_indexer(train["item_id"])
    shape = (len(users), len(items))
    m = coo_matrix((np.ones(len(train), np.float32), (rows, cols)), shape=shape)
    weights = coo_matrix((recency(train["timestamp"], data["end"], args.half_life).astype(
        np.float32), (rows, cols)), shape=shape) if weighted else None
    model = LightFM(loss="warp", no_components=args.lightfm_dim,
                    learning_rate=args.lightfm_lr, random_state=args.seed)
    best, best_epoch, best_state, t0 = -1.0, 0, None, time.time()
    for epoch in range(1, args.lightfm_epochs + 1):
        model.fit_partial(m, sample_weight=weights, epochs=1, num_threads=2)
        if epoch % 5 == 0:
            rec = _lightfm_recall(model, valid_ev, users, items)
            if rec > best:
                best, best_epoch = rec, epoch
                best_state = [a.copy() for a in (model.user_embeddings, model.item_embeddings,
                                                  model.user_biases, model.item_biases)]
    seconds = time.time() - t0
    model.user_embeddings, model.item_embeddings, model.user_biases, model.item_biases = best_state
    top = _lightfm_top(model, ev, users, items)
    return {**evaluate(top, ev["relevant"]), "train_seconds": round(seconds, 1),
            "epochs": args.lightfm_epochs, "best_epoch": best_epoch, "valid_recall@50": best}


def _lightfm_top(model, ev, users, items):
    u = np.hstack([model.user_embeddings, model.user_biases[:, None], np.ones((len(users), 1))])
    v = np.hstack([model.item_embeddings, np.ones((len(items), 1)), model.item_biases[:, None]])
    return exact_top_k(u[users.get_indexer(ev["user_ids"])], v, K, ev["exclude"])


def _lightfm_recall(model, ev, users, items) -> float:
    return evaluate(_lightfm_top(model, ev, users, items), ev["relevant"])["recall@50"]


def eval_set(part: pd.DataFrame, train: pd.DataFrame, items: pd.Index, users: pd.Index) -> dict:
    """Users of `part` seen in train, their items in `part`, their train items excluded."""
    part = part[part["user_id"].isin(set(train["user_id"]))]
    uid = users.get_indexer(part["user_id"]).astype(np.int64)
    queries, relevant = group_by_query(uid, items.get_indexer(part["item_id"]).astype(np.int64))
    tq, seen = group_by_query(users.get_indexer(train["user_id"]).astype(np.int64),
                              items.get_indexer(train["item_id"]).astype(np.int64))
    lookup = dict(zip(tq.tolist(), seen))
    return {"user_ids": users[queries].tolist(), "relevant": relevant,
            "exclude": [lookup[q] for q in queries.tolist()], "user_index": users,
            "item_index": items}


def summarize(runs: list[dict]) -> dict:
    """Mean and standard deviation of each metric over the seeds' runs, and the runs."""
    out = {}
    for key in ("recall@50", "ndcg@50", "hit_rate@50", "coverage@50", "valid_recall@50",
                "train_seconds"):
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            out[key] = float(np.mean(values))
            out[key + "_sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {**out, "runs": runs}


def main() -> None:
    global top_catalog
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/fm_keras"))
    p.add_argument("--methods", default="retrieval,binary,popularity,lightfm")
    p.add_argument("--seeds", default="42,1,2", help="one run of each stochastic method per seed")
    p.add_argument("--half-life", type=float, default=15.0,
                   help="recency weight half-life in days (0: unweighted)")
    p.add_argument("--context-time", type=int, default=10,
                   help="fm-keras: the time as a context feature in this many buckets (0: off)")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--l2", type=float, default=1e-5)
    p.add_argument("--id-l2", type=float, default=None, help="L2 of user_id and item_id")
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--binary-lr", type=float, default=0.005)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--catalog-negatives", type=int, default=256)
    p.add_argument("--no-logq", action="store_true")
    p.add_argument("--negatives", type=int, default=4)
    p.add_argument("--lightfm-dim", type=int, default=64)
    p.add_argument("--lightfm-lr", type=float, default=0.05)
    p.add_argument("--lightfm-epochs", type=int, default=50)
    args = p.parse_args()
    methods = args.methods.split(",")
    seeds = [int(x) for x in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as work:
        data = split_protocol(movielens(args.cache), work, args.half_life)
        items = pd.Index(data["items"]["item_id"])
        users = pd.Index(data["users"]["user_id"])
        top_catalog = len(items)
        ev = eval_set(data["test"], data["train"], items, users)
        valid_ev = eval_set(data["valid"], data["train"], items, users)
        print(f"train {len(data['train']):,} / valid {len(data['valid']):,} / test "
              f"{len(data['test']):,} interactions; {len(ev['relevant'])} test users; "
              f"{len(items):,} items; load {os.getloadavg()}", file=sys.stderr)
        results = {}
        if "popularity" in methods:
            train = data["train"]
            for name, weight in (("popularity (train counts)", np.ones(len(train))),
                                 ("popularity (recency-weighted counts)",
                                  recency(train["timestamp"], data["end"], args.half_life))):
                counts = np.bincount(items.get_indexer(train["item_id"]), weights=weight,
                                     minlength=len(items))
                top = popularity_top_k(counts, len(ev["relevant"]), K, ev["exclude"])
                results[name] = evaluate(top, ev["relevant"])
        stochastic = [(task, name) for task, name in (
            ("retrieval", "fm-keras retrieval"),
            ("binary", "fm-keras binary + sampled negatives"),
            ("lightfm", "LightFM WARP (ids)"),
            ("lightfm-weighted", "LightFM WARP (ids, recency-weighted)")) if task.split("-")[0]
            in methods and (task != "lightfm-weighted" or args.half_life)]
        runs: dict[str, list] = {name: [] for _, name in stochastic}
        for seed in seeds:  # alternating rounds: every method once per seed
            args.seed = seed
            for task, name in stochastic:
                try:
                    if task.startswith("lightfm"):
                        result = run_lightfm(data, ev, valid_ev, args, task.endswith("weighted"))
                    else:
                        result = run_fm(task, work, data, ev, args)
                except ImportError:
                    print("lightfm not installed: skipped (pip install 'fm-keras[bench]')",
                          file=sys.stderr)
                    continue
                runs[name].append(dict(result, seed=seed))
                print(f"{name} seed {seed}: {result}", file=sys.stderr)
        results.update({name: summarize(r) for name, r in runs.items() if r})
    base = results.get("popularity (train counts)", {}).get("recall@50")
    ratios = {name: r["recall@50"] / base for name, r in results.items() if base}
    print(json.dumps({"protocol": "ml-100k, global time split 80/10/10, train items excluded",
                      "k": K, "test_users": len(ev["relevant"]), "items": top_catalog,
                      "settings": vars(args), "recall@50 / popularity (train counts)": ratios,
                      "load": os.getloadavg(), "results": results}, indent=2))


top_catalog = 0

if __name__ == "__main__":
    main()
