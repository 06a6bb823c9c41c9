"""Real data: MovieLens-100K as a CTR task, fm_keras with its defaults against tuned peers.

Protocol (issue 11): label = rating >= 4; features user_id, item_id, age, gender, occupation,
zip-code prefix (first two digits), release year (user/item towers) and genres (multi-hot);
split by global timestamp 80/10/10 (train on the past, test on the future).

- fm_keras: ``defaults`` is an experiment with only the data, the label and the features'
  kinds and towers: no model or training block, no L2 or embedding keys.
- logistic regression (scikit-learn, one-hot ids and attributes, binary genre columns), C
  chosen on valid AUC from a grid.
- pytorch-fm's FactorizationMachineModel (torchfm; the ``bench`` extra), every genre a binary
  field; Adam learning rate x weight decay grid, epochs early-stopped, all chosen on valid AUC.

The data is MovieLens-100K as shipped inside the ``recbole==1.2.1`` wheel on the package index,
fetched at run time into ``--cache-dir`` (reused if present) with ``pip download``. Its licence
forbids redistribution: nothing of it is committed.

    python benchmarks/movielens.py [--cache-dir ~/.cache/fm-keras/movielens] [--json-out F]
                                   [--tune N [--tune-seed S]]

``--tune N`` adds the row "fm_keras after tune": `fm_keras.tune` (N Optuna trials over the
default search space, trial 0 the defaults) on the same splits, reporting the best trial's
run (chosen on validation AUC), and checks issue 11's Must show 2: validation AUC >= the
defaults', test AUC >= the best tuned peer's, defaults' test AUC within 0.005 of tune's.

Hooks for other harnesses (e.g. a row for fm_keras after ``fm-keras tune``):
`write_experiment(out_dir, cache_dir)` writes the split CSVs and a defaults-only experiment
YAML; `run_fm_keras(experiment, run_dir)` trains one and returns its test metrics.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from fm_keras.evaluation import binary_metrics  # noqa: E402

RECBOLE = "recbole==1.2.1"
MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{}"
SPLIT = (0.8, 0.1, 0.1)
CATEGORICAL = ["user_id", "item_id", "age", "gender", "occupation", "zip_prefix", "release_year"]
USER_SIDE = {"user_id", "age", "gender", "occupation", "zip_prefix"}
GENRES = "genres"

# The whole fm_keras configuration: data, label, features' kinds and towers. Nothing else.
FEATURES = [{"name": c, "kind": "categorical", "tower": "user" if c in USER_SIDE else "item"}
            for c in CATEGORICAL] + [{"name": GENRES, "kind": "multi_hot", "tower": "item"}]


def ensure_movielens(cache_dir: str) -> str:
    """The directory holding ml-100k.{inter,user,item}, downloading the wheel if needed.

    Raises:
        RuntimeError: pip could not download the wheel.
    """
    data_dir = os.path.join(cache_dir, "ml-100k")
    names = ("inter", "user", "item")
    if all(os.path.exists(os.path.join(data_dir, f"ml-100k.{n}")) for n in names):
        return data_dir
    os.makedirs(cache_dir, exist_ok=True)
    wheels = glob.glob(os.path.join(cache_dir, "recbole-1.2.1-*.whl"))
    if not wheels:
        print(f"downloading {RECBOLE} into {cache_dir}", file=sys.stderr)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                               "-d", cache_dir, RECBOLE], stdout=sys.stderr)
        wheels = glob.glob(os.path.join(cache_dir, "recbole-1.2.1-*.whl"))
        if done.returncode or not wheels:
            raise RuntimeError(f"pip download {RECBOLE} failed (exit {done.returncode})")
    tmp = tempfile.mkdtemp(prefix=".tmp-ml-100k-", dir=cache_dir)
    with zipfile.ZipFile(wheels[0]) as whl:
        for n in names:
            with open(os.path.join(tmp, f"ml-100k.{n}"), "wb") as out:
                out.write(whl.read(MEMBER.format(n)))
    os.replace(tmp, data_dir)
    return data_dir


def movielens_frame(data_dir: str) -> pd.DataFrame:
    """Ratings joined with user and item features, sorted by time, with the CTR label.

    Returns:
        One row per rating: the `CATEGORICAL` columns and `GENRES` ("|"-joined) as strings,
        ``click`` (int8, rating >= 4) and ``timestamp`` (int64 seconds).
    """
    def read(name):
        frame = pd.read_csv(os.path.join(data_dir, f"ml-100k.{name}"), sep="\t", dtype=str,
                            keep_default_na=False)
        return frame.rename(columns=lambda c: c.split(":")[0])

    inter, users, items = read("inter"), read("user"), read("item")
    users["zip_prefix"] = users["zip_code"].str[:2]
    items[GENRES] = items["class"].str.split().str.join("|")
    frame = (inter.merge(users, on="user_id", how="left")
             .merge(items[["item_id", "release_year", GENRES]], on="item_id", how="left"))
    frame["click"] = (frame["rating"].astype(float) >= 4).astype(np.int8)
    frame["timestamp"] = frame["timestamp"].astype(float).astype(np.int64)
    frame = frame.sort_values("timestamp", kind="stable").reset_index(drop=True)
    return frame[CATEGORICAL + [GENRES, "click", "timestamp"]].fillna("")


def time_split(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Global timestamp split 80/10/10 of a time-sorted frame."""
    n = len(frame)
    a, b = int(SPLIT[0] * n), int((SPLIT[0] + SPLIT[1]) * n)
    return {"train": frame.iloc[:a], "valid": frame.iloc[a:b], "test": frame.iloc[b:]}


def write_experiment(out_dir: str, cache_dir: str) -> str:
    """Writes train/valid/test CSVs and a defaults-only ``experiment.yaml``; returns its path."""
    splits = time_split(movielens_frame(ensure_movielens(cache_dir)))
    os.makedirs(out_dir, exist_ok=True)
    for name, part in splits.items():
        part.to_csv(os.path.join(out_dir, f"{name}.csv"), index=False)
    path = os.path.join(out_dir, "experiment.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(defaults_experiment(), f, sort_keys=False)
    return path


def defaults_experiment() -> dict:
    """The experiment dict: data, label and features only (paths relative to its file)."""
    return {"data": {"train": "train.csv", "valid": "valid.csv", "test": "test.csv",
                     "label": "click"},
            "features": [dict(f) for f in FEATURES]}


def run_fm_keras(experiment: str | dict, run_dir: str, base_dir: str = ".") -> dict:
    """Trains fm_keras on an experiment (YAML path or dict) and returns its test metrics.

    Args:
        experiment: an experiment YAML path, or a dict whose relative paths resolve against
            `base_dir`.
        run_dir: a new run directory.
        base_dir: where a dict's relative data paths point.

    Returns:
        ``{"auc", "logloss", "ece", "best_epoch", "epochs_run", "fit_seconds"}`` on test rows.
    """
    from fm_keras.config import experiment_from_dict, load_experiment
    from fm_keras.training import train

    config = (load_experiment(experiment) if isinstance(experiment, str)
              else experiment_from_dict(experiment, base_dir=base_dir))
    record = train(config, run_dir, verbose=0)
    test = record["metrics"]["test"]
    return {"auc": test["auc"], "logloss": test["logloss"], "ece": test["ece"],
            "best_epoch": record["best_epoch"], "epochs_run": record["epochs_run"],
            "fit_seconds": record["seconds"]["fit"]}


def run_fm_keras_tune(experiment: str, out_dir: str, trials: int, seed: int = 0) -> dict:
    """`fm_keras.tune` on an experiment YAML; test metrics of the best trial's run.

    Returns:
        ``{"auc", "logloss", "ece", "valid_auc", "chosen", "trials", "tune_seconds"}``: the
        best trial (by validation AUC) with its values, and the trial states.
    """
    from fm_keras import fsutil
    from fm_keras.config import load_experiment
    from fm_keras.tune import tune

    summary = tune(load_experiment(experiment), out_dir, trials, seed=seed,
                   study_name="movielens")
    record = fsutil.read_json(os.path.join(summary["best"]["run"], "run.json"))
    test = record["metrics"]["test"]
    return {"auc": test["auc"], "logloss": test["logloss"], "ece": test["ece"],
            "valid_auc": record["metrics"]["valid"]["auc"],
            "chosen": {"trial": summary["best"]["trial"], "baseline": summary["best"]["baseline"],
                       **summary["best"]["params"]},
            "trials": summary["trials"], "tune_seconds": summary["seconds"]}


def tune_checks(results: dict, tuned: str, defaults: str, peers: list[str]) -> dict:
    """Issue 11 Must show 2 on one run's results: each check with the numbers behind it."""
    best_peer = max(peers, key=lambda p: results[p]["auc"]) if peers else None
    t, d = results[tuned], results[defaults]
    checks = {
        "tune valid AUC >= defaults'": [t["valid_auc"], d["valid_auc"],
                                        t["valid_auc"] >= d["valid_auc"]],
        "defaults' test AUC within 0.005 of tune's": [d["auc"], t["auc"],
                                                       abs(d["auc"] - t["auc"]) <= 0.005],
    }
    if best_peer:
        checks[f"tune test AUC >= best tuned peer's ({best_peer})"] = [
            t["auc"], results[best_peer]["auc"], t["auc"] >= results[best_peer]["auc"]]
    return checks


def _lr_design(splits):
    from scipy import sparse
    from sklearn.preprocessing import MultiLabelBinarizer, OneHotEncoder

    onehot = OneHotEncoder(handle_unknown="ignore").fit(splits["train"][CATEGORICAL])
    genres = MultiLabelBinarizer().fit([g.split("|") for g in splits["train"][GENRES]])

    def design(part):
        with np.errstate(all="ignore"):
            g = genres.transform([x.split("|") for x in part[GENRES]])
        return sparse.hstack([onehot.transform(part[CATEGORICAL]), sparse.csr_matrix(g)]).tocsr()

    return {k: design(v) for k, v in splits.items()}


def logistic_regression(splits, grid=(0.01, 0.03, 0.1, 0.3, 1.0, 3.0)) -> dict:
    """Logistic regression on one-hot features, C chosen on valid AUC; test metrics."""
    import warnings

    from sklearn.linear_model import LogisticRegression

    x = _lr_design(splits)
    y = {k: v["click"].to_numpy() for k, v in splits.items()}
    best = None
    for c in grid:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = LogisticRegression(C=c, max_iter=2000).fit(x["train"], y["train"])
        auc = binary_metrics(y["valid"], model.predict_proba(x["valid"])[:, 1])["auc"]
        if best is None or auc > best[0]:
            best = (auc, c, model)
    test = binary_metrics(y["test"], best[2].predict_proba(x["test"])[:, 1])
    return {**_pick(test), "chosen": {"C": best[1]}, "valid_auc": best[0]}


def torchfm_fm(splits, lrs=(1e-3, 3e-3, 1e-2), weight_decays=(1e-4, 3e-4, 1e-3, 3e-3),
               embed_dim=10, batch_size=1024, max_epochs=30, patience=2, seed=0) -> dict:
    """pytorch-fm's FM over categorical fields (genres as binary fields), grid on valid AUC."""
    if not hasattr(np, "long"):  # torchfm 0.7.0 uses np.long, removed in NumPy 2
        np.long = np.int64
    import torch
    from torchfm.model.fm import FactorizationMachineModel

    torch.set_num_threads(1)
    train = splits["train"]
    vocab = {c: {v: i + 1 for i, v in enumerate(sorted(set(train[c])))} for c in CATEGORICAL}
    genre_names = sorted({g for x in train[GENRES] for g in x.split("|") if g})

    def fields(part):  # id 0 = unseen value
        cols = [part[c].map(vocab[c]).fillna(0).astype(np.int64).to_numpy() for c in CATEGORICAL]
        sets = [set(x.split("|")) for x in part[GENRES]]
        cols += [np.array([g in s for s in sets], np.int64) for g in genre_names]
        return torch.from_numpy(np.stack(cols, 1))

    dims = [len(vocab[c]) + 1 for c in CATEGORICAL] + [2] * len(genre_names)
    x = {k: fields(v) for k, v in splits.items()}
    y = {k: torch.from_numpy(v["click"].to_numpy().astype(np.float32)) for k, v in splits.items()}

    def predict(model, xs):
        model.eval()
        with torch.no_grad():
            return model(xs).numpy().astype(np.float64)

    best = None
    for lr in lrs:
        for wd in weight_decays:
            torch.manual_seed(seed)
            model = FactorizationMachineModel(dims, embed_dim)
            opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)
            run_best, wait = None, 0
            for epoch in range(max_epochs):
                model.train()
                perm = torch.randperm(len(y["train"]))
                for b in range(0, len(perm), batch_size):
                    i = perm[b:b + batch_size]
                    loss = torch.nn.functional.binary_cross_entropy(model(x["train"][i]),
                                                                    y["train"][i])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                auc = binary_metrics(y["valid"].numpy(), predict(model, x["valid"]))["auc"]
                if run_best is None or auc > run_best[0]:
                    run_best, wait = (auc, epoch + 1, predict(model, x["test"])), 0
                else:
                    wait += 1
                    if wait >= patience:
                        break
            if best is None or run_best[0] > best[0]:
                best = (run_best[0], {"lr": lr, "weight_decay": wd, "epochs": run_best[1]},
                        run_best[2])
    test = binary_metrics(y["test"].numpy(), best[2])
    return {**_pick(test), "chosen": best[1], "valid_auc": best[0]}


def _pick(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("auc", "logloss", "ece")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/fm-keras/movielens"),
                        help="where the recbole wheel and the extracted files are kept")
    parser.add_argument("--json-out", help="also write the results here as JSON")
    parser.add_argument("--peers", default="lr,torchfm", help="comma-separated: lr, torchfm")
    parser.add_argument("--tune", type=int, default=0, metavar="N",
                        help="also run fm-keras tune with N trials (the 'after tune' row)")
    parser.add_argument("--tune-seed", type=int, default=0, help="the tune sampler's seed")
    args = parser.parse_args(argv)

    work = tempfile.mkdtemp(prefix="fm-movielens-")
    experiment = write_experiment(os.path.join(work, "data"), args.cache_dir)
    splits = {k: pd.read_csv(os.path.join(work, "data", f"{k}.csv"), dtype=str,
                             keep_default_na=False) for k in ("train", "valid", "test")}
    for part in splits.values():
        part["click"] = part["click"].astype(np.int8)
    rows = {k: len(v) for k, v in splits.items()}
    print(f"MovieLens-100K CTR: rows {rows}, positive rate "
          f"{float(splits['test']['click'].mean()):.3f} (test)", file=sys.stderr)
    results = {}
    t0 = time.time()
    results["fm_keras (defaults)"] = run_fm_keras(experiment, os.path.join(work, "run"))
    results["fm_keras (defaults)"]["seconds"] = round(time.time() - t0, 1)
    run_json = os.path.join(work, "run", "run.json")
    with open(run_json, encoding="utf-8") as f:
        results["fm_keras (defaults)"]["valid_auc"] = json.load(f)["metrics"]["valid"]["auc"]
    if args.tune:
        tuned = f"fm_keras after tune ({args.tune} trials)"
        t0 = time.time()
        results[tuned] = run_fm_keras_tune(experiment, os.path.join(work, "tune"), args.tune,
                                           args.tune_seed)
        results[tuned]["seconds"] = round(time.time() - t0, 1)
    peers = {"lr": ("logistic regression (C on valid)", logistic_regression),
             "torchfm": ("torchfm FM (grid on valid)", torchfm_fm)}
    for key in [p.strip() for p in args.peers.split(",") if p.strip()]:
        name, fn = peers[key]
        t0 = time.time()
        results[name] = fn(splits)
        results[name]["seconds"] = round(time.time() - t0, 1)
        print(f"{name}: done in {results[name]['seconds']}s", file=sys.stderr)
    print(f"{'model':<36} {'test AUC':>9} {'logloss':>9} {'ECE':>7}  chosen")
    for name, r in results.items():
        chosen = r.get("chosen") or {k: r[k] for k in ("best_epoch", "epochs_run") if k in r}
        print(f"{name:<36} {r['auc']:>9.4f} {r['logloss']:>9.4f} {r['ece']:>7.4f}  "
              f"{json.dumps(chosen)}")
    checks = None
    if args.tune:
        ran = [name for key, (name, _) in peers.items() if name in results]
        checks = tune_checks(results, tuned, "fm_keras (defaults)", ran)
        for name, (ours, other, ok) in checks.items():
            print(f"{'PASS' if ok else 'FAIL'}  {name}: {ours:.4f} vs {other:.4f}")
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump({"rows": rows, "results": results, "tune_checks": checks,
                       "load": os.getloadavg()}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
