"""SIGTERM for the CLI commands: unwind like Ctrl-C while a command works, finish once its
output is in place.

SIGTERM is how a cancelled Kubernetes or Airflow job, or ``timeout``, stops a command. While
the command works, the signal raises ``Terminated`` in the main thread, so the command unwinds
and removes its temp output: exit 143, nothing half-written. Once the rename that puts the
output in place is done, the work is complete and on disk: a signal then (while the command
prints its summary, or while the interpreter exits) must not turn it into a failed job, so it
is ignored and the command ends as it would have (exit 0). ``committing()`` marks that rename;
a signal that arrives during it is held until the rename is done.

Python runs signal handlers in the main thread between bytecodes, so the flags below need no
lock: the handler never runs in the middle of setting one.
"""

from __future__ import annotations

import contextlib

from fm_keras.errors import Terminated


class _State:
    committing = False
    committed = False


_state = _State()


def on_sigterm(signum, frame) -> None:
    """The SIGTERM handler of the CLI: raises ``Terminated`` until the command's output is
    committed; during and after the commit the signal is ignored.

    Raises:
        Terminated: the command has not committed its output yet.
    """
    if _state.committing or _state.committed:
        return
    raise Terminated()


@contextlib.contextmanager
def committing():
    """Wraps the rename that completes a command's output (its last step that matters).

    A SIGTERM inside the block does not interrupt it; once the block ends without an error,
    the command counts as committed (``committed()``) and later SIGTERMs are ignored. A
    command has one such rename: its one output file or directory.
    """
    _state.committing = True
    try:
        yield
        _state.committed = True
    finally:
        _state.committing = False


def committed() -> bool:
    """True once the running command's output is in place (``committing`` ended)."""
    return _state.committed


def reset() -> None:
    """Starts a command: nothing committed yet (``fm_keras.cli.main`` calls it)."""
    _state.committing = _state.committed = False
