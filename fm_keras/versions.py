"""Model version numbers: one parser and one version-directory rule for every reader.

TF Serving's versions are int64 (``ModelSpec.version`` is an ``Int64Value``) and its file
system source counts a directory as a version only when its whole name parses as one
(tensorflow_serving/sources/storage_path/file_system_storage_path_source.cc). Python's
``str.isdigit`` also accepts non-ASCII digits such as ``²`` or ``٣`` that ``int()`` rejects or
reads differently, so the rule here is explicit: ASCII ``0-9`` only, within int64.
"""

from __future__ import annotations

import os
import re

MAX_VERSION = 2**63 - 1
_ASCII_DIGITS = re.compile(r"[0-9]+\Z", re.ASCII)


def parse_version(text: str | int) -> int:
    """A version id as text (or an int, range-checked) -> int.

    Args:
        text: e.g. ``"3"`` from a REST path or a directory name, or an int from a proto.

    Returns:
        The version, in [0, 2**63 - 1].

    Raises:
        ValueError: not ASCII digits, negative, or beyond int64 (the message names the text).
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if not 0 <= text <= MAX_VERSION:
            raise ValueError(f"version {text} is outside [0, {MAX_VERSION}]")
        return text
    if not isinstance(text, str) or not _ASCII_DIGITS.match(text):
        raise ValueError(f"version {text!r} is not a non-negative integer (ASCII digits 0-9)")
    value = int(text)
    if value > MAX_VERSION:
        raise ValueError(f"version {text!r} is out of range for int64 (max {MAX_VERSION})")
    return value


def is_version_name(name: str) -> bool:
    """True when a directory name is a version number (ASCII digits, within int64)."""
    try:
        parse_version(name)
    except ValueError:
        return False
    return True


def version_names(base_path: str) -> dict[int, str]:
    """Version number -> the name of its directory under ``base_path``.

    As TF Serving's file system source, a zero-padded name is its number (``00000123`` is
    version 123) and is loaded from that directory; when two names give one number (``7`` and
    ``007``), the plain one wins, else the first in sorted order. Anything else (an
    exporter's ``.tmp-*`` directory, ``²``, files) is ignored.

    Raises:
        OSError: the base path cannot be listed (missing, permission denied); callers decide
            whether that means "no versions" or "keep what is loaded".
    """
    names: dict[int, str] = {}
    for name in sorted(os.listdir(base_path)):
        if is_version_name(name) and os.path.isdir(os.path.join(base_path, name)):
            version = parse_version(name)
            if version not in names or name == str(version):
                names[version] = name
    return names


def version_path(base_path: str, version: int) -> str:
    """The directory of ``version`` under ``base_path``: its (possibly zero-padded) name
    from `version_names`, else ``<base_path>/<version>`` (missing, or the base unreadable)."""
    try:
        name = version_names(base_path).get(version, str(version))
    except OSError:
        name = str(version)
    return os.path.join(base_path, name)


def version_dirs(base_path: str) -> list[int]:
    """The version numbers of ``base_path``'s version directories, ascending, each once
    (``version_names`` says which directory holds each).

    Raises:
        OSError: the base path cannot be listed (missing, permission denied).
    """
    return sorted(version_names(base_path))


def aspired_versions(model_config, available_on_disk: list[int]) -> list[int]:
    """The versions a ``ModelConfig``'s version policy asks to serve, of those on disk.

    TF Serving's rule (``file_system_storage_path_source.cc``): ``all`` serves every version,
    ``specific`` the listed ones that exist, ``latest`` (the default) the newest
    ``num_versions`` (1 when unset).

    Args:
        model_config: a ``tensorflow.serving.ModelConfig`` message.
        available_on_disk: the version numbers on disk, ascending (``version_dirs``).

    Returns:
        The aspired versions, ascending.
    """
    policy = model_config.model_version_policy
    kind = policy.WhichOneof("policy_choice")
    if kind == "all":
        return list(available_on_disk)
    if kind == "specific":
        wanted = set(policy.specific.versions)
        return [v for v in available_on_disk if v in wanted]
    n = policy.latest.num_versions if kind == "latest" and policy.latest.num_versions else 1
    return available_on_disk[-n:]
