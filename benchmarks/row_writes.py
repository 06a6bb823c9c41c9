"""Row reads and writes of a table: the ops a row-wise optimizer step is made of, by table size.

A step of `fm_keras.optimizers` touches a few thousand distinct rows of each table. This times,
alone, the ways TensorFlow reads and writes those rows of a [rows, k] float32 variable: a
`tf.gather`, a `scatter_update` (copies the new rows), a `scatter_sub` (applies ``-`` row by
row) and a `scatter_nd_update`, for a small table (fits the CPU caches) and a large one. Each
figure is the fastest of ``--blocks`` blocks of 5 calls of a `tf.function` (on a shared machine
the minimum is the figure least inflated by other processes); ``call`` is a `tf.function`
doing nothing, the overhead included in every other figure.

    python benchmarks/row_writes.py [--rows 10000,5000000] [--touched 8192] [--k 10]
        [--blocks 40]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from fm_keras._tf import tf  # noqa: E402


def fastest_ms(fn, arg, blocks: int) -> float:
    """Milliseconds per call of `fn(arg)`: the fastest block of 5 calls after 3 warm-ups."""
    for _ in range(3):
        fn(arg)
    best = float("inf")
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(5):
            fn(arg)
        best = min(best, (time.perf_counter() - start) / 5)
    return best * 1e3


def ops(table: tf.Variable, values: tf.Tensor) -> dict:
    """The timed functions of the distinct row indices [touched] of `table`."""
    def write(update):
        def fn(indices):
            update(indices)
            return tf.constant(0)
        return tf.function(fn)
    return {
        "call": tf.function(lambda indices: tf.reduce_sum(indices)),
        "gather": tf.function(lambda indices: tf.reduce_sum(tf.gather(table, indices))),
        "scatter_update": write(lambda i: table.scatter_update(tf.IndexedSlices(values, i))),
        "scatter_sub": write(lambda i: table.scatter_sub(tf.IndexedSlices(values, i))),
        "scatter_nd_update": write(lambda i: table.scatter_nd_update(i[:, None], values)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="10000,5000000")
    parser.add_argument("--touched", type=int, default=8192,
                        help="row indices drawn per step (deduplicated, as the optimizer's)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--blocks", type=int, default=40)
    args = parser.parse_args()
    print(f"k {args.k}  touched {args.touched} drawn  blocks {args.blocks} x 5 calls  "
          f"load {os.getloadavg()[0]:.1f}  tensorflow {tf.__version__}", flush=True)
    rng = np.random.default_rng(0)
    for rows in (int(x) for x in args.rows.split(",")):
        table = tf.Variable(tf.random.normal([rows, args.k]))
        indices = np.unique(rng.integers(0, rows, args.touched)).astype(np.int32)
        rng.shuffle(indices)
        values = tf.fill([len(indices), args.k], 0.01)
        times = {name: fastest_ms(fn, tf.constant(indices), args.blocks)
                 for name, fn in ops(table, values).items()}
        print(f"rows {rows:>10,}  distinct {len(indices):,}  "
              + "  ".join(f"{name} {ms:.3f} ms" for name, ms in times.items()), flush=True)


if __name__ == "__main__":
    main()
