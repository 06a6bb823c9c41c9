"""How fast can one FM training step be on this CPU? A whole step compiled by XLA, no Keras.

Issue 13 asks for 2x pytorch-fm's samples/s (must-show 3) and a step at 5M ids within 1.5x
of the step at 10k (must-show 2). fm_keras' Keras step is ~150 TensorFlow ops (BENCHMARKS.md
"Fused per-id rows"); this script measures what the same arithmetic costs when XLA compiles
the step into one kernel, to tell how far that route could go before anyone builds it.

The step: the FM of `fm_keras.layers.FactorizationMachine` (one [ids + 1, 1 + k] table of
w and v, 8 slots, k = 10, x = 1), logistic loss, L2 on the rows touched, and lazy Adam
(Kingma & Ba 2015, as `fm_keras.optimizers.LazyAdam`: only touched rows move) with the
per-step summing of duplicate ids done with static shapes, as XLA needs (`tf.unique` has a
dynamic shape): every slot writes its position into a persistent int32 [ids + 1] table at
its id, reads back one representative position per distinct id, and the gradients are
summed per representative (`unsorted_segment_sum`); duplicates then compute and write the
same new row.

Two ways of running it, per table size, in alternating rounds (fastest of --calls calls of
32 steps; ms per step and samples/s):

- ``loop``: 32 steps in one XLA computation, batches sliced from a constant (the floor);
- ``tf.data``: one XLA call per step, batches from a tf.data iterator (as Keras' `fit` with
  ``jit_compile`` would run it, without Keras' own per-step work).

    python benchmarks/xla_step.py [--ids 10000,25000,5000000] [--rounds 3] [--calls 15]
        [--layout split|fused]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

BATCH, SLOTS, K, LOOP = 1024, 8, 10, 32


class Step:
    """One table size: its variables, batches and the compiled step.

    Args:
        num_ids: ids in the table (each slot draws uniformly from its own num_ids / 8).
        batches: distinct batches to cycle through.
    """

    def __init__(self, num_ids: int, batches: int = 64, seed: int = 0):
        rng = np.random.default_rng(seed)
        per_slot = max(num_ids // SLOTS, 1)
        ids = rng.integers(0, per_slot, (batches, BATCH, SLOTS)) + np.arange(SLOTS) * per_slot
        self.ids = tf.constant(ids.astype(np.int32))
        self.labels = tf.constant(rng.integers(0, 2, (batches, BATCH)).astype(np.float32))
        self.table = tf.Variable(tf.random.normal([num_ids + 1, 1 + K], stddev=0.01, seed=seed))
        self.state = tf.Variable(tf.zeros([num_ids + 1, 2, 1 + K]))  # Adam's m and v
        self.positions = tf.Variable(tf.zeros([num_ids + 1], tf.int32))
        self.bias = tf.Variable(0.0)
        self.iterations = tf.Variable(0.0)
        self.loop = tf.function(self._loop, jit_compile=True)
        one = tf.function(self.step, jit_compile=True)
        batches_ds = tf.data.Dataset.from_tensor_slices((self.ids, self.labels)).repeat()
        iterator = iter(batches_ds.prefetch(4))

        @tf.function
        def fed(start):
            del start
            total = tf.constant(0.0)
            for _ in tf.range(LOOP):
                total += one(*next(iterator))
            return total
        self.fed = fed

    def step(self, ids, labels, lr=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-7, l2=1e-6):
        """One step on ids [BATCH, SLOTS] int32, labels [BATCH] float32; returns the loss."""
        flat = tf.reshape(ids, [-1])
        flat_rows, moments = self.read(flat)  # [n, 1 + K], [n, 2, 1 + K]: row, Adam's m, v
        rows = tf.reshape(flat_rows, [BATCH, SLOTS, 1 + K])
        with tf.GradientTape() as tape:
            tape.watch(rows)
            w, v = rows[..., 0], rows[..., 1:]
            summed = tf.reduce_sum(v, 1)
            logit = self.bias + tf.reduce_sum(w, 1) + 0.5 * tf.reduce_sum(
                summed * summed - tf.reduce_sum(v * v, 1), 1)
            loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels, logit)) \
                + l2 * tf.reduce_sum(rows * rows)
        grad_rows, grad_bias = tape.gradient(loss, [rows, self.bias])
        grad = tf.reshape(grad_rows, [-1, 1 + K])
        n = BATCH * SLOTS
        self.positions.scatter_nd_update(flat[:, None], tf.range(n))
        first = tf.gather(self.positions, flat)  # one position per distinct id
        grad = tf.gather(tf.math.unsorted_segment_sum(grad, first, n), first)
        self.iterations.assign_add(1.0)
        t = self.iterations
        m = beta_1 * moments[:, 0] + (1 - beta_1) * grad
        v = beta_2 * moments[:, 1] + (1 - beta_2) * grad * grad
        alpha = lr * tf.sqrt(1 - beta_2 ** t) / (1 - beta_1 ** t)
        self.write(flat, flat_rows - alpha * m / (tf.sqrt(v) + epsilon), m, v)
        self.bias.assign_sub(lr * grad_bias)
        return loss

    def read(self, flat):
        """The rows [n, 1 + K] and Adam's state [n, 2, 1 + K] of the ids `flat` [n]."""
        return tf.gather(self.table, flat), tf.gather(self.state, flat)

    def write(self, flat, rows, m, v):
        """Stores the new rows and Adam's m, v of the ids `flat` (duplicates write alike)."""
        self.table.scatter_nd_update(flat[:, None], rows)
        self.state.scatter_nd_update(flat[:, None], tf.stack([m, v], 1))

    def _loop(self, start):
        total = tf.constant(0.0)
        for i in tf.range(LOOP):
            j = (start + i) % self.ids.shape[0]
            total += self.step(tf.gather(self.ids, j), tf.gather(self.labels, j))
        return total


class FusedStep(Step):
    """`Step` with each id's row, Adam's m and its v in one [ids + 1, 3, 1 + K] variable: one
    gather of the three per slot and one scatter per step, where `Step` gathers the table,
    then the state, and scatters both (BENCHMARKS.md, session 11: at 5M ids the cache misses
    are what grows)."""

    def __init__(self, num_ids: int, batches: int = 64, seed: int = 0):
        super().__init__(num_ids, batches, seed)
        self.rows = tf.Variable(tf.concat([self.table[:, None], self.state], 1))
        del self.table, self.state

    def read(self, flat):
        full = tf.gather(self.rows, flat)  # one gather: [n, 3, 1 + K]
        return full[:, 0], full[:, 1:]

    def write(self, flat, rows, m, v):
        self.rows.scatter_nd_update(flat[:, None], tf.stack([rows, m, v], 1))  # one scatter


def check_fused_equals_split(num_ids: int = 40) -> float:
    """Max |difference| of the table and Adam state after 3 steps of `Step` and `FusedStep`
    from the same start on heavily duplicated ids (they must agree to float rounding)."""
    split, fused = Step(num_ids, batches=3), FusedStep(num_ids, batches=3)
    fused.rows.assign(tf.concat([split.table[:, None], split.state], 1))  # one start
    for i in range(3):
        split.step(split.ids[i], split.labels[i])
        fused.step(fused.ids[i], fused.labels[i])
    want = tf.concat([split.table[:, None], split.state], 1)
    return float(tf.reduce_max(tf.abs(want - fused.rows)))


def ms_per_step(fn, calls: int) -> float:
    """Fastest of `calls` calls of 32 steps, in ms per step (after one warm-up call)."""
    fn(tf.constant(0)).numpy()
    best = float("inf")
    for call in range(calls):
        start = time.perf_counter()
        fn(tf.constant(call * LOOP)).numpy()
        best = min(best, (time.perf_counter() - start) / LOOP * 1e3)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", default="10000,25000,5000000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=15)
    parser.add_argument("--layout", choices=("split", "fused"), default="split",
                        help="split: the table and Adam's state apart (today's layout); "
                        "fused: one [ids, 3, 1 + k] row per id (`FusedStep`)")
    args = parser.parse_args()
    sizes = [int(x) for x in args.ids.split(",")]
    if args.layout == "fused":
        print(f"fused vs split after 3 steps: max |difference| {check_fused_equals_split():.1e}")
    steps = {n: (FusedStep if args.layout == "fused" else Step)(n) for n in sizes}
    print(f"batch {BATCH}, {SLOTS} slots, k {K}, lazy Adam, {args.layout} rows; ms per step "
          f"(fastest of {args.calls} x {LOOP} steps); load {os.getloadavg()[0]:.1f}")
    results = {}
    for r in range(args.rounds):  # alternating order, so a load change hits every size
        for n in (sizes if r % 2 == 0 else sizes[::-1]):
            for mode in ("loop", "tf.data"):
                ms = ms_per_step(steps[n].loop if mode == "loop" else steps[n].fed, args.calls)
                results.setdefault((n, mode), []).append(ms)
                print(f"round {r} ids {n:>9,d} {mode:8s} {ms:6.3f} ms/step "
                      f"{BATCH / ms * 1e3:>11,.0f} samples/s", flush=True)
    for mode in ("loop", "tf.data"):
        low = min(results[(sizes[0], mode)])
        print(f"{mode:8s} " + "  ".join(
            f"{n:,} ids {min(results[(n, mode)]):.3f} ms ({min(results[(n, mode)]) / low:.2f}x)"
            for n in sizes))


if __name__ == "__main__":
    main()
