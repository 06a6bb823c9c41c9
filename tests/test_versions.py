"""Version numbers: the one parser (ASCII digits, int64), the version-directory rule and the
version policy rule (which versions serve)."""

import os

import pytest

from fm_keras.versions import (MAX_VERSION, aspired_versions, is_version_name, parse_version,
                               version_dirs, version_names)


@pytest.mark.parametrize("text, value", [("0", 0), ("7", 7), ("0012", 12),
                                         (str(MAX_VERSION), MAX_VERSION), (3, 3)])
def test_valid_versions(text, value):
    assert parse_version(text) == value
    assert is_version_name(str(text))


@pytest.mark.parametrize("text, words", [
    ("18446744073709551616", "out of range for int64"),
    (str(MAX_VERSION + 1), "out of range for int64"),
    ("²", "ASCII digits"),  # str.isdigit() is True, int() raises
    ("٣", "ASCII digits"),  # Arabic-Indic three: int() would read 3
    ("1e3", "ASCII digits"), ("-1", "ASCII digits"), (" 1", "ASCII digits"), ("", "ASCII digits"),
    ("1\n", "ASCII digits"), (-1, "outside"), (2**63, "outside"), (None, "ASCII digits"),
])
def test_invalid_versions_name_the_text(text, words):
    with pytest.raises(ValueError, match=words):
        parse_version(text)
    assert not is_version_name(text if isinstance(text, str) else "x")


def test_version_dirs_keeps_only_version_directories(tmp_path):
    for name in ["1", "10", "2", "²", "٣", ".tmp-3-x", "latest", "9223372036854775808"]:
        (tmp_path / name).mkdir()
    (tmp_path / "4").write_text("a file, not a version")
    assert version_dirs(str(tmp_path)) == [1, 2, 10]


def test_zero_padded_version_directories_keep_their_names(tmp_path):
    """TF Serving reads 00000123 as version 123 (its own test data is named so) and loads it
    from that directory; the server here loaded <base>/123, which does not exist. A number
    written twice (7 and 007) was two versions 7."""
    for name in ["00000123", "7", "007", "0009", "09"]:
        (tmp_path / name).mkdir()
    assert version_names(str(tmp_path)) == {7: "7", 9: "0009", 123: "00000123"}
    assert version_dirs(str(tmp_path)) == [7, 9, 123]


def test_version_dirs_raises_when_the_base_path_cannot_be_listed(tmp_path):
    with pytest.raises(OSError):
        version_dirs(str(tmp_path / "missing"))
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError):
        version_dirs(str(tmp_path / "file"))
    assert not os.path.exists(tmp_path / "missing")


@pytest.mark.parametrize("policy, aspired", [
    ("", [9]),  # no policy: the latest one
    ("model_version_policy { latest { } }", [9]),
    ("model_version_policy { latest { num_versions: 2 } }", [5, 9]),
    ("model_version_policy { all { } }", [1, 2, 5, 9]),
    ("model_version_policy { specific { versions: 2 versions: 7 } }", [2]),  # 7: not on disk
])
def test_aspired_versions_follow_the_version_policy(policy, aspired):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = text_format.Parse(f'name: "m" base_path: "/m" {policy}',
                               model_server_config_pb2.ModelConfig())
    assert aspired_versions(config, [1, 2, 5, 9]) == aspired
