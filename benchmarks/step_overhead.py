"""Per-step overhead: fm_keras training samples/s over batch sizes and steps_per_execution.

The same encoded rows as `train_throughput.py` (synthetic, 8 categorical fields, k = 10, no L2)
train one epoch per setting after a warm-up epoch; the settings are visited in rounds (every
setting once per round) so machine noise hits all alike, and the median per setting is shown.

    python benchmarks/step_overhead.py [--rows 300000] [--batch-sizes 1024,2048,4096]
        [--steps-per-execution 1,8,32,128] [--optimizers adagrad,adam] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from train_throughput import load_rows  # noqa: E402

from fm_keras._tf import keras, tf  # noqa: E402
from fm_keras.config import ModelConfig, TrainingConfig  # noqa: E402
from fm_keras.features import fit_features  # noqa: E402
from fm_keras.model import build_model, make_optimizer  # noqa: E402
from fm_keras.batches import batched_dataset  # noqa: E402

LEARNING_RATES = {"adam": 0.002, "adagrad": 0.1, "ftrl": 0.1}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--batch-sizes", default="1024,2048,4096")
    parser.add_argument("--steps-per-execution", default="1,8,32,128")
    parser.add_argument("--optimizers", default="adagrad,adam")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    configs, split = load_rows(args.rows)
    fitted = fit_features(configs, split)
    encoder = build_model(fitted, ModelConfig()).encoder
    ids, values = encoder.encode_numpy(split.features)
    n = len(ids)
    print(f"rows {n:,}  ids {encoder.num_ids:,}  k 10  load {os.getloadavg()[0]:.1f}  "
          f"tensorflow {tf.__version__}", flush=True)
    settings = [(o, int(b), int(s)) for o in args.optimizers.split(",")
                for b in args.batch_sizes.split(",") for s in args.steps_per_execution.split(",")]
    runs = {}
    for name, batch, spe in settings:
        keras.utils.set_random_seed(0)
        model = build_model(fitted, ModelConfig(l2_embeddings=0.0, l2_linear=0.0))
        training = TrainingConfig(optimizer=name, learning_rate=LEARNING_RATES[name],
                                  batch_size=batch)
        model.compile(optimizer=make_optimizer(training), steps_per_execution=spe,
                      weighted_metrics=[])
        ds = batched_dataset(ids, values, split.labels, np.ones(n, np.float32), batch,
                             shuffle_seed=0)
        model.fit(ds, epochs=1, verbose=0)  # warm-up: tracing
        runs[(name, batch, spe)] = (model, ds, [])
    for _ in range(args.rounds):
        for model, ds, rates in runs.values():
            start = time.perf_counter()
            model.fit(ds, epochs=1, verbose=0)
            rates.append(n / (time.perf_counter() - start))
    for (name, batch, spe), (_, _, rates) in runs.items():
        print(f"{name:8s} batch {batch:>5}  steps_per_execution {spe:>4}  "
              f"{statistics.median(rates):>10,.0f} samples/s (median of {args.rounds}; "
              f"rounds {[round(r) for r in rates]})", flush=True)


if __name__ == "__main__":
    main()
