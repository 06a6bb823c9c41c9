"""SIGTERM stops a command until its output is committed, never after (fm_keras/termination.py).

The handler is called directly here; tests/test_cli.py sends real signals to `score`."""

import signal

import pytest

from fm_keras import termination
from fm_keras.termination import Terminated, committed, committing, on_sigterm, reset


@pytest.fixture(autouse=True)
def fresh():
    reset()
    yield
    reset()


def test_a_signal_before_the_commit_stops_the_command():
    with pytest.raises(Terminated):
        on_sigterm(signal.SIGTERM, None)
    assert not committed()


def test_a_signal_during_or_after_the_commit_is_ignored():
    with committing():
        on_sigterm(signal.SIGTERM, None)  # held: the rename goes on
        assert not committed()
    assert committed()
    on_sigterm(signal.SIGTERM, None)
    reset()  # the next command starts uncommitted
    with pytest.raises(Terminated):
        on_sigterm(signal.SIGTERM, None)


def test_a_failed_commit_is_not_committed():
    with pytest.raises(OSError):
        with committing():
            raise OSError("rename failed")
    assert not termination.committed()
    with pytest.raises(Terminated):
        on_sigterm(signal.SIGTERM, None)
