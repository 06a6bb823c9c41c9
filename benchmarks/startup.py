"""Time to first result: the wall time of short `fm-keras` commands, this tree against another.

A new user's first runs are small, and so is every run of the test suite: there the fixed
costs (imports, building the parser, tracing graphs) are most of the time. Each round runs
every command once per tree, as its own process (``python -m fm_keras.cli``, the tree on
PYTHONPATH), the trees alternating which goes first; the figure per command is the median
wall time over rounds and the median of the per-round ratios (this tree / the other).

    python benchmarks/startup.py --baseline <checkout of another commit> [--rows 5000]
        [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def commands(data: str, run: str) -> dict[str, list[str]]:
    """The timed commands, by name; `run` is a run directory that `train` writes."""
    return {
        "--help": ["--help"],
        "train": ["train", "--config", os.path.join(data, "experiment.yaml"), "--out", run,
                  "--quiet"],
        "evaluate": ["evaluate", "--run", run, "--data", os.path.join(data, "test.csv")],
    }


def timed(tree: str, args: list[str], cwd: str) -> float:
    """Seconds of wall time of ``python -m fm_keras.cli ARGS`` importing fm_keras from `tree`.

    Raises:
        subprocess.CalledProcessError: the command failed (its stderr is printed).
    """
    env = {**os.environ, "PYTHONPATH": tree, "TF_CPP_MIN_LOG_LEVEL": "2"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fm_keras.cli", *args], cwd=cwd, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        print(proc.stderr, file=sys.stderr)
        proc.check_returncode()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="another checkout of fm-keras")
    parser.add_argument("--rows", type=int, default=5000, help="synthetic rows (80/10/10)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    trees = {"this": HERE, "baseline": os.path.abspath(args.baseline)}
    work = tempfile.mkdtemp(prefix="fm-startup-")
    try:
        data = os.path.join(work, "data")
        subprocess.run([sys.executable, "-m", "fm_keras.cli", "synth", "--out", data,
                        "--rows", str(args.rows)], check=True, env={**os.environ,
                       "PYTHONPATH": HERE}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times = {(t, c): [] for t in trees for c in commands(data, "")}
        for r in range(args.rounds):
            order = list(trees) if r % 2 == 0 else list(trees)[::-1]
            for tree in order:
                run = os.path.join(work, f"run-{tree}")
                shutil.rmtree(run, ignore_errors=True)
                for name, cmd in commands(data, run).items():
                    times[tree, name].append(timed(trees[tree], cmd, work))
            print(f"round {r}: " + ", ".join(
                f"{name} {times['this', name][-1]:.2f} / {times['baseline', name][-1]:.2f} s"
                for name in commands(data, "")), flush=True)
        print(f"\n{args.rows:,} synthetic rows, {args.rounds} rounds, load {os.getloadavg()[0]:.1f}"
              "\n| command | this tree, s (median) | baseline, s | ratio (median of rounds) |"
              "\n|---|---|---|---|")
        for name in commands(data, ""):
            this, base = times["this", name], times["baseline", name]
            ratio = statistics.median(a / b for a, b in zip(this, base))
            print(f"| `{name}` | {statistics.median(this):.2f} | {statistics.median(base):.2f} "
                  f"| {ratio:.2f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
