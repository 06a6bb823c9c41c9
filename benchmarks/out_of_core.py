"""Out-of-core training: peak RSS and samples/s vs training rows (issue 13, must-show 1).

Draws one synthetic set large enough for the biggest size (`fm-keras synth` writes it block
by block), takes the first N rows of its train.csv for each size and the first 100k rows of
its valid.csv for every run, and trains each in a fresh `fm-keras train` process: out of
core at every size, in memory at the smallest. Prints each run's peak RSS (the process's
ru_maxrss), training samples/s (run.json: rows x epochs / fit seconds) and wall time.

Must show: peak RSS at the largest size <= 1.5x the peak at the smallest (out of core), and
samples/s at the largest >= 0.8x the in-memory path at the smallest.

    python benchmarks/out_of_core.py --rows 1000000,5000000,20000000 --work /tmp/fm-ooc-bench

``--formats ROWS`` instead compares the two on-disk formats' input pipelines alone (rows/s
reading one epoch, no training) on the first ROWS training rows: the TFRecord Examples of
``fm-keras convert`` (parsed and encoded every batch) and the encoded shards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from scoring import CHILD  # noqa: E402  (benchmarks/scoring.py: fm-keras, then its peak RSS)

VALID_ROWS = 100_000


def head(src: str, dst: str, rows: int) -> None:
    """Copies the header and the first `rows` data lines of a CSV (synth writes no quoted
    newlines), streaming."""
    if os.path.exists(dst):
        return
    with open(src) as fin, open(dst + ".tmp", "w") as fout:
        for i, line in enumerate(fin):
            if i > rows:
                break
            fout.write(line)
    os.replace(dst + ".tmp", dst)


def train(work: str, name: str, train_csv: str, valid_csv: str, features: str, mode: str,
          epochs: int) -> dict:
    """One `fm-keras train` in a fresh process; returns run.json figures and peak RSS."""
    config = os.path.join(work, f"{name}.yaml")
    with open(config, "w") as f:
        json.dump({"data": {"train": train_csv, "valid": valid_csv, "label": "click",
                            "out_of_core": mode,
                            "filters": [{"name": "cached_exposures", "column": "is_cached",
                                         "op": "==", "value": 1}]},
                   "features": features, "training": {"epochs": epochs}}, f)
    run_dir = os.path.join(work, "runs", name)
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", CHILD, "fm-keras", "train", "--config", config,
                           "--out", run_dir],
                          capture_output=True, text=True, check=False,
                          env={**os.environ, "TF_USE_LEGACY_KERAS": "1"})
    wall = time.time() - started
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    peak = next(int(line.split()[1]) for line in proc.stderr.splitlines()
                if line.startswith("peak_rss_kib"))
    record = json.load(open(os.path.join(run_dir, "run.json")))
    shutil.rmtree(os.path.join(run_dir, "shards"), ignore_errors=True)  # GBs at 20M rows
    return {"run": name, "mode": mode, "rows_read": record["rows"]["train_read"],
            "rows_trained": record["rows"]["train"],
            "peak_rss_mib": round(peak / 1024), "samples_per_s": record["train_samples_per_second"],
            "fit_s": record["seconds"]["fit"], "wall_s": round(wall, 1),
            "valid_auc": round(record["metrics"]["valid"]["auc"], 4),
            "log": [line for line in proc.stderr.splitlines() if "fm-keras:" in line][:8]}


def compare_formats(work: str, rows: int, repeats: int = 3) -> None:
    """Input pipeline rows/s: TFRecord Examples (parse + encode per batch) vs encoded shards."""
    import yaml

    from fm_keras import out_of_core, tfrecord
    from fm_keras.config import load_experiment
    from fm_keras.features import FeatureEncoder

    synth_dir = os.path.join(work, "synth")
    train_csv = os.path.join(work, f"train-{rows}.csv")
    head(os.path.join(synth_dir, "train.csv"), train_csv, rows)
    config_path = os.path.join(work, f"formats-{rows}.yaml")
    with open(config_path, "w") as f:
        yaml.safe_dump({"data": {"train": train_csv, "valid": os.path.join(work, "valid.csv"),
                                 "label": "click"},
                        "features": os.path.join(synth_dir, "features.yaml")}, f)
    config = load_experiment(config_path)
    out = os.path.join(work, f"formats-{rows}")
    shutil.rmtree(out, ignore_errors=True)
    tfrecord.convert(config, [train_csv], os.path.join(out, "tfrecord"), shards=8)
    fit = out_of_core.fit_pass(config)
    encoder = FeatureEncoder(fit.features)
    shards = out_of_core.write_shards(config, encoder, os.path.join(out, "shards"), fit)
    files = sorted(os.path.join(out, "tfrecord", f) for f in os.listdir(os.path.join(
        out, "tfrecord")) if tfrecord.is_tfrecord(f))
    batch = config.training.batch_size
    pipelines = {
        "tfrecord Examples (convert)": lambda: tfrecord.training_dataset(
            files, encoder, "click", config.training, batch, seed=1).take(rows // batch),
        "encoded shards (out of core)": lambda: out_of_core.shard_dataset(
            shards, config.training, seed=1),
    }
    for name, make in pipelines.items():
        rates = []
        for _ in range(repeats):
            dataset, seen, t0 = make(), 0, time.time()
            for _, labels, _ in dataset:
                seen += int(labels.shape[0])
            rates.append(seen / (time.time() - t0))
        print(f"{name:32s} rows/s per epoch: {', '.join(f'{r:,.0f}' for r in rates)}")
    print(f"load {os.getloadavg()}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1000000,5000000,20000000",
                        help="training rows (read, before the cached-exposure filter)")
    parser.add_argument("--work", default="/tmp/fm-ooc-bench", help="data and runs go here")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--formats", type=int, default=0,
                        help="compare the input pipelines of the two formats on this many rows")
    args = parser.parse_args()
    if args.formats:
        compare_formats(args.work, args.formats)
        return
    sizes = sorted(int(r) for r in args.rows.split(","))
    os.makedirs(args.work, exist_ok=True)
    print(f"free disk under {args.work}: {shutil.disk_usage(args.work).free / 2**30:.1f} GiB; "
          f"load {os.getloadavg()}", file=sys.stderr)
    synth_dir = os.path.join(args.work, "synth")
    total = -(-sizes[-1] * 10 // 8)  # synth puts 80% of its rows in train.csv
    if not os.path.exists(os.path.join(synth_dir, "oracle.json")):
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "fm_keras.cli", "synth", "--out", synth_dir,
                        "--rows", str(total)], check=True)
        print(f"synth: {total:,} rows in {time.time() - t0:.0f}s", file=sys.stderr)
    valid = os.path.join(args.work, "valid.csv")
    head(os.path.join(synth_dir, "valid.csv"), valid, VALID_ROWS)
    features = os.path.join(synth_dir, "features.yaml")
    results = []
    for i, n in enumerate(sizes):
        train_csv = os.path.join(args.work, f"train-{n}.csv")
        head(os.path.join(synth_dir, "train.csv"), train_csv, n)
        modes = ("false", "true") if i == 0 else ("true",)
        for mode in modes:
            name = f"{n}-{'in-memory' if mode == 'false' else 'out-of-core'}"
            result = train(args.work, name, train_csv, valid, features, mode, args.epochs)
            results.append(result)
            print(json.dumps({k: v for k, v in result.items() if k != "log"}), file=sys.stderr)
    small_ooc = next(r for r in results if r["mode"] == "true")
    small_mem = next(r for r in results if r["mode"] == "false")
    large = results[-1]
    print(f"{'run':28s} {'rows read':>11s} {'trained':>11s} {'peak RSS MiB':>13s} "
          f"{'samples/s':>10s} {'fit s':>7s} {'wall s':>7s} {'val AUC':>8s}")
    for r in results:
        print(f"{r['run']:28s} {r['rows_read']:>11,} {r['rows_trained']:>11,} "
              f"{r['peak_rss_mib']:>13,} {r['samples_per_s']:>10,} {r['fit_s']:>7.1f} "
              f"{r['wall_s']:>7.1f} {r['valid_auc']:>8.4f}")
    checks = {
        "rss_ratio_largest_vs_smallest_ooc": round(large["peak_rss_mib"]
                                                   / small_ooc["peak_rss_mib"], 3),
        "samples_per_s_ratio_largest_ooc_vs_smallest_in_memory": round(
            large["samples_per_s"] / small_mem["samples_per_s"], 3),
    }
    checks["pass"] = (checks["rss_ratio_largest_vs_smallest_ooc"] <= 1.5 and
                      checks["samples_per_s_ratio_largest_ooc_vs_smallest_in_memory"] >= 0.8)
    print(json.dumps({"results": results, "checks": checks, "load": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    main()
