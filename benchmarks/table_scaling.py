"""Table-size scaling: time per training step and epoch-end work at fixed rows, 10k to 5M ids.

The same rows (8 hashed categorical fields, ids drawn uniformly in each field's range, random
labels) train an FM whose id space grows from 10k to 5M ids. A step's cost should depend on
the rows a batch touches, not on the table: for each optimizer (fm_keras' row-wise LazyAdam,
SparseAdagrad, SparseFtrl) the benchmark reports the time per step of one timed epoch after a
warm-up epoch, and the ratio to the smallest table. ``--stock-steps N`` times N steps of
tf_keras' own Adam/Adagrad/FTRL on the same model and rows in the same run (the peer).

Epoch-end work is the training callback's (`fm_keras.training.TrainingState`): the finite
check, the checkpoints and the state file, timed on an improving epoch and a non-improving
one, as a share of the timed epoch.

    python benchmarks/table_scaling.py [--rows 500000] [--ids 10000,100000,1000000,5000000]
        [--optimizers adam,adagrad,ftrl] [--batch-size 1024] [--stock-steps 40] [--zipf 1.2]
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from fm_keras._tf import keras, tf  # noqa: E402
from fm_keras.config import (DataConfig, ExperimentConfig, FeatureConfig,  # noqa: E402
                             ModelConfig, TrainingConfig)
from fm_keras.features import FittedFeature  # noqa: E402
from fm_keras.model import build_model, make_optimizer  # noqa: E402
from fm_keras.training import TrainingState, batched_dataset  # noqa: E402

FIELDS = 8
LEARNING_RATES = {"adam": 0.002, "adagrad": 0.1, "ftrl": 0.1}
STOCK = {"adam": lambda lr: keras.optimizers.Adam(lr),
         "adagrad": lambda lr: keras.optimizers.Adagrad(lr, initial_accumulator_value=0.1),
         "ftrl": lambda lr: keras.optimizers.Ftrl(lr)}


def experiment(num_ids: int, optimizer: str, batch_size: int) -> ExperimentConfig:
    features = tuple(FeatureConfig(f"f{j}", "categorical", "user" if j < 4 else "item",
                                   hash_buckets=num_ids // FIELDS) for j in range(FIELDS))
    training = TrainingConfig(optimizer=optimizer, learning_rate=LEARNING_RATES[optimizer],
                              batch_size=batch_size)
    return ExperimentConfig(DataConfig(train=("unused.csv",), label="click"), features,
                            ModelConfig(), training)


def encoded_rows(rows: int, num_ids: int, seed: int = 0, zipf: float | None = None):
    """Encoded slots as the encoder lays them out: field j owns ids [j*n, (j+1)*n).

    Ids are uniform in each field's range, or with `zipf` drawn by a power law of that
    exponent (as ids are in click logs: a few hot, a long tail) over a random order of ids.
    """
    rng = np.random.default_rng(seed)
    per_field = num_ids // FIELDS
    if zipf is None:
        local = rng.integers(0, per_field, size=(rows, FIELDS))
    else:
        rank = (rng.zipf(zipf, size=(rows, FIELDS)) - 1) % per_field
        local = rng.permutation(per_field)[rank]
    ids = (local + np.arange(FIELDS) * per_field).astype(np.int32)
    labels = (rng.random(rows) < 0.1).astype(np.float32)
    return ids, np.ones((rows, FIELDS), np.float32), labels


def time_steps(model, dataset, steps: int | None = None) -> float:
    """Seconds per step of one `fit` epoch (of `steps` batches when given)."""
    data = dataset.take(steps) if steps else dataset
    count = steps or int(dataset.cardinality())
    start = time.perf_counter()
    model.fit(data, epochs=1, verbose=0)
    return (time.perf_counter() - start) / count


def epoch_end_seconds(model, config: ExperimentConfig) -> tuple[float, float, float]:
    """TrainingState.on_epoch_end on an improving, then a non-improving epoch.

    Returns (improving, not improving, background) seconds: the first two block training;
    the third is the longest wait for a background (asynchronous) checkpoint write to finish
    after its epoch end returned, which in a run overlaps the next epoch.
    """
    run_dir = tempfile.mkdtemp(prefix="fm-bench-run-")
    try:
        state = TrainingState(run_dir, model, config, resume=False)
        state.set_model(model)
        blocking, background = [], 0.0
        for epoch, auc in enumerate((0.70, 0.69)):
            start = time.perf_counter()
            state.on_epoch_end(epoch, {"loss": 0.3, "val_auc": auc, "val_logloss": 0.3})
            blocking.append(time.perf_counter() - start)
            start = time.perf_counter()
            state.last.sync()
            state.best.sync()
            background = max(background, time.perf_counter() - start)
        return blocking[0], blocking[1], background
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--ids", default="10000,100000,1000000,5000000")
    parser.add_argument("--optimizers", default="adam,adagrad,ftrl")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--zipf", type=float, default=None,
                        help="draw ids by a power law of this exponent (default: uniform)")
    parser.add_argument("--stock-steps", type=int, default=40,
                        help="steps of tf_keras' own optimizer to time (0: skip the peer)")
    args = parser.parse_args()
    sizes = [int(x) for x in args.ids.split(",")]
    print(f"rows {args.rows:,}  fields {FIELDS}  k 10  batch {args.batch_size}  "
          f"steps_per_execution {TrainingConfig().steps_per_execution}  "
          f"ids {'zipf ' + str(args.zipf) if args.zipf else 'uniform'}  "
          f"load {os.getloadavg()[0]:.1f}  tensorflow {tf.__version__}", flush=True)
    base: dict[str, float] = {}
    for num_ids in sizes:
        ids, values, labels = encoded_rows(args.rows, num_ids, zipf=args.zipf)
        dataset = batched_dataset(ids, values, labels, np.ones(args.rows, np.float32),
                                  args.batch_size, shuffle_seed=0)
        steps = int(dataset.cardinality())
        for name in args.optimizers.split(","):
            config = experiment(num_ids, name, args.batch_size)
            features = tuple(FittedFeature(c) for c in config.features)
            keras.utils.set_random_seed(0)
            model = build_model(features, config.model, config.training)
            model.compile(optimizer=make_optimizer(config.training), weighted_metrics=[],
                          steps_per_execution=config.training.steps_per_execution)
            time_steps(model, dataset, min(steps, 64))  # warm-up: tracing, slot creation
            per_step = time_steps(model, dataset)
            base.setdefault(name, per_step)
            improving, flat, background = epoch_end_seconds(model, config)
            epoch_s = per_step * steps
            line = (f"ids {num_ids:>9,}  {name:8s} {per_step * 1e3:7.3f} ms/step "
                    f"({args.batch_size / per_step:>9,.0f} samples/s, "
                    f"{per_step / base[name]:.2f}x the {sizes[0]:,}-id step)  "
                    f"epoch {epoch_s:6.2f}s  epoch-end {improving * 1e3:6.0f} / "
                    f"{flat * 1e3:6.0f} ms (improving / not; "
                    f"{100 * max(improving, flat) / epoch_s:.1f}% of the epoch; background "
                    f"write {background * 1e3:.0f} ms)")
            if args.stock_steps:
                model.compile(optimizer=STOCK[name](LEARNING_RATES[name]),
                              weighted_metrics=[],
                              steps_per_execution=config.training.steps_per_execution)
                time_steps(model, dataset, min(args.stock_steps, 32))
                stock = time_steps(model, dataset, args.stock_steps)
                line += f"  | tf_keras {name}: {stock * 1e3:8.3f} ms/step ({stock / per_step:.1f}x)"
            print(line, flush=True)
            del model
            keras.backend.clear_session()
            gc.collect()


if __name__ == "__main__":
    main()
