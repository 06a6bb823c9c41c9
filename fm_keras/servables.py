"""Loading fm_keras exports (ranking and recall SavedModels) with clear errors.

Only TensorFlow is needed to load an export; a ScaNN recall export also needs `import scann`
first (its metadata lists the custom ops). Paths may name a version directory
(``saved_models/ctr/3``) or the model directory (``saved_models/ctr``: the highest version).
"""

from __future__ import annotations

import json
import os

from fm_keras._tf import tf
from fm_keras.errors import ExportError
from fm_keras.versions import version_dirs

METADATA = os.path.join("assets.extra", "fm_keras.json")


def resolve_version(path: str) -> str:
    """A version directory: `path` itself, or its highest numeric subdirectory."""
    if not os.path.isdir(path):
        raise ExportError(f"{path}: no such model directory")
    if os.path.exists(os.path.join(path, "saved_model.pb")):
        return path
    versions = version_dirs(path)
    if not versions:
        raise ExportError(f"{path}: not an fm_keras export (no saved_model.pb and no numeric "
                          "version directories); pass e.g. saved_models/NAME/1")
    return os.path.join(path, str(versions[-1]))


def read_metadata(version_dir: str) -> dict:
    path = os.path.join(version_dir, METADATA)
    if not os.path.exists(path):
        raise ExportError(f"{version_dir}: not an fm_keras export ({METADATA} is missing); "
                          "export one with 'fm-keras export' or 'fm-keras index'")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise ExportError(f"{path}: unreadable export metadata ({err})") from None


def export_metadata(path: str, expect: str | None = None) -> tuple[str, dict]:
    """``(version_dir, metadata)`` of an export, without loading the model (see load_export)."""
    version_dir = resolve_version(path)
    meta = read_metadata(version_dir)
    if expect and meta.get("format") != expect:
        raise ExportError(f"{version_dir}: is a {meta.get('format')!r} export, this needs a "
                          f"{expect!r} one")
    return version_dir, meta


def load_export(path: str, expect: str | None = None):
    """Loads an export; returns ``(version_dir, loaded SavedModel, metadata)``.

    Args:
        path: a version directory or a model directory (its highest version is used).
        expect: the required ``format`` (``fm_keras.ranking`` or ``fm_keras.recall``).
    """
    version_dir, meta = export_metadata(path, expect)
    if meta.get("custom_ops"):
        try:
            import scann  # noqa: F401  (registers the Scann>* ops)
        except ImportError as err:
            raise ExportError(f"{version_dir}: needs the ScaNN ops {meta['custom_ops']}; "
                              f"pip install scann ({err})") from None
    try:
        loaded = tf.saved_model.load(version_dir)
    except Exception as err:  # noqa: BLE001  (TF raises many types for a broken model)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"{version_dir}: cannot load the SavedModel: {first}") from None
    return version_dir, loaded, meta
