"""Loading exports: version resolution and errors for directories that are not exports."""

import os
import shutil

import pytest

from fm_keras.errors import ExportError
from fm_keras.servables import load_export, resolve_version


def test_a_zero_padded_version_directory_resolves_to_itself(tmp_path):
    for name in ["2", "00000123"]:
        (tmp_path / name).mkdir()
    assert resolve_version(str(tmp_path)) == os.path.join(str(tmp_path), "00000123")


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


def _newer_format(source, target):
    """A copy of an export whose fm_keras.json says format_version 99, written by 9.9.9."""
    import json

    shutil.copytree(source, target)
    meta_path = os.path.join(target, "assets.extra", "fm_keras.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["format_version"] = 99
    meta["versions"] = {k: "9.9.9" for k in meta.get("versions", {})} or {"fm_keras": "9.9.9"}
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    return str(target)


def test_a_newer_export_format_is_refused_by_every_reader(exports, small_synth, tmp_path, capsys):
    """Issue 14 item 7: score, recommend and index refuse it, naming both format versions."""
    from fm_keras.cli import main
    from fm_keras.servables import FORMAT_VERSION

    synth_dir, _ = small_synth
    recall = _newer_format(exports["brute_force"], tmp_path / "recall" / "1")
    ranking = _newer_format(exports["ranking"], tmp_path / "ranking" / "1")
    with pytest.raises(ExportError, match=f"format_version 99 .*9.9.9.* newer than format_version "
                                          f"{FORMAT_VERSION}"):
        load_export(recall)
    for argv in (["recommend", "--model", recall, "--users", str(synth_dir / "test.csv"),
                  "--k", "3", "--output", str(tmp_path / "recs.csv"), "--quiet"],
                 ["score", "--model", ranking, "--input", str(synth_dir / "test.csv"),
                  "--output", str(tmp_path / "scores.csv"), "--quiet"],
                 ["index", "--model", ranking, "--items", str(synth_dir / "items.csv"),
                  "--name", "r", "--base", str(tmp_path / "out")]):
        assert main(argv) == 2, argv
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("fm-keras: error: ") and "format_version 99" in error, error
        assert f"format_version {FORMAT_VERSION} that this fm_keras" in error
    assert not [f for f in os.listdir(tmp_path) if f not in ("recall", "ranking")]
    # and the valid export next to it still works
    assert main(["recommend", "--model", exports["brute_force"], "--users",
                 str(synth_dir / "test.csv"), "--k", "3", "--output", str(tmp_path / "ok.csv"),
                 "--quiet"]) == 0


@pytest.mark.parametrize("value", [0, "1", 1.5, True])
def test_a_bad_format_version_is_refused(exports, tmp_path, value):
    import json

    copy = tmp_path / "ctr"
    shutil.copytree(exports["ranking"], copy)
    meta_path = copy / "assets.extra" / "fm_keras.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = value
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="format_version .* is not a positive integer"):
        load_export(str(copy))


def test_signature_inputs_follow_the_feature_spec_not_the_protobuf_map():
    """A loaded signature's inputs came in a new order each process (a protobuf map), and so
    did the columns a "missing column" error said the signature needs."""
    import types

    from fm_keras.servables import signature_inputs

    names = ["price", "exclude", "user_id", "item_id", "device"]
    fn = types.SimpleNamespace(structured_input_signature=((), {n: n.upper() for n in names}))
    meta = {"features": [{"config": {"name": n}} for n in ("user_id", "device", "item_id",
                                                            "price", "not_an_input")]}
    assert list(signature_inputs(fn, meta).items()) == [
        ("user_id", "USER_ID"), ("device", "DEVICE"), ("item_id", "ITEM_ID"),
        ("price", "PRICE"), ("exclude", "EXCLUDE")]
    recall = {"query_features": ["user_id", "device"]}
    assert list(signature_inputs(fn, recall)) == ["user_id", "device", "exclude", "item_id",
                                                  "price"]
