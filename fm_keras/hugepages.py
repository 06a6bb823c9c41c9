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
trains; ``FM_KERAS_HUGEPAGES=0`` (or ``false``, ``no``, ``off``) turns that off. Python
callers of `fm_keras.training.train` set the variable themselves, before Python starts.
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
    absent, ``glibc.malloc.hugetlb`` is already set (to any value), or
    ``FM_KERAS_HUGEPAGES`` is ``0``, ``false``, ``no`` or ``off``.

    Args:
        env: an environment, e.g. ``os.environ``; not modified.
        mode: `thp_mode()`.
        glibc: `glibc_version()`.
    """
    tunables = env.get("GLIBC_TUNABLES", "")
    if (env.get(OPT_OUT, "").strip().lower() in ("0", "false", "no", "off")
            or mode != "madvise" or glibc is None or glibc < MIN_GLIBC
            or _hugetlb(tunables) is not None):
        return None
    return {**env, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}" if tunables else TUNABLE}


def _hugetlb(tunables: str) -> str | None:
    """The value of ``glibc.malloc.hugetlb`` in a GLIBC_TUNABLES string, or None."""
    values = [t.split("=", 1)[1] for t in tunables.split(":")
              if t.startswith("glibc.malloc.hugetlb=")]
    return values[-1] if values else None


def startup_environment() -> dict[str, str]:
    """The environment this process started with (``/proc/self/environ``), which is what
    glibc read its tunables from; ``os.environ`` where that cannot be read. A variable set
    in ``os.environ`` later reaches child processes, not this process's malloc."""
    try:
        with open("/proc/self/environ", "rb") as f:
            pairs = [item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item]
        return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}
    except OSError:
        return dict(os.environ)


def state(env=None, mode: str | None = None) -> str:
    """How this process's large allocations get pages, for run.json: ``"always"`` (every
    large mapping), ``"madvise+glibc.malloc.hugetlb=1"`` (malloc asks for them; ``=2``:
    hugetlbfs pages), or the kernel's mode alone (``"madvise"``: not asked; ``"never"``),
    ``"unknown"``.

    Args:
        env: the environment glibc read; default `startup_environment()`.
        mode: the kernel's THP mode; default `thp_mode()`.
    """
    env = startup_environment() if env is None else env
    mode = thp_mode() if mode is None else mode
    value = _hugetlb(env.get("GLIBC_TUNABLES", ""))
    if mode == "madvise" and value not in (None, "0"):
        return f"madvise+glibc.malloc.hugetlb={value}"
    return mode or "unknown"


def missing() -> bool:
    """True where this process could have had huge pages for its tables and has not: the
    kernel and glibc offer them, the process did not start with the tunable, and nobody
    opted out."""
    return with_tunable(startup_environment(), thp_mode(), glibc_version()) is not None


def _invoked_as_program() -> bool:
    """Whether the interpreter's own command line runs ``fm-keras`` (the console script, or
    ``python -m fm_keras.cli``) with this ``sys.argv``: not a host program that imported
    fm_keras and set ``sys.argv`` or ran the module with `runpy`."""
    orig, argv = sys.orig_argv, sys.argv
    at = len(orig) - len(argv)  # where argv[0] stands in the interpreter's command line
    if at < 1 or orig[at + 1:] != argv[1:]:
        return False
    if orig[at] == "fm_keras.cli":
        return orig[at - 1] == "-m"
    return orig[at] == argv[0] and os.path.basename(argv[0]) == "fm-keras"


def reexec_with_tunable() -> None:
    """Replaces this process by itself started with the tunable (`with_tunable`), if that
    changes anything; returns where it does not. Only for the ``fm-keras`` program (the
    console script or ``python -m fm_keras.cli``), never for a process that imported fm_keras.

    Raises:
        OSError: the interpreter could not be executed again.
    """
    if not _invoked_as_program():
        return
    env = with_tunable(dict(os.environ), thp_mode(), glibc_version())
    if env is None:
        return
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:  # None: the descriptor was closed (`>&-`)
            stream.flush()
    os.execve(sys.executable, sys.orig_argv, env)
