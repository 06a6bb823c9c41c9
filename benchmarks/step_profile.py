"""What one training step is made of: tf.data, forward, backward, optimizer, Keras; op by op.

On the rows of `table_scaling.py` (8 fields, ids uniform in each field's range, k = 10, the
default L2 and `l2_prior`, batch 1024) the script times, per step and for each `--ids`:

- ``fit``: Keras `fit` of one epoch (`steps_per_execution` 32), wall and process CPU time;
- the same 32-step graph loop cut short: ``data`` (tf.data only), ``forward`` (loss and
  penalties), ``forward+backward`` (their gradients), ``step`` (the model's `train_step`:
  gradients and the optimizer), as process CPU time (the least inflated by other processes on a
  shared machine; fastest of 3 x 6 calls);
- an op profile of 64 steps of ``step`` (TensorFlow profiler trace): time per step by op type
  and by op, the top `--top` of each.

    python benchmarks/step_profile.py [--ids 25000,5000000] [--optimizer adam] [--rows 200000]
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import shutil
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from table_scaling import encoded_rows, experiment  # noqa: E402
from tensorflow.tsl.profiler.protobuf import xplane_pb2  # noqa: E402

from fm_keras._tf import keras, tf  # noqa: E402
from fm_keras.batches import batched_dataset  # noqa: E402
from fm_keras.features import FittedFeature  # noqa: E402
from fm_keras.model import build_model, make_optimizer  # noqa: E402

LOOP = 32  # steps per graph call, as steps_per_execution


def parts(model):
    """The step cut short: {name: tf.function(iterator) running LOOP steps of that part}."""
    def penalties():
        return tf.add_n([tf.reduce_sum(x) for x in model.losses])

    def forward(batch):
        return model.compute_loss(batch, training=True) + penalties()

    def backward(batch):
        with tf.GradientTape() as tape:
            loss = forward(batch)
        grads = tape.gradient(loss, model.trainable_variables)
        return tf.add_n([tf.reduce_sum(g.values if isinstance(g, tf.IndexedSlices) else g)
                         for g in grads])

    def looped(body):
        @tf.function
        def run(iterator):
            total = tf.constant(0.0)
            for _ in tf.range(LOOP):
                total += body(next(iterator))
            return total
        return run

    return {"data": looped(lambda batch: tf.reduce_sum(batch[1])),
            "forward": looped(forward),
            "forward+backward": looped(backward),
            "step": looped(lambda batch: model.train_step(batch)["total_loss"])}


def cpu_ms_per_step(run, iterator, calls: int = 6, repeats: int = 3) -> float:
    run(iterator)  # tracing
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(calls):
            run(iterator)
        best = min(best, (time.process_time() - start) / (calls * LOOP) * 1e3)
    return best


def op_profile(run, iterator, calls: int = 2) -> tuple[collections.Counter, collections.Counter]:
    """(ms per step by op type, by op name) of `calls` graph calls, from a profiler trace."""
    logdir = tempfile.mkdtemp(prefix="fm-step-profile-")
    tf.profiler.experimental.start(logdir)
    for _ in range(calls):
        run(iterator)
    tf.profiler.experimental.stop()
    space = xplane_pb2.XSpace()
    with open(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)[0], "rb") as f:
        space.ParseFromString(f.read())
    shutil.rmtree(logdir, ignore_errors=True)
    by_type, by_name = collections.Counter(), collections.Counter()
    steps = calls * LOOP
    for plane in space.planes:
        if "host:CPU" not in plane.name:
            continue
        for line in plane.lines:
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if ":" not in name or "::" in name or " " in name:
                    continue  # executor and runtime spans (A::B), which contain the ops
                ms = event.duration_ps / 1e9 / steps
                by_type[name.rsplit(":", 1)[1]] += ms
                by_name[name] += ms
    return by_type, by_name


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", default="25000,5000000")
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    print(f"rows {args.rows:,}  batch {args.batch_size}  optimizer {args.optimizer}  "
          f"load {os.getloadavg()[0]:.1f}  tensorflow {tf.__version__}", flush=True)
    for num_ids in (int(x) for x in args.ids.split(",")):
        ids, values, labels = encoded_rows(args.rows, num_ids)
        dataset = batched_dataset(ids, values, labels, np.ones(args.rows, np.float32),
                                  args.batch_size, shuffle_seed=0)
        steps = int(dataset.cardinality())
        config = experiment(num_ids, args.optimizer, args.batch_size)
        keras.utils.set_random_seed(0)
        model = build_model(tuple(FittedFeature(c) for c in config.features), config.model,
                            config.training)
        model.compile(optimizer=make_optimizer(config.training), weighted_metrics=[],
                      steps_per_execution=LOOP)
        model.fit(dataset.take(2 * LOOP), epochs=1, verbose=0)  # tracing, slots
        wall, cpu = time.perf_counter(), time.process_time()
        model.fit(dataset, epochs=1, verbose=0)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        line = [f"ids {num_ids:>9,}  fit {wall / steps * 1e3:.3f} ms/step wall, "
                f"{cpu / steps * 1e3:.3f} CPU"]
        iterator = iter(dataset.repeat())
        runs = parts(model)
        for name, run in runs.items():
            line.append(f"{name} {cpu_ms_per_step(run, iterator):.3f}")
        print("  |  ".join(line) + "  (CPU ms/step)", flush=True)
        by_type, by_name = op_profile(runs["step"], iterator)
        print(f"  op time {sum(by_type.values()):.3f} ms/step; by type: " + ", ".join(
            f"{t} {ms:.3f}" for t, ms in by_type.most_common(args.top)))
        for name, ms in by_name.most_common(args.top):
            print(f"    {ms:7.3f} ms/step  {name}")
        del model
        keras.backend.clear_session()


if __name__ == "__main__":
    main()
