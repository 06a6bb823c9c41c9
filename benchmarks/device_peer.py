"""The pytorch-fm peer of `train_throughput.py` on a lent GPU machine, and what that machine has.

fm_keras needs TensorFlow 2.20 (+ tf-keras, TFRS, ScaNN); the lent GPU machine's image has
PyTorch but no TensorFlow, cannot reach a package registry, and takes at most 64 MiB of files
per call (BENCHMARKS.md "GPU machine" says what that rules out). This script records, in one
short call, what the machine offers and how fast the peer trains there on the same rows
`train_throughput.py` uses, so that a later comparison has its baseline.

Two steps:

    # here (TensorFlow machine): encode train_throughput's rows once, field-relative ids
    python benchmarks/device_peer.py --export-rows .devrows/rows.npz
    # there (torch only; torchfm carried as source in .devrows/torchfm):
    python3 benchmarks/device_peer.py --rows-file .devrows/rows.npz --torchfm-path .devrows

Prints the environment (Python, torch, CUDA, GPU, whether `import tensorflow` works, the CUDA
libraries' major versions) and, per device and batch size, torchfm's samples/s (median of
`--rounds` epochs after one warm-up epoch; CUDA timed with a synchronize before the clock).
"""

from __future__ import annotations

import argparse
import glob
import importlib
import os
import statistics
import sys


def export_rows(path: str, rows: int) -> None:
    """Writes train_throughput's encoded rows: ``x`` int32 [rows, 8] (ids relative to their
    field), ``y`` float32 [rows], ``field_dims`` int64 [8]."""
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from train_throughput import load_rows

    from fm_keras.config import ModelConfig
    from fm_keras.features import fit_features
    from fm_keras.model import build_model

    configs, split = load_rows(rows)
    fitted = fit_features(configs, split)
    model = build_model(fitted, ModelConfig(l2_embeddings=0.0, l2_linear=0.0))
    ids, _ = model.encoder.encode_numpy(split.features)
    x = (ids - np.asarray(model.encoder.offsets)).astype(np.int32)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez_compressed(path, x=x, y=split.labels.astype(np.float32),
                        field_dims=np.array([f.size for f in fitted], np.int64))
    print(f"wrote {path}: {len(x):,} rows, {int(sum(f.size for f in fitted)):,} ids")


def environment() -> None:
    """Prints what the machine has that matters for running fm_keras there."""
    import torch

    print(f"python {sys.version.split()[0]}  torch {torch.__version__}  "
          f"cuda available {torch.cuda.is_available()}  cpus {os.cpu_count()}")
    if torch.cuda.is_available():
        print(f"gpu {torch.cuda.get_device_name(0)}  torch cuda {torch.version.cuda}")
    for name in ("tensorflow", "tf_keras", "tensorflow_recommenders", "scann"):
        try:
            importlib.import_module(name)
            print(f"import {name}: ok")
        except ImportError as error:
            print(f"import {name}: {type(error).__name__}: {error}")
    libs = sorted({os.path.basename(p) for pattern in ("libcublas.so.*", "libcudnn.so.*",
                                                       "libcudart.so.*")
                   for p in glob.glob(os.path.join(sys.prefix, "lib", "python3*",
                                                   "site-packages", "nvidia", "**", pattern),
                                      recursive=True)})
    print(f"cuda libraries in {sys.prefix}: {libs or 'none found'}")


def peer_throughput(rows_file: str, devices: list[str], batch_sizes: list[int], rounds: int,
                    threads: int) -> None:
    """torchfm's FM, Adam (lr 0.002) as in train_throughput.py, per device and batch size."""
    import numpy as np
    import torch

    if not hasattr(np, "long"):  # torchfm 0.7.0 uses np.long, removed in NumPy 2
        np.long = np.int64
    from torchfm.model.fm import FactorizationMachineModel
    from torch_peer import torch_epoch

    data = np.load(rows_file)
    field_dims = [int(d) for d in data["field_dims"]]
    torch.set_num_threads(threads)
    for device in devices:
        if device == "cuda" and not torch.cuda.is_available():
            print("cuda: not available")
            continue
        x = torch.from_numpy(data["x"].astype(np.int64)).to(device)
        y = torch.from_numpy(data["y"]).to(device)
        for batch in batch_sizes:
            torch.manual_seed(0)
            model = FactorizationMachineModel(field_dims, 10).to(device)
            optimizer = torch.optim.Adam(model.parameters(), lr=0.002)
            loss_fn = torch.nn.BCELoss()

            def epoch() -> float:
                return torch_epoch(model, optimizer, x, y, batch, torch)

            epoch()  # warm-up
            seconds = [epoch() for _ in range(rounds)]
            rates = [len(y) / s for s in seconds]
            print(f"torchfm {device:4s} threads {threads:2d} batch {batch:5d}  "
                  f"{statistics.median(rates):>12,.0f} samples/s (median of {rounds}; "
                  f"{[round(r) for r in rates]})  last loss {loss_fn(model(x[:4096]), y[:4096]).item():.4f}",
                  flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export-rows", metavar="NPZ", help="write the rows here and stop")
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--rows-file", metavar="NPZ")
    parser.add_argument("--torchfm-path", help="a folder holding the torchfm package")
    parser.add_argument("--devices", default="cuda,cpu")
    parser.add_argument("--batch-sizes", default="1024,4096")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    if args.export_rows:
        export_rows(args.export_rows, args.rows)
        return
    if not args.rows_file:
        parser.error("give --export-rows NPZ (here) or --rows-file NPZ (on the GPU machine)")
    if args.torchfm_path:
        sys.path.insert(0, args.torchfm_path)
    environment()
    peer_throughput(args.rows_file, args.devices.split(","),
                    [int(b) for b in args.batch_sizes.split(",")], args.rounds, args.threads)


if __name__ == "__main__":
    main()
