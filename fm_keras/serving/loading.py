"""Loading one SavedModel version (SignatureDefs from saved_model.pb, custom ops, errors) and
freeing its memory after the unload.

A ScaNN recall export holds the custom ops ``Scann>TensorsToScann`` and
``Scann>ScannSearchBatched``; they exist in a process only after ``import scann``. We import it
only for models that use those ops, and say plainly when it is missing, as stock TF Serving
fails on such a model with "Op type not registered 'Scann>...'".
"""

from __future__ import annotations

import collections
import ctypes
import functools
import gc
import logging
import os
import weakref

from fm_keras.serving.errors import ServingError
from fm_keras.serving.opcheck import check_served_ops

log = logging.getLogger("fm_keras.serving")

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


def load_saved_model(path: str, allowed_ops=frozenset()):
    """Loads a SavedModel for serving, after checking the ops its signatures can run.

    Args:
        path: a version directory.
        allowed_ops: dangerous op types accepted anyway (``--allow_ops``; see opcheck).

    Returns:
        (loaded object, {signature key: SignatureDef}) from the MetaGraph tagged ``serve``.

    Raises:
        ServingError: NOT_FOUND (no SavedModel there), DATA_LOSS (unparseable),
            FAILED_PRECONDITION (a dangerous op that is not allowed), or the TF error's code,
            with a message that names the path.
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
    destroy_freed_resources()  # earlier models' tables, before this one's are restored
    check_served_ops(meta, path, allowed_ops)  # before anything of the model runs
    warn_newer_export_format(path)
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
    destroy_resources_when_freed(loaded)
    return loaded, dict(meta.signature_def)


def destroy_resources_when_freed(loaded) -> None:
    """Destroys a loaded SavedModel's restored resources (lookup tables, ScaNN searchers)
    after the loaded object is garbage collected, at the next `destroy_freed_resources`.

    TensorFlow never destroys them itself (``RestoredResource``: "TODO(b/124205571): Solve
    destruction of resources"): they stay in the process's resource manager after the model
    is gone, ~3 MB per load of a ranking export with 7 vocabulary tables (issue 14, item 5).
    The finalizer runs only when nothing refers to the model any more, so never under a
    request that is still running on it. It only queues the handles: a collection can run
    the finalizer inside any TensorFlow call, e.g. while a graph is being traced with the
    graph's lock held, where running an op would deadlock (or land in that graph).
    """
    from tensorflow.python.trackable.resource import RestoredResource

    from fm_keras._tf import tf

    handles = [obj.resource_handle for obj in tf.train.TrackableView(loaded).descendants()
               if isinstance(obj, RestoredResource)]
    if handles:
        weakref.finalize(loaded, _FREED.extend, handles)


# Resource handles of collected models, waiting for `destroy_freed_resources`. A deque: the
# finalizer may append from any thread.
_FREED: collections.deque = collections.deque()


def destroy_freed_resources() -> int:
    """Destroys the resources of the models collected so far (eagerly); returns how many.

    Called where no graph is being built: each `release_memory` (an unload) and each load.
    """
    from fm_keras._tf import tf

    destroyed = 0
    with tf.init_scope():
        while _FREED:
            handle = _FREED.popleft()
            try:
                tf.raw_ops.DestroyResourceOp(resource=handle, ignore_lookup_error=True)
                destroyed += 1
            except Exception as err:  # noqa: BLE001 - the next resource still goes
                log.warning("could not destroy a resource of an unloaded model: %s", err)
    return destroyed


def warn_newer_export_format(path: str) -> None:
    """Logs a warning when an fm_keras export is newer than this package understands.

    ``fm-keras serve`` serves any SavedModel by its SignatureDefs, so it does not refuse it
    (``score``/``recommend``/the pipeline do); other SavedModels have no fm_keras.json.
    """
    from fm_keras.errors import ExportError
    from fm_keras.servables import METADATA, check_format_version, read_metadata

    if not os.path.exists(os.path.join(path, METADATA)):
        return
    try:
        check_format_version(read_metadata(path), path)
    except ExportError as err:
        log.warning("%s; serving it by its SignatureDefs anyway", err)


def _code_name(error_code: int) -> str:
    from fm_keras.serving.errors import ERROR_CODE_NUMBER

    for name, number in ERROR_CODE_NUMBER.items():
        if number == error_code:
            return name
    return "UNKNOWN"


def release_memory() -> None:
    """Frees an unloaded version's memory now, not at some later garbage collection.

    A loaded SavedModel's Python objects hold reference cycles, so they (and the functions they
    registered in TensorFlow's eager context) are freed only by a full collection, which
    Python runs after an unpredictable number of allocations: across config reloads RSS rose
    in a sawtooth between full collections (toy models: 634 -> 695 MB and 70 -> 313 eager
    functions over 20 reload cycles; issue 14, item 5). ``gc.collect()`` frees them at once;
    the eager kernel cache is cleared of the unloaded functions' kernels; glibc's
    ``malloc_trim`` then hands the freed heap pages back to the system. A collection holds the
    GIL for its duration, once per unload.
    """
    from tensorflow.python.eager import context

    gc.collect()
    destroy_freed_resources()
    # The eager kernel cache keeps an entry per function name, and a new load has new names:
    # the unloaded ones would stay forever. Live models' kernels are rebuilt on their next call.
    context.context().clear_kernel_cache()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
