"""pytorch-fm's training epoch as the peer benchmarks time it (torch only: no TensorFlow here,
so that it also runs where TensorFlow is not installed, e.g. `device_peer.py` on a GPU machine)."""

from __future__ import annotations

import time


def torch_epoch(model, optimizer, x, y, batch_size, torch) -> float:
    """One epoch over `x` [rows, fields] int64 / `y` [rows] float32 in a random order, on their
    device; returns its seconds (CUDA work synchronized before each clock read)."""
    loss_fn = torch.nn.BCELoss()
    perm = torch.randperm(len(y), device=y.device)
    cuda = y.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for b in range(0, len(y), batch_size):
        i = perm[b:b + batch_size]
        loss = loss_fn(model(x[i]), y[i])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start
