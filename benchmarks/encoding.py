"""Encoding in-memory rows (`FeatureEncoder.encode_numpy`, what `train` runs on every split):
seconds per feature and for all features together, fastest of --repeat.

Encoding is the largest fixed cost of a `train` after TensorFlow's import (the demo's 680k
training rows: ~5 s). The same kernels run in the ranking export's signatures, per request.

    python benchmarks/encoding.py [--rows 200000] [--config EXPERIMENT_YAML] [--repeat 3]

Without --config, `fm-keras synth`'s data (1M rows, in a temporary directory) is generated
first and its training split is used; --rows encodes that many of the split's rows.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from fm_keras.config import load_experiment  # noqa: E402
from fm_keras.data import load_data_split  # noqa: E402
from fm_keras.features import FeatureEncoder, fit_features  # noqa: E402


def fastest(encoder: FeatureEncoder, columns: dict, names, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        encoder.encode_numpy(columns, names=names)
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000, help="training rows to encode")
    parser.add_argument("--config", help="an experiment YAML (default: fm-keras synth's data)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = None
    config_path = args.config
    if config_path is None:
        from fm_keras.synth import generate

        work = tempfile.mkdtemp(prefix="fm-encoding-bench-")
        generate(work, rows=1_000_000, seed=3)
        config_path = os.path.join(work, "experiment.yaml")
    try:
        config = load_experiment(config_path)
        split = load_data_split(config.data, "train", config.features, config.model.task)
        encoder = FeatureEncoder(fit_features(config.features, split))
        columns = {k: v[:args.rows] for k, v in split.features.items()}
        rows = len(next(iter(columns.values())))
        print(f"{rows:,} rows of {config_path}, fastest of {args.repeat}, "
              f"load {os.getloadavg()[0]:.1f}")
        for f in encoder.features:
            seconds = fastest(encoder, columns, [f.config.name], args.repeat)
            print(f"  {f.config.name:24s} {f.config.kind:12s} {seconds:7.3f} s")
        seconds = fastest(encoder, columns, None, args.repeat)
        print(f"  {'all features':37s} {seconds:7.3f} s ({rows / seconds:,.0f} rows/s)")
    finally:
        if work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
