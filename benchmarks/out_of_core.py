"""Out-of-core training: peak RSS and samples/s vs training rows (issue 13, must-show 1).

Draws one synthetic set large enough for the biggest size (`fm-keras synth` writes it block
by block), takes the first N rows of its train.csv for each size and the first 100k rows of
its valid.csv for every run, and trains each in a fresh `fm-keras train` process: out of
core at every size, in memory at the smallest. Prints each run's peak RSS (the process's
ru_maxrss), training samples/s (run.json: rows x epochs / fit seconds) and wall time.

Must show: peak RSS at the largest size <= 1.5x the peak at the smallest (out of core), and
samples/s at the largest >= 0.8x the in-memory path at the smallest.

    python benchmarks/out_of_core.py --rows 1000000,5000000,20000000 --work /tmp/fm-ooc-bench

``--convert`` instead runs ``fm-keras convert`` (the same two streaming passes, writing the
shard directory a cluster reads) on the first N rows at each size, each in a fresh process,
and prints its peak RSS: flat in rows. It needs the synth/ directory of an earlier run (or
``fm-keras synth --out WORK/synth``)::

    python benchmarks/out_of_core.py --convert --rows 1000000,5000000 --work /tmp/fm-ooc-bench
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


def _rows(oracle: str) -> int:
    """Rows of the synthetic set whose oracle.json is at `oracle`."""
    with open(oracle) as f:
        return json.load(f)["rows"]


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


def run_cli(*args: str) -> tuple[str, str, int, float]:
    """`fm-keras ARGS` in a fresh process: (stdout, stderr, peak RSS KiB, wall seconds)."""
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", CHILD, "fm-keras", *args],
                          capture_output=True, text=True, check=False,
                          env={**os.environ, "TF_USE_LEGACY_KERAS": "1"})
    wall = time.time() - started
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    peak = next(int(line.split()[1]) for line in proc.stderr.splitlines()
                if line.startswith("peak_rss_kib"))
    return proc.stdout, proc.stderr, peak, wall


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
    _, stderr, peak, wall = run_cli("train", "--config", config, "--out", run_dir)
    record = json.load(open(os.path.join(run_dir, "run.json")))
    shutil.rmtree(os.path.join(run_dir, "shards"), ignore_errors=True)  # GBs at 20M rows
    return {"run": name, "mode": mode, "rows_read": record["rows"]["train_read"],
            "rows_trained": record["rows"]["train"],
            "peak_rss_mib": round(peak / 1024), "samples_per_s": record["train_samples_per_second"],
            "fit_s": record["seconds"]["fit"], "wall_s": round(wall, 1),
            "valid_auc": round(record["metrics"]["valid"]["auc"], 4),
            "log": [line for line in stderr.splitlines() if "fm-keras:" in line][:8]}


def convert(work: str, n: int, train_csv: str, valid_csv: str, features: str,
            shards: int = 8) -> dict:
    """One `fm-keras convert` of `train_csv` in a fresh process; its peak RSS, time and rows."""
    config = os.path.join(work, f"convert-{n}.yaml")
    with open(config, "w") as f:
        json.dump({"data": {"train": train_csv, "valid": valid_csv, "label": "click",
                            "filters": [{"name": "cached_exposures", "column": "is_cached",
                                         "op": "==", "value": 1}]},
                   "features": features}, f)
    out = os.path.join(work, f"converted-{n}")
    shutil.rmtree(out, ignore_errors=True)
    stdout, _, peak, wall = run_cli("convert", "--config", config, "--out", out,
                                 "--shards", str(shards))
    result = json.loads(stdout)
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    shutil.rmtree(out, ignore_errors=True)
    return {"rows_read": result["rows_read"], "rows": result["rows"],
            "peak_rss_mib": round(peak / 1024), "wall_s": round(wall, 1),
            "rows_read_per_s": round(result["rows_read"] / wall), "shard_mib": round(size / 2**20)}


def convert_sizes(work: str, sizes: list[int], shards: int) -> None:
    """`fm-keras convert` at each size: peak RSS must stay flat in rows (two streaming passes)."""
    synth_dir = os.path.join(work, "synth")
    valid = os.path.join(work, "valid.csv")
    head(os.path.join(synth_dir, "valid.csv"), valid, VALID_ROWS)
    results = []
    for n in sizes:
        train_csv = os.path.join(work, f"train-{n}.csv")
        head(os.path.join(synth_dir, "train.csv"), train_csv, n)
        results.append({"size": n, **convert(work, n, train_csv, valid,
                                             os.path.join(synth_dir, "features.yaml"), shards)})
        print(json.dumps(results[-1]), file=sys.stderr)
    print(f"{'rows read':>11s} {'rows written':>13s} {'peak RSS MiB':>13s} {'wall s':>7s} "
          f"{'rows read/s':>12s} {'shards MiB':>11s}")
    for r in results:
        print(f"{r['rows_read']:>11,} {r['rows']:>13,} {r['peak_rss_mib']:>13,} "
              f"{r['wall_s']:>7.1f} {r['rows_read_per_s']:>12,} {r['shard_mib']:>11,}")
    ratio = round(results[-1]["peak_rss_mib"] / results[0]["peak_rss_mib"], 3)
    print(json.dumps({"results": results, "rss_ratio_largest_vs_smallest": ratio,
                      "load": os.getloadavg()}, indent=1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1000000,5000000,20000000",
                        help="training rows (read, before the cached-exposure filter)")
    parser.add_argument("--work", default="/tmp/fm-ooc-bench", help="data and runs go here")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--convert", action="store_true",
                        help="run 'fm-keras convert' at each size instead of training (the "
                        "work directory must already hold synth/ large enough)")
    parser.add_argument("--shards", type=int, default=8, help="--convert: shard files")
    args = parser.parse_args()
    sizes = sorted(int(r) for r in args.rows.split(","))
    os.makedirs(args.work, exist_ok=True)
    if args.convert:
        convert_sizes(args.work, sizes, args.shards)
        return
    print(f"free disk under {args.work}: {shutil.disk_usage(args.work).free / 2**30:.1f} GiB; "
          f"load {os.getloadavg()}", file=sys.stderr)
    synth_dir = os.path.join(args.work, "synth")
    total = -(-sizes[-1] * 10 // 8)  # synth puts 80% of its rows in train.csv
    oracle = os.path.join(synth_dir, "oracle.json")
    if os.path.exists(oracle) and _rows(oracle) < total:
        # An earlier run's set is too small for --rows: draw a new one (and new heads of it).
        print(f"synth: {synth_dir} holds fewer than {total:,} rows; drawing it again",
              file=sys.stderr)
        shutil.rmtree(synth_dir)
        for name in os.listdir(args.work):
            if name == "valid.csv" or (name.startswith("train-") and name.endswith(".csv")):
                os.remove(os.path.join(args.work, name))
    if not os.path.exists(oracle):
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
