"""Transparent huge pages (THP) for the embedding tables of a training process.

A training step reads and writes the rows of the ids in its batch, scattered over tables of
up to hundreds of MB (5M ids x (1 + k) floats, plus the optimizer's state). With the kernel's
4 KiB pages nearly every such row costs a TLB miss as well as a cache miss; with 2 MiB pages
the page table of the whole table fits in the TLB. Most Linux distributions enable THP only
for memory that asks for it (``/sys/kernel/mm/transparent_hugepage/enabled`` is
``madvise``), and TensorFlow allocates tensors through glibc's malloc, which asks only when
started with the tunable ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc >= 2.35; see the
glibc manual, "Memory Allocation Tunables"). At 5M ids it took a step's row traffic from
+2.0 to +0.7-0.8 ms over a 10k-id table (BENCHMARKS.md, "Session 14").

A tunable is read once, when the process starts, so the ``fm-keras`` program re-executes
itself (same process id, arguments and file descriptors) with it set before a command that
trains; ``FM_KERAS_HUGEPAGES=0`` turns that off. Python callers of `fm_keras.training.train`
set the variable themselves.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
OPT_OUT = "FM_KERAS_HUGEPAGES"
MIN_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb


def thp_mode(path: str = THP_SETTING) -> str | None:
    """The kernel's THP mode (``always``, ``madvise`` or ``never``), or None where the
    setting cannot be read (not Linux, no THP)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library's glibc, or None for another C library."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, ValueError, OSError):
        return None


def with_tunable(env: dict[str, str], mode: str | None,
                 glibc: tuple[int, int] | None) -> dict[str, str] | None:
    """`env` plus the malloc tunable, or None where it would change nothing or is not wanted:
    THP is ``always`` (already on) or ``never`` or unknown, glibc is older than 2.35 or
    absent, the tunable is already set, or ``FM_KERAS_HUGEPAGES=0``.

    Args:
        env: an environment, e.g. ``os.environ``; not modified.
        mode: `thp_mode()`.
        glibc: `glibc_version()`.
    """
    tunables = env.get("GLIBC_TUNABLES", "")
    if (env.get(OPT_OUT) == "0" or mode != "madvise" or glibc is None or glibc < MIN_GLIBC
            or "glibc.malloc.hugetlb=" in tunables):
        return None
    return {**env, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}" if tunables else TUNABLE}


def state(env=None, mode: str | None = None) -> str:
    """How this process's large allocations get pages, for run.json: ``"always"`` (every
    large mapping), ``"madvise+glibc.malloc.hugetlb=1"`` (malloc asks for them), or the
    kernel's mode alone (``"madvise"``: not asked; ``"never"``), ``"unknown"``."""
    env = os.environ if env is None else env
    mode = thp_mode() if mode is None else mode
    if mode == "madvise" and TUNABLE in env.get("GLIBC_TUNABLES", "").split(":"):
        return f"madvise+{TUNABLE}"
    return mode or "unknown"


def missing() -> bool:
    """True where this process could have had huge pages for its tables and has not: the
    kernel and glibc offer them, the tunable is not set, and nobody opted out."""
    return with_tunable(dict(os.environ), thp_mode(), glibc_version()) is not None


def reexec_with_tunable() -> None:
    """Replaces this process by itself started with the tunable (`with_tunable`), if that
    changes anything; returns where it does not. Only for the ``fm-keras`` program (the
    console script or ``python -m fm_keras.cli``), never for a process that imported fm_keras.

    Raises:
        OSError: the interpreter could not be executed again.
    """
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if not ((spec is not None and spec.name == "fm_keras.cli")
            or os.path.basename(sys.argv[0]) == "fm-keras"):
        return
    env = with_tunable(dict(os.environ), thp_mode(), glibc_version())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
