"""fm_keras.hugepages: when the program restarts with glibc's huge-page tunable, and with what."""

import os
import sys

import pytest

from fm_keras import hugepages

GLIBC = (2, 36)


@pytest.mark.parametrize("env,mode,glibc,want", [
    ({}, "madvise", GLIBC, "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", GLIBC,
     "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),                # others kept
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", GLIBC, None),  # the user's choice
    ({"FM_KERAS_HUGEPAGES": "0"}, "madvise", GLIBC, None),               # opted out
    ({"FM_KERAS_HUGEPAGES": "False"}, "madvise", GLIBC, None),
    ({"FM_KERAS_HUGEPAGES": "off"}, "madvise", GLIBC, None),
    ({"FM_KERAS_HUGEPAGES": "1"}, "madvise", GLIBC, "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=2"}, "madvise", GLIBC, None),  # hugetlbfs
    ({}, "always", GLIBC, None),                                        # already huge
    ({}, "never", GLIBC, None),
    ({}, None, GLIBC, None),                                            # no THP setting
    ({}, "madvise", (2, 34), None),                                     # no such tunable
    ({}, "madvise", None, None),                                        # not glibc (musl)
])
def test_with_tunable(env, mode, glibc, want):
    got = hugepages.with_tunable(env, mode, glibc)
    assert (got and got["GLIBC_TUNABLES"]) == want
    if got:
        assert {k: v for k, v in got.items() if k != "GLIBC_TUNABLES"} == {
            k: v for k, v in env.items() if k != "GLIBC_TUNABLES"}


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert hugepages.thp_mode(str(path)) == "madvise"
    assert hugepages.thp_mode(str(tmp_path / "missing")) is None


def test_state(monkeypatch):
    tunables = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}
    assert hugepages.state(tunables, "madvise") == "madvise+glibc.malloc.hugetlb=1"
    assert hugepages.state({}, "madvise") == "madvise"
    assert hugepages.state(tunables, "always") == "always"
    assert hugepages.state({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=2"}, "madvise") \
        == "madvise+glibc.malloc.hugetlb=2"
    assert hugepages.state({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise") == "madvise"
    monkeypatch.setattr(hugepages, "thp_mode", lambda: None)  # no THP setting to read
    assert hugepages.state({}) == "unknown"


def test_the_startup_environment_is_the_one_glibc_read(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1:marker.set.late=1")
    startup = hugepages.startup_environment()
    assert startup["PATH"] == os.environ["PATH"]
    assert "marker.set.late" not in startup.get("GLIBC_TUNABLES", "")  # too late for malloc


def _machine_with_thp(monkeypatch):
    monkeypatch.setattr(hugepages, "thp_mode", lambda: "madvise")
    monkeypatch.setattr(hugepages, "glibc_version", lambda: GLIBC)
    monkeypatch.setattr(hugepages, "startup_environment", lambda: dict(os.environ))
    for name in ("GLIBC_TUNABLES", "FM_KERAS_HUGEPAGES"):
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(hugepages.os, "execve", lambda *args: calls.append(args))
    return calls


ARGS = ["train", "--config", "e.yaml"]


@pytest.mark.parametrize("orig_argv,argv", [
    (["/venv/bin/python", "/venv/bin/fm-keras", *ARGS], ["/venv/bin/fm-keras", *ARGS]),
    (["python3", "-X", "importtime", "-m", "fm_keras.cli", *ARGS],
     ["/src/fm_keras/cli.py", *ARGS]),
])
def test_the_fm_keras_program_restarts_itself_with_the_tunable(monkeypatch, orig_argv, argv):
    calls = _machine_with_thp(monkeypatch)
    monkeypatch.setattr(sys, "orig_argv", orig_argv)
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(sys, "stdout", None)  # closed (`>&-`): no flush of None
    hugepages.reexec_with_tunable()
    ((executable, args, env),) = calls
    assert executable == sys.executable and args == orig_argv  # the same invocation
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


@pytest.mark.parametrize("orig_argv,argv", [
    (None, None),                                                    # pytest itself
    (["python", "host.py"], ["fm-keras", *ARGS]),                    # a host that set sys.argv
    (["python", "host.py"], ["/src/fm_keras/cli.py", *ARGS]),        # runpy.run_module
    (["python", "host.py", *ARGS], ["/venv/bin/fm-keras", *ARGS]),
])
def test_a_process_that_imported_fm_keras_is_never_replaced(monkeypatch, orig_argv, argv):
    calls = _machine_with_thp(monkeypatch)
    if orig_argv:
        monkeypatch.setattr(sys, "orig_argv", orig_argv)
        monkeypatch.setattr(sys, "argv", argv)
    hugepages.reexec_with_tunable()
    assert calls == []


def test_missing_is_what_the_restart_would_add(monkeypatch):
    _machine_with_thp(monkeypatch)
    assert hugepages.missing()
    monkeypatch.setenv("FM_KERAS_HUGEPAGES", "0")  # opted out: no hint either
    assert not hugepages.missing()
    monkeypatch.delenv("FM_KERAS_HUGEPAGES")
    monkeypatch.setenv("GLIBC_TUNABLES", hugepages.TUNABLE)
    assert not hugepages.missing()
