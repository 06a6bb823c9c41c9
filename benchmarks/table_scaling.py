"""Table-size scaling: time per training step and epoch-end work at fixed rows, 10k to 5M ids.

The same rows (8 hashed categorical fields, ids drawn uniformly in each field's range, random
labels) train an FM whose id space grows from 10k to 5M ids. A step's cost should depend on
the rows a batch touches, not on the table: for each optimizer (fm_keras' row-wise LazyAdam,
SparseAdagrad, SparseFtrl) the benchmark reports the time per step of one timed epoch after a
warm-up epoch (the fastest of ``--repeats`` timed epochs: on a shared machine the minimum is
the figure least inflated by other processes), and the ratio to the smallest table, in wall
time and in the process' CPU time (which other processes inflate less). The sizes are timed
in rounds, one epoch of each size per round, so that a change of the machine's load falls on
every size alike; the wall-time ratio of each round and their median are printed too.
``--stock-steps N`` times N steps of tf_keras' own Adam/Adagrad/FTRL on the same model and
rows in the same run (the peer).

Epoch-end work is the training callback's (`fm_keras.runs.TrainingState`): the finite
check, the best-weights copy, the checkpoint and the state file. It is timed on an improving
and a non-improving epoch without a checkpoint, and on the epochs that write one (the first
save of a run also builds TensorFlow's asynchronous-checkpoint copies; later ones reuse them);
large tables write one every `TrainingState.checkpoint_seconds` of training (600 s), small
ones every epoch. The amortized share is the mean epoch-end work per epoch over that
interval, as a share of the timed epoch. The validation pass (Keras' evaluation of
`--valid-rows` rows at the end of each epoch; O(rows), not O(table)) is timed too.

    python benchmarks/table_scaling.py [--rows 500000] [--ids 10000,100000,1000000,5000000]
        [--optimizers adam,adagrad,ftrl] [--batch-size 1024] [--stock-steps 40] [--zipf 1.2]
        [--valid-rows ROWS/10] [--repeats 1] [--keras-step]

`fm-keras train` runs with transparent huge pages where the machine has them
(`fm_keras.hugepages`); for the same here, start it with GLIBC_TUNABLES=glibc.malloc.hugetlb=1
(the header line prints what the process got).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import shutil
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("AUTOGRAPH_VERBOSITY", "0")

import numpy as np  # noqa: E402

from fm_keras import hugepages  # noqa: E402
from fm_keras._tf import keras, tf  # noqa: E402
from fm_keras.config import (DataConfig, ExperimentConfig, FeatureConfig,  # noqa: E402
                             ModelConfig, TrainingConfig)
from fm_keras.features import FittedFeature  # noqa: E402
from fm_keras import compiled_steps  # noqa: E402
from fm_keras.model import build_model, make_optimizer  # noqa: E402
from fm_keras.batches import batched_dataset  # noqa: E402
from fm_keras.checkpoints import trained_rows  # noqa: E402
from fm_keras.runs import TrainingState  # noqa: E402

FIELDS = 8
LEARNING_RATES = {"adam": 0.002, "adagrad": 0.1, "ftrl": 0.1}
STOCK = {"adam": lambda lr: keras.optimizers.Adam(lr),
         "adagrad": lambda lr: keras.optimizers.Adagrad(lr, initial_accumulator_value=0.1),
         "ftrl": lambda lr: keras.optimizers.Ftrl(lr)}


def experiment(num_ids: int, optimizer: str, batch_size: int) -> ExperimentConfig:
    features = tuple(FeatureConfig(f"f{j}", "categorical", "user" if j < 4 else "item",
                                   hash_buckets=num_ids // FIELDS) for j in range(FIELDS))
    training = TrainingConfig(optimizer=optimizer, learning_rate=LEARNING_RATES[optimizer],
                              batch_size=batch_size, epochs=100, early_stopping_patience=100)
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


def time_steps(model, dataset, steps: int | None = None) -> tuple[float, float]:
    """(wall, process CPU) seconds per step of one `fit` epoch (of `steps` batches when given).

    CPU time (all of the process' threads) is the figure least inflated by other processes
    on a shared machine; wall time is what a user waits.
    """
    data = dataset.take(steps) if steps else dataset
    count = steps or int(dataset.cardinality())
    wall, cpu = time.perf_counter(), time.process_time()
    model.fit(data, epochs=1, verbose=0)
    return (time.perf_counter() - wall) / count, (time.process_time() - cpu) / count


def epoch_end_seconds(model, config: ExperimentConfig, trained: np.ndarray
                      ) -> dict[str, float]:
    """TrainingState.on_epoch_end on the epochs of a run, in seconds; `trained` is the
    `trained_rows` mask of the training rows (the best-weights copy holds those rows).

    Returns {"improving_first", "improving", "flat"}: epoch ends without a checkpoint (the
    run's first new best, a later one, then none);
    {"checkpoint_first", "checkpoint"}: the first and a later epoch end that writes the
    checkpoint; "background": the longest wait for a background write to finish after its
    epoch end returned (in a run it overlaps the next epoch); "checkpoint_seconds": the
    interval of checkpoints for this model's table (0: every epoch); "setup": building the
    callback before training (the best-weights copies).
    """
    run_dir = tempfile.mkdtemp(prefix="fm-bench-run-")
    try:
        start = time.perf_counter()
        state = TrainingState(run_dir, model, config, resume=False, trained_rows=trained)
        setup = time.perf_counter() - start
        interval = state.checkpoint_seconds if state.large else 0.0
        state.set_model(model)
        state.on_train_begin()
        out, background = {"checkpoint_seconds": interval, "setup": setup}, 0.0
        epochs = (("improving_first", False), ("improving", False), ("flat", False),
                  ("checkpoint_first", True), ("checkpoint", True))
        for epoch, (name, due) in enumerate(epochs):
            if not state.large and not due:
                continue  # small tables checkpoint every epoch: the checkpoint rows say it
            state.checkpoint_seconds = 0.0 if due else math.inf
            start = time.perf_counter()
            auc = 0.70 + 0.01 * epoch if name.startswith("improving") else 0.6 - 0.01 * epoch
            state.on_epoch_end(epoch, {"loss": 0.3, "val_auc": auc, "val_logloss": 0.3})
            out[name] = time.perf_counter() - start
            start = time.perf_counter()
            state.last.sync()
            background = max(background, time.perf_counter() - start)
        out["background"] = background
        for name in ("improving_first", "improving", "flat"):
            out.setdefault(name, out["checkpoint"])
        return out
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def amortized_share(ends: dict[str, float], epoch_s: float) -> float:
    """Mean epoch-end work per epoch over one checkpoint interval, as a share of the epoch."""
    if not ends["checkpoint_seconds"]:
        return ends["checkpoint"] / epoch_s
    epochs = max(1, math.ceil(ends["checkpoint_seconds"] / epoch_s))
    plain = max(ends["improving_first"], ends["improving"], ends["flat"])
    return (plain * (epochs - 1) + ends["checkpoint_first"]) / epochs / epoch_s


def validation_seconds(model, rows: int, num_ids: int, zipf: float | None) -> float:
    """One validation pass over `rows` rows (batches of 8192, as training's)."""
    ids, values, labels = encoded_rows(rows, num_ids, seed=1, zipf=zipf)
    dataset = batched_dataset(ids, values, labels, np.ones(rows, np.float32), 8192)
    model.evaluate(dataset.take(1), verbose=0)  # tracing
    start = time.perf_counter()
    model.evaluate(dataset, verbose=0)
    return time.perf_counter() - start


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
    parser.add_argument("--valid-rows", type=int, default=None,
                        help="rows of the timed validation pass (default: rows / 10)")
    parser.add_argument("--keras-step", action="store_true",
                        help="time Keras' own train step instead of the compiled steps "
                        "(`training.compiled_steps`) that `fm-keras train` uses")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of timed epochs, one per table size each; the fastest "
                        "is reported")
    args = parser.parse_args()
    valid_rows = args.valid_rows or args.rows // 10
    sizes = [int(x) for x in args.ids.split(",")]
    print(f"rows {args.rows:,}  fields {FIELDS}  k 10  batch {args.batch_size}  "
          f"steps_per_execution {TrainingConfig().steps_per_execution}  repeats {args.repeats}  "
          f"ids {'zipf ' + str(args.zipf) if args.zipf else 'uniform'}  "
          f"load {os.getloadavg()[0]:.1f}  tensorflow {tf.__version__}  "
          f"transparent huge pages {hugepages.state()}", flush=True)
    data = {num_ids: Rows(args.rows, num_ids, args.zipf, args.batch_size) for num_ids in sizes}
    for name in args.optimizers.split(","):
        # One model per table size, timed in rounds that alternate between the sizes: a
        # change of the machine's load hits every size alike instead of one of them.
        models = {}
        for num_ids in sizes:
            config = experiment(num_ids, name, args.batch_size)
            features = tuple(FittedFeature(c) for c in config.features)
            keras.utils.set_random_seed(0)
            model = build_model(features, config.model, config.training)
            model.compile(optimizer=make_optimizer(config.training), weighted_metrics=[],
                          steps_per_execution=config.training.steps_per_execution)
            if not args.keras_step:  # the step `fm-keras train` chooses (compiled)
                print(f"ids {num_ids:,} {name}: "
                      f"{compiled_steps.choose(model, config.training, args.rows, True)}")
            rows = data[num_ids]
            time_steps(model, rows.dataset)  # warm-up epoch: tracing, slots, the last short execution
            models[num_ids] = (model, config)
        timings = {num_ids: [] for num_ids in sizes}
        for _ in range(args.repeats):
            for num_ids in sizes:
                timings[num_ids].append(time_steps(models[num_ids][0], data[num_ids].dataset))
        for num_ids in sizes:
            model, config = models[num_ids]
            line = report(name, num_ids, sizes[0], timings, model, config, data[num_ids],
                          args, valid_rows)
            if args.stock_steps:
                dataset = data[num_ids].dataset
                model.compile(optimizer=STOCK[name](LEARNING_RATES[name]),
                              weighted_metrics=[],
                              steps_per_execution=config.training.steps_per_execution)
                time_steps(model, dataset, min(args.stock_steps, 32))
                stock = time_steps(model, dataset, args.stock_steps)[0]
                per_step = min(t[0] for t in timings[num_ids])
                line += f"  | tf_keras {name}: {stock * 1e3:8.3f} ms/step ({stock / per_step:.1f}x)"
            print(line, flush=True)
        del models, model
        keras.backend.clear_session()
        gc.collect()


class Rows:
    """A table size's training rows (`encoded_rows`) and their shuffled batches."""

    def __init__(self, rows: int, num_ids: int, zipf: float | None, batch_size: int):
        self.ids, values, labels = encoded_rows(rows, num_ids, zipf=zipf)
        self.dataset = batched_dataset(self.ids, values, labels, np.ones(rows, np.float32),
                                       batch_size, shuffle_seed=0)
        self.steps = int(self.dataset.cardinality())


def report(name: str, num_ids: int, smallest: int, timings: dict, model, config, rows: Rows,
           args, valid_rows: int) -> str:
    """One size's line: time per step (fastest round, and the median over rounds of the
    ratio to the smallest table in the same round), then its epoch-end work."""
    per_step, cpu = (min(t[i] for t in timings[num_ids]) for i in (0, 1))
    base, base_cpu = (min(t[i] for t in timings[smallest]) for i in (0, 1))
    rounds = [t[0] / b[0] for t, b in zip(timings[num_ids], timings[smallest])]
    trained = trained_rows(num_ids, rows.ids)
    ends = epoch_end_seconds(model, config, trained)
    valid_s = validation_seconds(model, valid_rows, num_ids, args.zipf)
    epoch_s = per_step * rows.steps
    plain = max(ends["improving_first"], ends["improving"], ends["flat"])
    every = (f"every {ends['checkpoint_seconds']:.0f} s" if ends["checkpoint_seconds"]
             else "every epoch")
    per_round = f"; rounds {', '.join(f'{t[0] * 1e3:.2f}' for t in timings[num_ids])} ms"
    if num_ids != smallest:
        per_round += (f", ratio {', '.join(f'{r:.2f}' for r in rounds)}, median "
                      f"{float(np.median(rounds)):.2f}x")
    return (f"ids {num_ids:>9,}  {name:8s} {per_step * 1e3:7.3f} ms/step "
            f"({args.batch_size / per_step:>9,.0f} samples/s, "
            f"{per_step / base:.2f}x the {smallest:,}-id step{per_round}; CPU "
            f"{cpu * 1e3:.3f} ms/step, {cpu / base_cpu:.2f}x)  "
            f"epoch {epoch_s:6.2f}s  epoch-end {ends['improving_first'] * 1e3:5.0f} / "
            f"{ends['improving'] * 1e3:5.0f} / {ends['flat'] * 1e3:5.0f} ms (first "
            "best / a later best / no gain, "
            f"{100 * plain / epoch_s:.1f}% of the epoch)  checkpoint {every}: "
            f"{ends['checkpoint_first'] * 1e3:5.0f} first / "
            f"{ends['checkpoint'] * 1e3:5.0f} ms, background write "
            f"{ends['background'] * 1e3:.0f} ms  setup {ends['setup'] * 1e3:.0f} ms  "
            f"(trained rows {100 * np.mean(trained):.0f}% of the table)  "
            "amortized "
            f"{100 * amortized_share(ends, epoch_s):.1f}%  validation pass "
            f"({valid_rows:,} rows) {valid_s * 1e3:.0f} ms "
            f"({100 * valid_s / epoch_s:.1f}%)")

if __name__ == "__main__":
    main()
