"""Training throughput: fm_keras vs pytorch-fm (torchfm) on the same rows, k and batch size.

Both train the same categorical FM (torchfm takes only categorical fields, so the multi-hot
tags become the first tag and the price a 10-bucket feature) on the same encoded ids, with the
same optimizer, learning rate, k and batch size. Data is encoded once, outside the timed
epochs, for both. Rounds alternate one fm_keras epoch and one torchfm epoch so that machine
noise hits both alike (which goes first alternates too, and each epoch starts after a short
pause); the figure is the median per-round ratio. fm_keras trains with the compiled steps
`fm-keras train` uses (`training.compiled_steps`), or Keras' own step with --keras-step.

    python benchmarks/train_throughput.py [--rows 500000] [--batch-size 1024] [--rounds 3]
        [--keras-step]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from fm_keras._tf import keras, tf  # noqa: E402
from fm_keras.config import FeatureConfig, ModelConfig, TrainingConfig  # noqa: E402
from fm_keras.data import load_split  # noqa: E402
from fm_keras.features import fit_features  # noqa: E402
from fm_keras.model import build_model, make_optimizer  # noqa: E402
from fm_keras.synth import generate  # noqa: E402
from fm_keras.batches import batched_dataset  # noqa: E402
from torch_peer import torch_epoch  # noqa: E402

SETTLE_SECONDS = 0.5  # pause before each timed epoch
FIELDS = ["user_id", "user_segment", "item_id", "item_category", "first_tag", "price_bucket",
          "device", "hour"]


def load_rows(rows: int):
    out = tempfile.mkdtemp(prefix="fm-bench-")
    generate(out, rows=int(rows / 0.8) + 1, seed=7)
    configs = [FeatureConfig(f, "categorical", "user") for f in FIELDS if f != "price_bucket"]
    configs.append(FeatureConfig("price_bucket", "numeric", "item", buckets=10))
    raw = [FeatureConfig(n, "categorical", "user") for n in FIELDS[:4] + ["device", "hour"]]
    raw += [FeatureConfig("item_tags", "categorical", "item"),
            FeatureConfig("item_price", "numeric", "item")]
    split = load_split([os.path.join(out, "train.csv")], raw, "click")
    split.features["first_tag"] = np.array([t.split("|")[0] for t in split.features["item_tags"]],
                                           dtype=object)
    split.features["price_bucket"] = split.features["item_price"]
    return configs, split


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--optimizers", default="adam,adagrad")
    parser.add_argument("--steps-per-execution", type=int,
                        default=TrainingConfig().steps_per_execution)
    parser.add_argument("--keras-step", action="store_true",
                        help="fm_keras with Keras' own train step (one graph step at a time), "
                        "not the default `CompiledSteps` (many steps per XLA call)")
    args = parser.parse_args()

    if not hasattr(np, "long"):  # torchfm 0.7.0 uses np.long, removed in NumPy 2
        np.long = np.int64
    import torch
    from torchfm.model.fm import FactorizationMachineModel

    torch.set_num_threads(2)
    configs, split = load_rows(args.rows)
    fitted = fit_features(configs, split)
    t0 = time.perf_counter()
    model = build_model(fitted, ModelConfig(l2_embeddings=0.0, l2_linear=0.0))
    ids, values = model.encoder.encode_numpy(split.features)
    encode_s = time.perf_counter() - t0
    n = len(ids)
    offsets = np.asarray(model.encoder.offsets)
    field_dims = [f.size for f in fitted]
    x_torch = torch.from_numpy((ids - offsets).astype(np.int64))
    y_torch = torch.from_numpy(split.labels.astype(np.float32))
    print(f"rows {n:,}  fields {len(FIELDS)}  ids {model.encoder.num_ids:,}  k 10  "
          f"batch {args.batch_size}  encode once {encode_s:.1f}s ({n / encode_s:,.0f} rows/s)")
    print(f"tensorflow {tf.__version__}  torch {torch.__version__}  threads: tf default, torch 2")

    for name in args.optimizers.split(","):
        lr = {"adam": 0.002, "adagrad": 0.1}[name]
        training = TrainingConfig(optimizer=name, learning_rate=lr, batch_size=args.batch_size)
        keras.utils.set_random_seed(0)
        ours = build_model(fitted, ModelConfig(l2_embeddings=0.0, l2_linear=0.0))
        ours.compile(optimizer=make_optimizer(training),
                     steps_per_execution=args.steps_per_execution, weighted_metrics=[])
        if not args.keras_step:  # what `fm-keras train` does
            why = ours.use_compiled_steps(args.batch_size)
            assert why is None, why
        ds = batched_dataset(ids, values, split.labels, np.ones(n, np.float32),
                             args.batch_size, shuffle_seed=0)
        peer = FactorizationMachineModel(field_dims, 10)
        peer_opt = (torch.optim.Adam(peer.parameters(), lr=lr) if name == "adam"
                    else torch.optim.Adagrad(peer.parameters(), lr=lr))
        ours.fit(ds, epochs=1, verbose=0)  # warm-up: tracing and first-touch allocation
        torch_epoch(peer, peer_opt, x_torch, y_torch, args.batch_size, torch)
        ratios, ours_sps, peer_sps = [], [], []
        for r in range(args.rounds):
            # Which library goes first alternates; each epoch starts after a pause, so that
            # the other library's idle worker threads (which spin a while) have gone quiet.
            for library in (("ours", "peer") if r % 2 == 0 else ("peer", "ours")):
                time.sleep(SETTLE_SECONDS)
                if library == "ours":
                    start = time.perf_counter()
                    ours.fit(ds, epochs=1, verbose=0)
                    ours_sps.append(n / (time.perf_counter() - start))
                else:
                    peer_sps.append(n / torch_epoch(peer, peer_opt, x_torch, y_torch,
                                                    args.batch_size, torch))
            ratios.append(ours_sps[-1] / peer_sps[-1])
        print(f"{name:8s} fm_keras {statistics.median(ours_sps):>10,.0f} samples/s   "
              f"torchfm {statistics.median(peer_sps):>10,.0f} samples/s   "
              f"ratio (median of {args.rounds} rounds) {statistics.median(ratios):.2f}x  "
              f"rounds {[round(r, 2) for r in ratios]}", flush=True)
        print(f"{'':8s} per round: fm_keras {[round(x / 1e3) for x in ours_sps]}k, "
              f"torchfm {[round(x / 1e3) for x in peer_sps]}k samples/s", flush=True)


if __name__ == "__main__":
    main()
