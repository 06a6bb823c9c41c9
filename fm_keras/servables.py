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
from fm_keras.versions import version_names

METADATA = os.path.join("assets.extra", "fm_keras.json")
# The newest export format this package reads (``format_version`` in fm_keras.json; the
# exporters write this number). A reader refuses a newer one instead of misreading it.
FORMAT_VERSION = 1


def resolve_version(path: str) -> str:
    """A version directory: `path` itself, or its highest numeric subdirectory."""
    if not os.path.isdir(path):
        raise ExportError(f"{path}: no such model directory")
    if os.path.exists(os.path.join(path, "saved_model.pb")):
        return path
    versions = version_names(path)
    if not versions:
        raise ExportError(f"{path}: not an fm_keras export (no saved_model.pb and no numeric "
                          "version directories); pass e.g. saved_models/NAME/1")
    return os.path.join(path, versions[max(versions)])


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


def check_format_version(meta: dict, version_dir: str) -> None:
    """Refuses export metadata whose ``format_version`` is newer than ``FORMAT_VERSION``.

    Raises:
        ExportError: naming the export's format version (and the package versions that wrote
            it) and the one this fm_keras understands.
    """
    found = meta.get("format_version", FORMAT_VERSION)
    if not isinstance(found, int) or isinstance(found, bool) or found < 1:
        raise ExportError(f"{version_dir}: {METADATA}: format_version {found!r} is not a "
                          "positive integer")
    if found > FORMAT_VERSION:
        from fm_keras import __version__

        written = meta.get("versions", {}).get("fm_keras_export") or meta.get(
            "versions", {}).get("fm_keras", "unknown")
        raise ExportError(
            f"{version_dir}: {METADATA}: export format_version {found} (written by fm_keras "
            f"{written}) is newer than format_version {FORMAT_VERSION} that this fm_keras "
            f"{__version__} understands; upgrade fm_keras or re-export with this one")


def export_metadata(path: str, expect: str | None = None) -> tuple[str, dict]:
    """``(version_dir, metadata)`` of an export, without loading the model (see load_export).

    The one gate of every reader of an export (score, recommend, index, the pipeline):
    it checks the format version and, with ``expect``, the format.

    Raises:
        ExportError: not an export, unreadable metadata, a newer format_version, or the
            wrong format.
    """
    version_dir = resolve_version(path)
    meta = read_metadata(version_dir)
    check_format_version(meta, version_dir)
    if expect and meta.get("format") != expect:
        raise ExportError(f"{version_dir}: is a {meta.get('format')!r} export, this needs a "
                          f"{expect!r} one")
    return version_dir, meta


def signature_inputs(fn, meta: dict) -> dict[str, tf.TensorSpec]:
    """A loaded signature's inputs (name -> `tf.TensorSpec`) in the feature spec's order.

    A loaded SavedModel gives them in the order of a protobuf map, which changed from one
    process to the next: "missing column" errors listed what a signature needs in a new order
    each run. Here: the export's features as configured (``meta["features"]``, else
    ``meta["query_features"]``), then any other input by name.

    Args:
        fn: a signature of a loaded export (``loaded.signatures[name]``).
        meta: the export's metadata (`load_export`).
    """
    specs = fn.structured_input_signature[1]
    spec_order = [e["config"]["name"] for e in meta.get("features") or []]
    spec_order += list(meta.get("query_features") or [])
    order = [n for n in dict.fromkeys(spec_order) if n in specs]
    order += sorted(n for n in specs if n not in order)
    return {n: specs[n] for n in order}


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
