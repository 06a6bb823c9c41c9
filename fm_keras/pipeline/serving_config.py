"""The ModelServerConfig file the server polls: which models, and which versions serve.

The pipeline owns its models' entries in ``pusher.model_config_file`` (other entries are kept
as they are). A push adds the entries with ``latest { num_versions: 1 }``; a rollback pins a
model to one version with ``specific { versions: V }``; forward again returns to latest. Each
of the three removes the version labels that name a version the model no longer serves (a push
under ``latest`` unloads the version it replaces), with a warning per label. The
file is written atomically (temp file + rename), and the server re-reads it every
``--model_config_file_poll_wait_seconds``: it loads the aspired version, then unloads the
other one, so requests never find no version.
"""

from __future__ import annotations

import os

from fm_keras import fsutil
from fm_keras.errors import ConfigError
from fm_keras.versions import aspired_versions, version_dirs


def read_config(path: str):
    from tensorflow_serving.config import model_server_config_pb2

    from fm_keras.serving.config import load_model_server_config

    if not os.path.exists(path):
        config = model_server_config_pb2.ModelServerConfig()
        config.model_config_list.SetInParent()
        return config
    return load_model_server_config(path)


def write_config(path: str, config) -> None:
    from google.protobuf import text_format

    text = ("# Written by fm-keras pipeline (push / rollback); the server polls this file.\n"
            + text_format.MessageToString(config))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fsutil.write_text(path, text)


def _entry(config, name: str):
    for model in config.model_config_list.config:
        if model.name == name:
            return model
    return None


def ensure_models(path: str, base: str, names: list[str]) -> None:
    """Adds entries (latest version) for models the file does not list yet."""
    config = read_config(path)
    changed = False
    for name in names:
        if _entry(config, name) is None:
            model = config.model_config_list.config.add(
                name=name, base_path=os.path.abspath(os.path.join(base, name)),
                model_platform="tensorflow")
            model.model_version_policy.latest.num_versions = 1
            changed = True
    if changed:
        write_config(path, config)


def set_version(path: str, names: list[str], version: int | None) -> list[str]:
    """Pins ``names`` to ``version`` (specific policy), or back to the latest (None), and drops
    the version labels that would name a version the new policy does not serve.

    TF Serving assigns a label only to an available version: a label left pointing at an
    unloaded version fails every config poll. The file is rewritten once, atomically.

    Returns:
        One warning line per label removed (or per model whose base path cannot be listed,
        whose labels are then left as they are).

    Raises:
        ConfigError: the file does not list one of ``names``.
    """
    config = read_config(path)
    warnings = []
    for name in names:
        model = _entry(config, name)
        if model is None:
            raise ConfigError(f"{path}: lists no model {name!r}; push it first "
                              "(fm-keras pipeline run)")
        model.model_version_policy.Clear()
        if version is None:
            model.model_version_policy.latest.num_versions = 1
        else:
            model.model_version_policy.specific.versions.append(version)
        warnings += _drop_stale_labels(path, model)
    write_config(path, config)
    return warnings


def drop_stale_labels(path: str, names: list[str]) -> list[str]:
    """Removes the version labels of ``names`` that name a version their version policy does
    not serve of the versions now on disk, e.g. after a push under ``latest`` unloads the
    version a label named; the file is rewritten (atomically) only when a label is removed.

    TF Serving assigns a label only to an available version: a label left pointing at an
    unloaded version fails every config poll.

    Returns:
        One warning line per label removed (or per model whose base path cannot be listed,
        whose labels are then left as they are); [] when the file does not exist.
    """
    if not os.path.exists(path):
        return []
    config = read_config(path)
    warnings, changed = [], False
    for name in names:
        model = _entry(config, name)
        if model is None:
            continue
        before = len(model.version_labels)
        warnings += _drop_stale_labels(path, model)
        changed = changed or len(model.version_labels) != before
    if changed:
        write_config(path, config)
    return warnings


def _drop_stale_labels(path: str, model) -> list[str]:
    if not model.version_labels:
        return []
    try:
        served = aspired_versions(model, version_dirs(os.path.expanduser(model.base_path)))
    except OSError as err:
        return [f"{path}: model {model.name!r}: version labels not checked: cannot list "
                f"{model.base_path}: {err.strerror or err}"]
    warnings = []
    for label, target in sorted(model.version_labels.items()):
        if target not in served:
            del model.version_labels[label]
            warnings.append(f"{path}: model {model.name!r}: version label {label!r} removed: "
                            f"it named version {target}, which its version policy no longer "
                            f"serves (it serves {served})")
    return warnings


def served_policy(path: str, name: str) -> dict | None:
    """{"policy": "latest"|"specific"|"all", "versions": [...], "base_path"} of a model."""
    if not os.path.exists(path):
        return None
    model = _entry(read_config(path), name)
    if model is None:
        return None
    kind = model.model_version_policy.WhichOneof("policy_choice") or "latest"
    versions = list(model.model_version_policy.specific.versions) if kind == "specific" else []
    return {"policy": kind, "versions": versions, "base_path": model.base_path}


def served_versions(path: str, name: str) -> list[int]:
    """The versions of ``name`` that serve under its policy in the config file at ``path``, of
    those on disk (``latest``: the newest ``num_versions``), ascending; [] when the file does
    not list the model or its base path cannot be listed."""
    if not os.path.exists(path):
        return []
    model = _entry(read_config(path), name)
    if model is None:
        return []
    try:
        on_disk = version_dirs(os.path.expanduser(model.base_path))
    except OSError:
        return []
    return aspired_versions(model, on_disk)


def pinned_elsewhere(path: str, name: str, version: int) -> str | None:
    """Why a pushed `version` of `name` will not serve, or None: the model is pinned (a
    ``specific`` policy, from ``rollback --to V`` or an A/B test's hand edit) to other
    versions in the config file at `path`."""
    policy = served_policy(path, name)
    if policy is None or policy["policy"] != "specific" or version in policy["versions"]:
        return None
    return (f"{name} is pinned to versions {policy['versions']} in {path}: version {version} "
            "is on disk but does not serve until 'fm-keras pipeline rollback --to latest'")
