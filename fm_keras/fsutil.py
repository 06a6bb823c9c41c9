"""Atomic writes: a reader (or a server polling a directory) never sees half a file."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile


_UMASK = os.umask(0)
os.umask(_UMASK)


def write_text(path: str, text: str) -> None:
    """Writes `text` (UTF-8) to a temp file beside `path`, then renames it into place."""
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str, data: bytes) -> None:
    """Writes `data` to a temp file beside `path`, then renames it into place."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=directory)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual file mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: str, obj) -> None:
    """Writes JSON atomically (`write_text`)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@contextlib.contextmanager
def atomic_dir(path: str):
    """Yields a temp directory beside `path` that becomes `path` only if the block succeeds.

    An existing `path` is replaced. On error the temp directory is removed.
    """
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(path)}-", dir=parent)
    try:
        yield tmp
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=".old-", dir=parent)
            os.replace(path, os.path.join(old, "x"))
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_if_empty(path: str) -> None:
    """Removes the directory `path` if it exists and holds nothing (a command that failed
    before writing into a directory it made leaves none); otherwise leaves it."""
    try:
        os.rmdir(path)
    except OSError:  # missing, not empty, or not a directory
        pass
