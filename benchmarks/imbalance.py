"""Imbalance study and data-quality check on the default synthetic set.

Trains the default experiment with: no weighting, pos_weight, negative downsampling, and (with
pos_weight) the cached-exposure filter turned off. All are scored on the same user-initiated
test rows (is_cached == 0) against the oracle of the true probabilities.

    python benchmarks/imbalance.py [--rows 1000000] [--data DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from fm_keras.config import load_experiment  # noqa: E402
from fm_keras.evaluation import evaluate_run  # noqa: E402
from fm_keras.synth import generate  # noqa: E402
from fm_keras.training import train  # noqa: E402

VARIANTS = {
    "no weighting": {"training": {"pos_weight": None}},
    "pos_weight 4": {"training": {"pos_weight": 4.0}},
    "downsample negatives 0.25": {"training": {"pos_weight": None, "neg_sample_rate": 0.25}},
    "pos_weight 4, cached filter OFF": {"training": {"pos_weight": 4.0}, "filters": ()},
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--data", help="an existing 'fm-keras synth' directory")
    args = parser.parse_args()
    data = args.data or tempfile.mkdtemp(prefix="fm-imbalance-")
    if not args.data:
        generate(data, rows=args.rows)
    oracle = json.load(open(os.path.join(data, "oracle.json")))
    base = load_experiment(os.path.join(data, "experiment.yaml"))
    print(f"oracle test AUC {oracle['auc']:.4f}  logloss {oracle['logloss']:.4f}  "
          f"positive rate {oracle['positive_rate']:.4f}  rows {oracle['rows']:,}")
    print(f"{'variant':34s} {'AUC':>7s} {'AUC gap':>8s} {'logloss':>8s} {'mean p/obs':>11s} "
          f"{'ECE':>7s} {'raw logloss':>12s} {'raw mean p/obs':>15s}")
    for name, change in VARIANTS.items():
        config = dataclasses.replace(
            base, training=dataclasses.replace(base.training, **change["training"]))
        if "filters" in change:
            config = dataclasses.replace(config, data=dataclasses.replace(
                config.data, filters=change["filters"]))
        run_dir = tempfile.mkdtemp(prefix="run-", dir=data)
        os.rmdir(run_dir)
        train(config, run_dir, verbose=0)
        # Evaluate every variant on the same clean rows: the base config's filters.
        metrics = evaluate_run(run_dir, os.path.join(data, "test.csv"),
                               filters=base.data.filters)
        raw = metrics.get("raw", metrics)
        print(f"{name:34s} {metrics['auc']:7.4f} {oracle['auc'] - metrics['auc']:8.4f} "
              f"{metrics['logloss']:8.4f} {metrics['calibration_ratio']:11.3f} "
              f"{metrics['ece']:7.4f} {raw['logloss']:12.4f} {raw['calibration_ratio']:15.3f}",
              flush=True)


if __name__ == "__main__":
    main()
