"""The memory floor of a row-wise training step: what the rows a batch touches cost to read and
write, by table size, with no arithmetic (issue 13 must-show 2).

A row-wise optimizer step must, for every distinct id of the batch, read and write the id's
row of the FM table ([ids, 1 + k]), its optimizer state (Adam: m and v, [ids, 2, 1 + k]) and
its prior row ([ids, 2]). At 10k ids these fit in the CPU caches; at 5M ids (660 MB) each is a
cache and TLB miss. This script times exactly that traffic, one XLA computation of 32 steps
per call as `fm_keras.compiled_steps` runs them, for today's layout (three variables) and for
one fused [ids, 3 * (1 + k) + 2] row per id, and prints the extra milliseconds per step at
each size over the smallest. Added to the compiled step at the smallest size, that extra is the
least a step at the larger size can cost: (T_small + extra) / T_small is a floor for
must-show 2's ratio at that step speed.

    python benchmarks/memory_floor.py [--ids 10000,5000000] [--rounds 5] [--calls 10]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from xla_step import BATCH, K, LOOP, SLOTS, ms_per_step  # noqa: E402  (benchmarks/xla_step.py)


class Traffic:
    """The per-step row traffic of a table of `num_ids` ids in one layout.

    Args:
        num_ids: ids in the table; each of the 8 slots draws uniformly from its own eighth.
        fused: one [ids, 3 * (1 + K) + 2] row per id instead of three variables.
    """

    def __init__(self, num_ids: int, fused: bool, batches: int = 64, seed: int = 0):
        rng = np.random.default_rng(seed)
        per_slot = max(num_ids // SLOTS, 1)
        ids = rng.integers(0, per_slot, (batches, BATCH * SLOTS)) \
            + np.tile(np.arange(SLOTS) * per_slot, BATCH)
        self.ids = tf.constant(ids.astype(np.int32))
        width = 3 * (1 + K) + 2
        if fused:
            self.variables = [tf.Variable(tf.fill([num_ids, width], 0.5))]
        else:
            self.variables = [tf.Variable(tf.fill([num_ids, 1 + K], 0.5)),
                              tf.Variable(tf.fill([num_ids, 2, 1 + K], 0.5)),
                              tf.Variable(tf.fill([num_ids, 2], 0.5))]
        self.loop = tf.function(self._loop, jit_compile=True)

    def _loop(self, start):
        for i in tf.range(LOOP):
            flat = tf.gather(self.ids, (start + i) % self.ids.shape[0])
            for v in self.variables:  # read every touched row, write it back changed
                v.scatter_nd_update(flat[:, None], tf.gather(v, flat) * 0.999)
        return start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", default="10000,5000000")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=10)
    args = parser.parse_args()
    sizes = [int(x) for x in args.ids.split(",")]
    layouts = ("split", "fused")
    traffic = {(n, lay): Traffic(n, lay == "fused") for n in sizes for lay in layouts}
    print(f"batch {BATCH} x {SLOTS} slots, k {K}: rows read and written per step, no arithmetic;"
          f" ms per step (fastest of {args.calls} x {LOOP}); load {os.getloadavg()[0]:.1f}")
    times = {key: [] for key in traffic}
    for r in range(args.rounds):  # alternating order: a load change hits every size
        order = list(traffic) if r % 2 == 0 else list(traffic)[::-1]
        for key in order:
            times[key].append(ms_per_step(traffic[key].loop, args.calls))
        print(f"round {r}: " + "  ".join(f"{n:,} {lay} {times[(n, lay)][-1]:.3f}"
                                         for n, lay in traffic), flush=True)
    for lay in layouts:
        low = min(times[(sizes[0], lay)])
        print(f"{lay:6s} " + "  ".join(
            f"{n:,} ids {min(times[(n, lay)]):.3f} ms (+{min(times[(n, lay)]) - low:.3f})"
            for n in sizes))


if __name__ == "__main__":
    main()
