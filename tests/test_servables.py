"""Loading exports: version resolution and errors for directories that are not exports."""

import os
import shutil

import pytest

from fm_keras.errors import ExportError
from fm_keras.servables import load_export, resolve_version


def test_model_directory_resolves_to_highest_version(exports, tmp_path):
    model_dir = os.path.dirname(exports["ranking"])
    assert resolve_version(model_dir) == exports["ranking"]
    assert resolve_version(exports["ranking"]) == exports["ranking"]
    copy = tmp_path / "ctr"
    shutil.copytree(exports["ranking"], copy / "2")
    shutil.copytree(exports["ranking"], copy / "10")
    os.makedirs(copy / ".tmp-11-x")
    assert resolve_version(str(copy)) == str(copy / "10")


def test_not_an_export(tmp_path, exports):
    with pytest.raises(ExportError, match="no such model directory"):
        load_export(str(tmp_path / "missing"))
    with pytest.raises(ExportError, match="not an fm_keras export"):
        load_export(str(tmp_path))
    plain = tmp_path / "plain"
    shutil.copytree(exports["ranking"], plain)
    os.remove(plain / "assets.extra" / "fm_keras.json")
    with pytest.raises(ExportError, match="fm_keras.json is missing"):
        load_export(str(plain))
    broken = tmp_path / "broken"
    shutil.copytree(exports["ranking"], broken)
    (broken / "saved_model.pb").write_bytes(b"not a protobuf")
    with pytest.raises(ExportError, match="cannot load the SavedModel"):
        load_export(str(broken))
    with pytest.raises(ExportError, match="this needs a 'fm_keras.recall' one"):
        load_export(exports["ranking"], expect="fm_keras.recall")
