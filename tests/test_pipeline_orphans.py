"""A killed pipeline leaves no child process and no temporary directory behind (with real
processes: a parent SIGKILLed while its child runs)."""

import os
import subprocess
import sys
import time

import pytest

from fm_keras.pipeline.orphans import die_with_parent, pid_alive, remove_stale_dirs

PARENT = """
import subprocess, sys, time
from fm_keras.pipeline.orphans import die_with_parent
sleeper = [sys.executable, "-c", "import time; time.sleep(300)  # child"]
tied = subprocess.Popen(die_with_parent(sleeper))
free = subprocess.Popen(sleeper)
print(tied.pid, free.pid, flush=True)
time.sleep(300)
"""


def _running(pid):
    """Alive and not a zombie (a dead child not reaped yet by whoever adopted it)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _cmdline(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().decode(errors="replace")


def _argument(cmdline: str, i: int) -> str:
    """Argument `i` of a /proc cmdline ("" when it has fewer)."""
    parts = cmdline.split("\0")
    return parts[i] if i < len(parts) else ""


def _wait(condition, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_started_with_die_with_parent_dies_when_its_parent_is_sigkilled(tmp_path):
    """Regression: SIGKILL of 'pipeline run' during infra_validator left its 'fm-keras serve'
    child running with parent pid 1. The child started without it (the old way) survives."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)}
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, env=env,
                              text=True)
    children = ()
    try:
        tied, free = children = tuple(map(int, parent.stdout.readline().split()))
        # the launcher has exec'd the real command: its death signal is set
        # (until the exec, the launcher's own command line may hold fewer than 3 arguments:
        # under load the first look can land there)
        assert _wait(lambda: _argument(_cmdline(tied), 2).endswith("# child")), \
            _cmdline(tied)
        parent.kill()
        parent.wait()
        assert _wait(lambda: not _running(tied)), f"child {tied} outlived its parent"
        assert _running(free)  # the test would see an orphan
    finally:
        parent.kill()
        parent.wait()
        for pid in children:  # also a child that wrongly outlived its parent
            if _running(pid):
                os.kill(pid, 9)


def test_die_with_parent_runs_the_command_as_given(tmp_path):
    out = subprocess.run(die_with_parent([sys.executable, "-c", "import sys; print(sys.argv)",
                                          "a b", "--x=1"]),
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['-c', 'a b', '--x=1']"


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_pid_alive():
    assert pid_alive(os.getpid())
    assert not pid_alive(_dead_pid())
    assert not pid_alive(0)


def test_remove_stale_dirs_removes_only_those_whose_owner_is_gone(tmp_path):
    """Regression: /tmp/fm-keras-infra-* of a SIGKILLed pipeline stayed forever."""
    dead = _dead_pid()
    stale = tmp_path / f"fm-keras-infra-{dead}-abc"
    (stale / "candidate").mkdir(parents=True)
    (stale / "models.config").write_text("x")
    mine = tmp_path / f"fm-keras-infra-{os.getpid()}-def"
    old_style = tmp_path / "fm-keras-infra-ghi"  # no pid in its name: cannot tell
    other = tmp_path / f"fm-keras-other-{dead}-jkl"
    a_file = tmp_path / f"fm-keras-infra-{dead}-file"
    for path in (mine, old_style, other):
        path.mkdir()
    a_file.write_text("x")
    assert remove_stale_dirs("fm-keras-infra-", str(tmp_path)) == [str(stale)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (mine, old_style, other, a_file))
    assert remove_stale_dirs("fm-keras-infra-", str(tmp_path / "missing")) == []
