"""fsutil: files and directories written whole (temp path, then rename), and cleanup."""

import pytest

from fm_keras import fsutil


def test_remove_if_empty_removes_only_an_empty_directory(tmp_path):
    empty, full = tmp_path / "empty", tmp_path / "full"
    empty.mkdir()
    full.mkdir()
    (full / "x").write_text("kept")
    for path in (empty, full, tmp_path / "missing", full / "x"):
        fsutil.remove_if_empty(str(path))
    assert not empty.exists() and (full / "x").read_text() == "kept"


def test_atomic_dir_leaves_nothing_when_the_body_fails(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with fsutil.atomic_dir(str(target)) as tmp:
            with open(f"{tmp}/part", "w") as fh:
                fh.write("half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
