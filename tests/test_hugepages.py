"""Huge pages for the training commands: when to re-execute, and that re-executing keeps the
command line and sets glibc's tunable once."""

import json
import os
import subprocess
import sys

import pytest

from fm_keras import hugepages
from fm_keras.hugepages import TUNABLE, reexec_environment


@pytest.mark.parametrize("text, mode", [("always [madvise] never\n", "madvise"),
                                        ("[always] madvise never\n", "always"),
                                        ("always madvise [never]\n", "never"),
                                        ("garbage\n", None)])
def test_thp_mode_reads_the_bracketed_setting(tmp_path, text, mode):
    path = tmp_path / "enabled"
    path.write_text(text)
    assert hugepages.thp_mode(str(path)) == mode


def test_thp_mode_without_the_setting_is_none(tmp_path):
    assert hugepages.thp_mode(str(tmp_path / "absent")) is None


def test_reexec_environment_adds_the_tunable_beside_others():
    env = reexec_environment({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
                             "madvise", (2, 36))
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{TUNABLE}"}
    assert reexec_environment({}, "madvise", (2, 35)) == {"GLIBC_TUNABLES": TUNABLE}


@pytest.mark.parametrize("environ, mode, glibc", [
    ({"GLIBC_TUNABLES": TUNABLE}, "madvise", (2, 36)),                # already on: no loop
    ({"GLIBC_TUNABLES": f"a=1:{TUNABLE}"}, "madvise", (2, 36)),
    ({hugepages.SWITCH: "0"}, "madvise", (2, 36)),                     # turned off
    ({}, "always", (2, 36)),                                           # the kernel does it
    ({}, "never", (2, 36)),
    ({}, None, (2, 36)),                                               # no THP
    ({}, "madvise", (2, 31)),                                          # no such tunable
    ({}, "madvise", None),                                             # not glibc
])
def test_reexec_environment_is_none_where_it_changes_nothing(environ, mode, glibc):
    assert reexec_environment(environ, mode, glibc) is None


def test_reexec_executes_the_same_command_line_for_training_commands_only(monkeypatch):
    calls = []
    monkeypatch.setattr(hugepages.os, "execve", lambda *a: calls.append(a))
    monkeypatch.setattr(hugepages, "thp_mode", lambda: "madvise")
    monkeypatch.setattr(hugepages, "glibc_version", lambda: (2, 36))
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv(hugepages.SWITCH, raising=False)
    for command in ("score", "recommend", "serve", "synth"):
        hugepages.reexec(command)
    assert calls == []
    hugepages.reexec("train")
    (executable, argv, env), = calls
    assert executable == sys.executable and argv == [sys.executable, *sys.orig_argv[1:]]
    assert env["GLIBC_TUNABLES"] == TUNABLE


def test_main_with_arguments_never_reexecutes(monkeypatch, tmp_path):
    """`main(argv)` is a library call inside someone's process: only the process' own command
    line (argv None) is re-executed."""
    from fm_keras import cli

    def fail(command):
        raise AssertionError(f"re-executed for {command}")

    monkeypatch.setattr(hugepages, "reexec", fail)
    with pytest.raises(SystemExit):  # argparse: train without --config
        cli.main(["train"])


_PROBE = """
import json, os, sys
from fm_keras import hugepages
hugepages.reexec(sys.argv[1])
print(json.dumps({"argv": sys.argv, "tunables": os.environ.get("GLIBC_TUNABLES", ""),
                  "active": hugepages.active()}))
"""


def test_a_real_reexec_keeps_the_arguments_and_sets_the_tunable_once():
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hugepages.SWITCH)}
    proc = subprocess.run([sys.executable, "-c", _PROBE, "train", "x y"], env=env,
                          capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout)
    expected = reexec_environment(env, hugepages.thp_mode(), hugepages.glibc_version())
    assert out["argv"] == ["-c", "train", "x y"]
    assert out["active"] is (expected is not None)
    assert out["tunables"] == (expected or {}).get("GLIBC_TUNABLES", "")
    proc = subprocess.run([sys.executable, "-c", _PROBE, "train"], capture_output=True,
                          text=True, check=True, env={**env, hugepages.SWITCH: "0"})
    assert json.loads(proc.stdout)["active"] is False
