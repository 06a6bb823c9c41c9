"""Batch-scoring benchmark: rows/s of `fm-keras score`, and peak memory vs input size.

Scores the synthetic test set, and the same rows repeated to an input several times larger,
each in a fresh `fm-keras score` process; prints rows/s (model call, reading and writing; not
the process start or model load) and the process's peak RSS. Streaming means the peak RSS
stays flat while the input grows.

    python benchmarks/scoring.py --model saved_models/ctr --data demo/data [--repeat 8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile


CHILD = """
import resource, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_module("fm_keras.cli", run_name="__main__")
finally:
    print("peak_rss_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def score(model: str, inputs: list[str], output: str) -> tuple[dict, float]:
    """Runs `fm-keras score` in a fresh process; returns its summary and peak RSS (MiB)."""
    proc = subprocess.run([sys.executable, "-c", CHILD, "fm-keras", "score", "--model", model,
                           "--input", *inputs, "--output", output, "--quiet"],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    peak = next(int(line.split()[1]) for line in proc.stderr.splitlines()
                if line.startswith("peak_rss_kib"))
    return json.loads(proc.stdout), peak / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="ranking export")
    parser.add_argument("--data", required=True, help="an 'fm-keras synth' directory")
    parser.add_argument("--repeat", type=int, default=8, help="size of the large input")
    parser.add_argument("--format", choices=("csv", "parquet"), default="csv")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="fm-score-bench-")
    test = os.path.join(args.data, "test.csv")
    big = os.path.join(work, "big.csv")
    with open(big, "w") as out, open(test) as src:
        header, body = src.readline(), src.read()
        out.write(header)
        for _ in range(args.repeat):
            out.write(body)
    print(f"{'input':28s} {'rows':>10s} {'rows/s':>10s} {'peak RSS MiB':>13s}")
    for label, inputs in (("test set", [test]), (f"test set x{args.repeat}", [big])):
        summary, peak = score(args.model, inputs, os.path.join(work, f"out.{args.format}"))
        print(f"{label:28s} {summary['rows']:10,d} {summary['rows_per_second']:10,d} "
              f"{peak:13,.0f}", flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
