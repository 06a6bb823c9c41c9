"""What a killed pipeline must not leave behind: child processes that outlive it, and temporary
directories nobody removes.

A step that starts a child (the infra validator's ``fm-keras serve``) starts it through
`die_with_parent`: on Linux the child asks the kernel (``prctl(PR_SET_PDEATHSIG, SIGKILL)``,
which survives ``exec``) to be killed when the pipeline process dies, even by SIGKILL. This is
done in a small launcher that then ``exec``s the real command, not in ``preexec_fn``, which is
unsafe in a process with threads (TensorFlow's). Elsewhere (macOS) the child is not tied to its
parent.

A temporary directory carries its owner's pid in its name (``<prefix><pid>-*``);
`remove_stale_dirs` removes those whose owner is gone.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import sys
import tempfile

# Runs in the child: asks for SIGKILL when the parent dies, gives up if the parent is gone
# already (the request came too late), then becomes the real command.
_LAUNCHER = """\
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit("fm-keras: the pipeline process that started this one is gone")
os.execv(sys.argv[2], sys.argv[2:])
"""


def die_with_parent(command: list[str]) -> list[str]:
    """The command line that runs ``command`` (an absolute executable first, e.g.
    ``sys.executable``) as a child killed when this process dies, for ``subprocess.Popen``.

    Args:
        command: the child's argv; ``command[0]`` must be a path (``execv`` does not search
            ``PATH``).

    Returns:
        A new argv: this Python running the launcher, then ``command``.
    """
    return [sys.executable, "-c", _LAUNCHER, str(os.getpid()), *command]


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists (possibly another user's, or a zombie)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owned_dir_prefix(prefix: str) -> str:
    """``prefix`` with this process's pid, for ``tempfile.TemporaryDirectory(prefix=...)``."""
    return f"{prefix}{os.getpid()}-"


def remove_stale_dirs(prefix: str, root: str | None = None) -> list[str]:
    """Removes this user's ``<root>/<prefix><pid>-*`` directories whose owner pid is gone.

    Args:
        prefix: e.g. ``"fm-keras-infra-"`` (as given to `owned_dir_prefix`).
        root: where they are (default: ``tempfile.gettempdir()``).

    Returns:
        The paths removed. Directories of other users, of live pids, or without a pid in
        their name are left alone.
    """
    root = root or tempfile.gettempdir()
    pattern = re.compile(re.escape(prefix) + r"([0-9]+)-")
    try:
        entries = os.listdir(root)
    except OSError:
        return []
    removed = []
    for entry in entries:
        match = pattern.match(entry)
        if match is None or pid_alive(int(match.group(1))):
            continue
        path = os.path.join(root, entry)
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
