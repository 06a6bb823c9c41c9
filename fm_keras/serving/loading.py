"""Loading one SavedModel version: SignatureDefs from saved_model.pb, custom ops, errors.

A ScaNN recall export holds the custom ops ``Scann>TensorsToScann`` and
``Scann>ScannSearchBatched``; they exist in a process only after ``import scann``. We import it
only for models that use those ops, and say plainly when it is missing, as stock TF Serving
fails on such a model with "Op type not registered 'Scann>...'".
"""

from __future__ import annotations

import os

from fm_keras.serving.errors import ServingError

SCANN_HINT = ("this model uses ScaNN custom ops (Scann>...): it needs the ScaNN-enabled server "
              "(pip install 'scann[tf]' here; the ScaNN-enabled TF Serving image in production), "
              "or export the brute-force recall model instead")


def custom_ops(meta_graph) -> set[str]:
    """Op names with a '>' namespace (custom op libraries) used anywhere in the graph."""
    ops = {node.op for node in meta_graph.graph_def.node}
    for function in meta_graph.graph_def.library.function:
        ops.update(node.op for node in function.node_def)
    return {op for op in ops if ">" in op}


def _import_scann() -> None:
    try:
        import scann  # noqa: F401 - registers the Scann> ops with TensorFlow
    except ImportError as err:
        raise ServingError("FAILED_PRECONDITION", f"cannot import scann ({err}): {SCANN_HINT}") from err


def load_saved_model(path: str):
    """Loads a SavedModel for serving.

    Returns:
        (loaded object, {signature key: SignatureDef}) from the MetaGraph tagged ``serve``.

    Raises:
        ServingError: NOT_FOUND (no SavedModel there), DATA_LOSS (unparseable), or the TF
            error's code, with a message that names the path.
    """
    from tensorflow.python.saved_model import loader_impl

    from fm_keras._tf import tf

    try:
        saved_model = loader_impl.parse_saved_model(path)
    except OSError as err:
        code = "DATA_LOSS" if os.path.exists(os.path.join(path, "saved_model.pb")) else "NOT_FOUND"
        raise ServingError(code, f"Failed to load SavedModel at {path}: {err}") from err
    metas = [m for m in saved_model.meta_graphs if "serve" in m.meta_info_def.tags]
    if not metas:
        raise ServingError("NOT_FOUND", f"Could not find meta graph def matching supplied tags: "
                           f"{{ serve }} in SavedModel at {path}")
    meta = metas[0]
    if any(op.startswith("Scann>") for op in custom_ops(meta)):
        _import_scann()
    try:
        loaded = tf.saved_model.load(path, tags=["serve"])
    except Exception as err:  # noqa: BLE001 - any load failure leaves the old version serving
        message = str(err)
        if "Op type not registered 'Scann>" in message:
            raise ServingError("FAILED_PRECONDITION", f"{path}: {SCANN_HINT}") from err
        code = "UNKNOWN"
        if isinstance(err, tf.errors.OpError):
            code = _code_name(err.error_code)
        raise ServingError(code, f"Failed to load SavedModel at {path}: {message}") from err
    return loaded, dict(meta.signature_def)


def _code_name(error_code: int) -> str:
    from fm_keras.serving.errors import ERROR_CODE_NUMBER

    for name, number in ERROR_CODE_NUMBER.items():
        if number == error_code:
            return name
    return "UNKNOWN"
