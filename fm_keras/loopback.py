"""Loopback clusters: every task of a TF_CONFIG cluster as a process on this machine.

For tests, benchmarks and trying a distributed experiment before deploying it. Each task is
an ordinary ``fm-keras`` process with its own ``TF_CONFIG`` on a free localhost port, exactly
what a Kubernetes pod runs (see docs/distributed.md); nothing here is cluster logic, only
process bookkeeping: every process is bounded in time and killed when the block ends.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field


def free_ports(n: int) -> list[int]:
    """`n` distinct localhost ports that were free a moment ago."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("localhost", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def cluster_spec(workers: int, ps: int = 0, chief: bool = False) -> dict[str, list[str]]:
    """A TF_CONFIG cluster of localhost addresses: ``{"chief": [...], "worker": [...], ...}``."""
    counts = {"chief": int(chief), "worker": workers, "ps": ps}
    ports = iter(free_ports(sum(counts.values())))
    return {job: [f"localhost:{next(ports)}" for _ in range(n)] for job, n in counts.items() if n}


def tf_config(cluster: dict, task_type: str, index: int) -> str:
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


@dataclass
class Task:
    """One running task: its process and where its output goes."""

    type: str
    index: int
    process: subprocess.Popen
    log_path: str

    def rss_bytes(self) -> int:
        """Resident memory of the task's process now (Linux)."""
        with open(f"/proc/{self.process.pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()


@dataclass
class LoopbackCluster:
    """Starts tasks of `cluster` as ``fm-keras`` processes; ``with`` kills them all at the end.

    Args:
        cluster: TF_CONFIG cluster (see `cluster_spec`).
        log_dir: where each task's stdout+stderr go (``<type><index>.log``).
        nice: niceness added to every task (they share the machine).
    """

    cluster: dict
    log_dir: str
    nice: int = 0
    tasks: list[Task] = field(default_factory=list)

    def start(self, task_type: str, index: int, args: Sequence[str]) -> Task:
        """Starts ``fm-keras ARGS`` as task `task_type`:`index`."""
        env = {**os.environ, "TF_CONFIG": tf_config(self.cluster, task_type, index),
               "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
        os.makedirs(self.log_dir, exist_ok=True)
        path = os.path.join(self.log_dir, f"{task_type}{index}.log")
        with open(path, "w", encoding="utf-8") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "fm_keras.cli", *args], env=env, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=(lambda: os.nice(self.nice)) if self.nice else None)
        task = Task(task_type, index, process, path)
        self.tasks.append(task)
        return task

    def start_servers(self) -> list[Task]:
        """``fm-keras cluster-server`` for every worker and ps task."""
        return [self.start(job, i, ["cluster-server"])
                for job in ("worker", "ps") for i in range(len(self.cluster.get(job, [])))]

    def wait(self, tasks: Sequence[Task], timeout: float) -> None:
        """Waits for `tasks` to exit; raises RuntimeError with the log of one that fails."""
        deadline = time.time() + timeout
        for task in tasks:
            try:
                code = task.process.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"task {task.type}:{task.index} still running after "
                                   f"{timeout:.0f}s; its log ends:\n{task.log()[-3000:]}") from None
            if code != 0:
                raise RuntimeError(f"task {task.type}:{task.index} exited with {code}; its log "
                                   f"ends:\n{task.log()[-3000:]}")

    def stop(self) -> None:
        for task in self.tasks:
            if task.process.poll() is None:
                os.killpg(task.process.pid, signal.SIGKILL)
                task.process.wait()

    def __enter__(self) -> LoopbackCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
