"""Transparent huge pages for the training tables: fewer TLB misses on random rows.

A training step reads and writes the rows of a batch's ids at random places in tables of up to
hundreds of MB (the FM's ``table`` [ids, 1 + k], the optimizer's ``state`` [ids, S, 1 + k],
the ``prior`` [ids, 2]). With 4 KiB pages nearly every such row also misses the CPU's TLB,
and the page walk costs another trip to memory; 2 MiB pages cover those tables with 512x
fewer TLB entries. At 5M ids this takes 10-15% off a training step (BENCHMARKS.md "Huge
pages"); small tables, which stay in the caches, do not change.

TensorFlow allocates tensors with ``malloc``; glibc (2.35 and later) backs its large
allocations with transparent huge pages when started with the tunable
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (it ``madvise``s them ``MADV_HUGEPAGE``). A
tunable is read when a process starts, so the training commands (`TRAINING_COMMANDS`)
re-execute themselves once with it set (`reexec`); where the kernel has transparent huge
pages set to ``always`` (every large mapping already gets them) or ``never``, or the C
library is not glibc >= 2.35, nothing changes. ``FM_KERAS_HUGE_PAGES=0`` turns it off; a
library user sets ``GLIBC_TUNABLES`` in the environment that starts Python.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
SWITCH = "FM_KERAS_HUGE_PAGES"  # "0": do not re-execute
TRAINING_COMMANDS = frozenset({"train", "tune", "pipeline", "cluster-server"})
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = _THP_MODE) -> str | None:
    """The kernel's transparent huge page mode (``always``, ``madvise``, ``never``), or None
    where there is no such setting (not Linux, or a kernel without THP)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the running glibc, None for another C library (musl, macOS)."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, ValueError, OSError):
        return None


def active(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process was started with huge pages for malloc (`TUNABLE` set)."""
    return TUNABLE in environ.get("GLIBC_TUNABLES", "").split(":")


def reexec_environment(environ: Mapping[str, str], mode: str | None,
                       glibc: tuple[int, int] | None) -> dict[str, str] | None:
    """The environment to re-execute with, or None when re-executing would change nothing.

    Args:
        environ: the current environment.
        mode: `thp_mode()`; only ``madvise`` needs the tunable.
        glibc: `glibc_version()`; the tunable exists from 2.35.

    Returns:
        `environ` with `TUNABLE` added to ``GLIBC_TUNABLES`` (colon-separated, as glibc reads
        it), or None: already set, turned off by ``FM_KERAS_HUGE_PAGES=0``, or not useful here.
    """
    if environ.get(SWITCH, "1") == "0" or active(environ):
        return None
    if mode != "madvise" or glibc is None or glibc < (2, 35):
        return None
    tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
    return {**environ, "GLIBC_TUNABLES": ":".join([*tunables, TUNABLE])}


def reexec(command: str) -> None:
    """Re-executes this process with `TUNABLE` (same interpreter, arguments and pid) when
    `command` is one of `TRAINING_COMMANDS` and it would change something; returns otherwise.
    Call it before TensorFlow is imported: nothing done before it survives.

    Raises:
        OSError: the interpreter could not be executed (it was just running, so hardly).
    """
    if command not in TRAINING_COMMANDS or not sys.orig_argv:
        return
    environ = reexec_environment(os.environ, thp_mode(), glibc_version())
    if environ is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
