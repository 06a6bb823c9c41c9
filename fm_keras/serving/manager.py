"""Model versions: poll base paths, load, warm up, label, serve, unload — like TF Serving.

Semantics (tensorflow_serving/core/availability_preserving_policy.h, file_system_storage_
path_source.cc): each model's base path is polled for integer-named directories (others, such
as an exporter's temp directory, are ignored); the version policy (latest N, all, specific)
picks the aspired versions; a new version is loaded and its warmup requests replayed before it
serves, and only then are versions that are no longer aspired unloaded. A version whose load
fails stays LOADING while it is retried (``max_num_load_retries`` times,
``load_retry_interval_micros`` apart) on its own thread, so polling and the other models never
wait on it; a retry first checks that the version is still aspired (as TF Serving's
``cancel_load_retry``: a version that leaves the aspired set — its directory removed, its model
removed from the config, or no longer picked by the version policy — is marked END with its
last error and not retried). When the retries run out it is marked END with its error and is
not tried again while its directory stays; the versions already serving keep serving.

Readers never take a lock: every change publishes a fresh immutable snapshot.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from fm_keras.serving.config import BatchingOptions, ServerOptions
from fm_keras.serving.errors import ServingError, invalid_argument, not_found
from fm_keras.serving.loading import release_memory
from fm_keras.serving.opcheck import parse_allow_ops
from fm_keras.serving.predict import (Signature, arrays_from_request, find_signature,
                                      load_signatures, run_signature)
from fm_keras.versions import aspired_versions, version_names

log = logging.getLogger("fm_keras.serving")

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
MAX_WARMUP_RECORDS = 1000  # TF Serving reads at most this many (saved_model_warmup_util)
START, LOADING, AVAILABLE, UNLOADING, END = "START", "LOADING", "AVAILABLE", "UNLOADING", "END"


class Servable:
    """One loaded version of one model."""

    def __init__(self, name, version, path, loaded, signature_defs, batching, metrics):
        self.name, self.version, self.path = name, version, path
        self.loaded = loaded  # keeps the TF objects alive while requests hold this servable
        self.signature_defs = signature_defs
        self.signatures: dict[str, Signature] = load_signatures(loaded, signature_defs)
        self._batching: BatchingOptions | None = batching
        self._metrics = metrics
        self._batchers = {}
        self._lock = threading.Lock()
        self._unloaded = False

    def signature(self, name: str) -> Signature:
        return find_signature(self.signatures, name)

    def run(self, sig: Signature, arrays, timeout: float | None = None):
        """Runs one request, through the batching queue when batching is on."""
        batcher = self._batcher(sig)
        if batcher is None:
            return run_signature(sig, arrays)
        return batcher.submit(arrays, _batch_rows(arrays), timeout)

    def submit_async(self, sig: Signature, arrays, deadline: float | None):
        """``run`` for a coroutine: an asyncio future of the outputs when the call is batched
        (``Batcher.submit_async``; ``deadline`` in the running loop's time), else None (then
        call ``run``: an unbatched call has nothing to wait for)."""
        batcher = self._batcher(sig)
        if batcher is None:
            return None
        return batcher.submit_async(arrays, _batch_rows(arrays), deadline)

    def _batcher(self, sig: Signature):
        """The signature's ``Batcher`` (made on first use), or None when its calls run directly
        (batching off, an input without a batch dimension, or the version unloaded: a request
        that looked it up just before then finishes inline, as a stopped batcher's would,
        instead of starting batch threads that nothing would stop)."""
        if self._batching is None or not sig.batchable:
            return None
        batcher = self._batchers.get(sig.name)
        if batcher is None:
            from fm_keras.serving.batching import Batcher

            with self._lock:
                batcher = self._batchers.get(sig.name)
                if batcher is None and self._unloaded:
                    return None
                if batcher is None:
                    on_batch = None
                    if self._metrics is not None:
                        on_batch = lambda rows: self._metrics.record_batch(self.name, rows)  # noqa: E731
                    batcher = self._batchers[sig.name] = Batcher(
                        lambda a: run_signature(sig, a), self._batching,
                        f"{self.name}-{self.version}-{sig.name}", on_batch)
        return batcher

    def unload(self) -> None:
        """Stops the batch queues (queued requests still finish); no new queue starts."""
        with self._lock:
            self._unloaded = True
            for batcher in self._batchers.values():
                batcher.stop()


def _batch_rows(arrays: dict) -> int:
    """A batchable request's batch size: dim 0 of its inputs (``check_shapes`` made them agree)."""
    return next(iter(arrays.values())).shape[0]


class _Published:
    """What requests see for one model: available versions and labels (never mutated)."""

    __slots__ = ("versions", "labels", "latest")

    def __init__(self, versions: dict[int, Servable], labels: dict[str, int]):
        self.versions, self.labels = versions, labels
        self.latest = versions[max(versions)] if versions else None


class ModelManager:
    """Loads the models of a ``ModelServerConfig`` and keeps them current."""

    def __init__(self, options: ServerOptions, batching: BatchingOptions | None = None,
                 metrics=None):
        self._options = options
        self._batching = batching
        self._metrics = metrics
        self._lock = threading.RLock()  # serialises polls and config reloads
        self._config = None
        self._loaded: dict[str, dict[int, Servable]] = {}
        # The versions of a model whose base path changed, serving until one from the new
        # path is available (``_move_model``).
        self._outgoing: dict[str, dict[int, Servable]] = {}
        self._labels: dict[str, dict[str, int]] = {}
        self._status: dict[str, dict[int, list]] = {}
        self._failed: set[tuple[str, int]] = set()
        # (name, version) -> [cancel event, last error] of a failed load awaiting a retry
        self._retrying: dict[tuple[str, int], list] = {}
        self._poll_errors: dict[str, str] = {}
        self._allowed_ops = parse_allow_ops(options.allow_ops)
        self._published: dict[str, _Published] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # ----- requests ---------------------------------------------------------------------
    def lookup(self, name: str, version: int | None = None, label: str | None = None) -> Servable:
        """The servable for a ModelSpec, with TF Serving's NOT_FOUND / INVALID_ARGUMENT errors."""
        published = self._published.get(name)
        if label:
            if published is None:
                raise not_found(f"Servable not found for request: Latest({name})")
            if label not in published.labels:
                raise invalid_argument(f"Unrecognized servable version label: {label}")
            version = published.labels[label]
        if version is not None:
            servable = published.versions.get(version) if published else None
            if servable is None:
                raise not_found(f"Servable not found for request: Specific({name}, {version})")
            return servable
        if published is None or published.latest is None:
            raise not_found(f"Servable not found for request: Latest({name})")
        return published.latest

    def model_status(self, name: str, version: int | None = None) -> list[tuple]:
        """[(version, state, error_code, error_message)], newest first (GetModelStatus)."""
        statuses = dict(self._status.get(name, {}))
        if not statuses:
            raise not_found(f"Could not find any versions of model {name}")
        if version is not None:
            if version not in statuses:
                raise not_found(f"Could not find version {version} of model {name}")
            statuses = {version: statuses[version]}
        return [(v, *statuses[v]) for v in sorted(statuses, reverse=True)]

    def model_names(self) -> list[str]:
        return sorted(self._status)

    @property
    def config(self):
        return self._config

    # ----- lifecycle --------------------------------------------------------------------
    def start(self, config) -> None:
        """Loads the initial versions (blocking, like TF Serving's startup: their load retries
        included), then polls."""
        self.reload_config(config)
        for thread in [t for t in self._threads if t.name.startswith("load-retry-")]:
            thread.join()
        if self._options.file_system_poll_wait_seconds > 0:
            self._spawn(self._poll_loop, "fs-poll")
        if self._options.model_config_file and self._options.model_config_file_poll_wait_seconds > 0:
            self._spawn(self._config_poll_loop, "config-poll")

    def stop(self) -> None:
        self._stop.set()
        for cancel, _ in self._retrying.copy().values():  # a C-level (atomic) copy
            cancel.set()
        for thread in list(self._threads):
            thread.join(timeout=30)
        with self._lock:
            for versions in [*self._loaded.values(), *self._outgoing.values()]:
                for servable in versions.values():
                    servable.unload()

    def _spawn(self, target, name) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _poll_loop(self) -> None:
        while not self._stop.wait(self._options.file_system_poll_wait_seconds):
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - the poller must survive anything
                log.exception("file system poll failed")

    def _config_poll_loop(self) -> None:
        from fm_keras.errors import ConfigError
        from fm_keras.serving.config import load_model_server_config

        while not self._stop.wait(self._options.model_config_file_poll_wait_seconds):
            try:
                config = load_model_server_config(self._options.model_config_file)
                if config.SerializeToString(deterministic=True) != self._config.SerializeToString(
                        deterministic=True):
                    log.info("model config file changed; reloading")
                    self.reload_config(config)
            except (ConfigError, ServingError) as err:
                log.error("model config file poll: %s", err)
            except Exception:  # noqa: BLE001
                log.exception("model config file poll failed")

    # ----- config -----------------------------------------------------------------------
    def reload_config(self, config) -> None:
        """Serves exactly the models in ``config`` (HandleReloadConfigRequest semantics).

        Raises:
            ServingError: FAILED_PRECONDITION when a version label names a version that is
                not available (the other changes still apply).
        """
        with self._lock:
            old_paths = {m.name: m.base_path for m in self._config.model_config_list.config} \
                if self._config is not None else {}
            self._config = config
            new_paths = {m.name: m.base_path for m in config.model_config_list.config}
            for name in {*self._loaded, *self._outgoing}:
                if name not in new_paths:
                    self._unload_model(name)
                elif new_paths[name] != old_paths.get(name):
                    self._move_model(name)
            self.poll_once()
            errors = []
            for model in config.model_config_list.config:
                labels = dict(model.version_labels)
                bad = [f"Request to assign label to version {v} of model {model.name}, which is "
                       "not currently available for inference" for v in labels.values()
                       if v not in self._loaded.get(model.name, {})]
                if bad and not self._options.allow_version_labels_for_unavailable_models:
                    errors.extend(bad)
                else:
                    self._labels[model.name] = labels
            self._publish()
            if errors:
                raise ServingError("FAILED_PRECONDITION", "; ".join(errors))

    def _move_model(self, name: str) -> None:
        """A model whose base path changed: its versions are loaded anew from the new path,
        and the loaded ones keep serving until one of those is available (as a new version
        replaces an old one). Unloading them first, as this did, answered NOT_FOUND for as
        long as the new path's first version took to load."""
        current = self._loaded.pop(name, {})
        if current:  # (moved again before the last move's new path served: those go now)
            older, self._outgoing[name] = self._outgoing.get(name, {}), current
            self._publish()
            self._unload_detached(name, older)
        for key in [key for key in self._retrying if key[0] == name]:
            self._retrying.pop(key)[0].set()
        self._status.pop(name, None)
        self._failed = {key for key in self._failed if key[0] != name}

    def _retire_outgoing(self, name: str) -> None:
        """Unloads the versions a model served from its previous base path."""
        outgoing = self._outgoing.pop(name, {})
        if outgoing:
            self._publish()  # new requests stop seeing them; in-flight ones finish on their handle
        self._unload_detached(name, outgoing)

    @staticmethod
    def _unload_detached(name: str, outgoing: dict) -> None:
        """Unloads servables that requests can no longer look up (emptying ``outgoing``)."""
        while outgoing:
            version, servable = outgoing.popitem()
            servable.unload()
            del servable
            release_memory()
            log.info("Unloaded servable version {name: %s version: %d} of the previous base "
                     "path", name, version)

    def _unload_model(self, name: str) -> None:
        self._retire_outgoing(name)
        for version in list(self._loaded.get(name, {})):
            self._unload(name, version)
        self._loaded.pop(name, None)
        self._labels.pop(name, None)
        for key in [key for key in self._retrying if key[0] == name]:
            self._retrying.pop(key)[0].set()
        self._status.pop(name, None)
        self._failed = {key for key in self._failed if key[0] != name}
        self._publish()

    # ----- versions ---------------------------------------------------------------------
    def poll_once(self) -> None:
        """One pass over every model: load new aspired versions, then unload the rest."""
        with self._lock:
            for model in self._config.model_config_list.config:
                self._sync_model(model)

    def _sync_model(self, model) -> None:
        name = model.name
        base = os.path.abspath(os.path.expanduser(model.base_path))
        try:
            names = version_names(base)
        except OSError as err:
            # As TF Serving's file system source: a failed poll changes nothing, so the loaded
            # versions keep serving (an unreadable or briefly missing base path must not
            # unload a model that is answering requests).
            self._log_poll_error(name, f"{base}: {err.strerror or err}")
            return
        on_disk = sorted(names)
        self._poll_errors.pop(name, None)
        self._failed = {k for k in self._failed if k[0] != name or k[1] in on_disk}
        aspired = aspired_versions(model, on_disk)
        loaded = self._loaded.setdefault(name, {})
        statuses = self._status.setdefault(name, {})
        if not on_disk and not loaded:
            log.warning("No versions of servable %s found under base path %s", name, base)
        for version in [v for (n, v) in self._retrying if n == name and v not in aspired]:
            self._cancel_retries(name, version)
        for version in sorted(aspired):
            if version not in loaded and (name, version) not in self._failed | set(self._retrying):
                self._load(name, version, os.path.join(base, names[version]))
        # Availability-preserving: drop an unaspired version only if some aspired one serves,
        # or if its directory is gone and nothing else would.
        serving_aspired = [v for v in aspired if v in loaded]
        for version in list(loaded):
            if version not in aspired and (serving_aspired or version not in on_disk):
                self._unload(name, version)
        if not statuses:
            self._status.pop(name, None)

    def _log_poll_error(self, name: str, error: str) -> None:
        """Logs a base path listing failure once per distinct error (polls run every second)."""
        if self._poll_errors.get(name) != error:
            self._poll_errors[name] = error
            serving = sorted(self._loaded.get(name, {}))
            log.error("File system poll for servable %s failed: %s; keeping the loaded "
                      "versions %s serving", name, error, serving)

    def _load(self, name: str, version: int, path: str) -> None:
        """Makes the first attempt to load a version; a failure with retries left goes to a
        retry thread (the caller holds the lock, so it must not wait out the interval)."""
        self._status[name][version] = [LOADING, "OK", ""]
        try:
            servable = self._load_servable(name, version, path)
        except ServingError as err:
            self._load_failed(name, version, err, retries_left=self._options.max_num_load_retries)
            if self._options.max_num_load_retries > 0:
                cancel = threading.Event()
                self._retrying[(name, version)] = [cancel, err]
                self._spawn(lambda: self._retry_loop(name, version, path, cancel),
                            f"load-retry-{name}-{version}")
            return
        self._install(name, version, servable)

    def _retry_loop(self, name: str, version: int, path: str, cancel: threading.Event) -> None:
        """Retries a failed load every ``load_retry_interval_micros`` until it loads, the
        retries run out, or the version stops being aspired (``cancel``) or the server stops."""
        for attempt in range(self._options.max_num_load_retries):
            if cancel.wait(self._options.load_retry_interval_micros / 1e6):
                return
            with self._lock:
                if cancel.is_set() or self._stop.is_set():  # cancelled while waiting for the lock
                    return
                try:
                    servable = self._load_servable(name, version, path)
                except ServingError as err:
                    retries_left = self._options.max_num_load_retries - attempt - 1
                    self._retrying[(name, version)][1] = err
                    self._load_failed(name, version, err, retries_left)
                    if retries_left == 0:
                        del self._retrying[(name, version)]
                    continue
                del self._retrying[(name, version)]
                self._install(name, version, servable)
                # Availability-preserving unloads of the versions this one replaces.
                for model in self._config.model_config_list.config:
                    if model.name == name:
                        self._sync_model(model)
                return

    def _load_failed(self, name: str, version: int, err: ServingError, retries_left: int) -> None:
        """Logs a failed load attempt; the version stays LOADING while retries are left, else
        it is END with the error and not tried again while its directory stays."""
        log.error("Loading servable: {name: %s version: %d} failed: %s%s", name, version, err,
                  f" (retries left: {retries_left})" if retries_left else "")
        if retries_left == 0:
            self._status[name][version] = [END, err.code, err.message]
            self._failed.add((name, version))

    def _cancel_retries(self, name: str, version: int) -> None:
        """Stops retrying a version that is no longer aspired (TF Serving's cancel_load_retry);
        it is END with its last load error."""
        cancel, err = self._retrying.pop((name, version))
        cancel.set()
        self._status[name][version] = [END, err.code, err.message]
        log.info("Cancelled load retries of servable version {name: %s version: %d}: no longer "
                 "aspired", name, version)

    def _install(self, name: str, version: int, servable: Servable) -> None:
        """Publishes a loaded version as AVAILABLE."""
        self._loaded[name][version] = servable
        self._status[name][version] = [AVAILABLE, "OK", ""]
        self._publish()
        self._retire_outgoing(name)
        if self._metrics is not None:
            self._metrics.inc(":tensorflow:serving:model_load_count", {"model_name": name})
        log.info("Successfully loaded servable version {name: %s version: %d}", name, version)

    def _unload(self, name: str, version: int) -> None:
        servable = self._loaded[name].pop(version)
        self._status[name][version] = [UNLOADING, "OK", ""]
        self._publish()  # new requests stop seeing it; in-flight ones finish on their handle
        servable.unload()
        del servable
        self._status[name][version] = [END, "OK", ""]
        release_memory()
        log.info("Unloaded servable version {name: %s version: %d}", name, version)

    def _publish(self) -> None:
        self._published = {
            name: _Published(dict(self._loaded.get(name) or self._outgoing.get(name, {})),
                             dict(self._labels.get(name, {})))
            for name in {*self._loaded, *self._outgoing}}

    def _load_servable(self, name: str, version: int, path: str) -> Servable:
        from fm_keras.serving.loading import load_saved_model

        loaded, signature_defs = load_saved_model(path, self._allowed_ops)
        servable = Servable(name, version, path, loaded, signature_defs, self._batching,
                            self._metrics)
        if self._options.enable_model_warmup:
            replay_warmup(servable)
        return servable


def replay_warmup(servable: Servable) -> int:
    """Replays ``assets.extra/tf_serving_warmup_requests``; returns the number replayed.

    Raises:
        ServingError: a record is not a PredictionLog with a predict_log, or a request fails
            (TF Serving fails the load then too).
    """
    path = os.path.join(servable.path, WARMUP_FILE)
    if not os.path.exists(path):
        return 0
    from tensorflow_serving.apis import prediction_log_pb2

    from fm_keras._tf import tf

    count = 0
    started = time.monotonic()
    try:
        for record in tf.data.TFRecordDataset(path).take(MAX_WARMUP_RECORDS):
            entry = prediction_log_pb2.PredictionLog.FromString(record.numpy())
            kind = entry.WhichOneof("log_type")
            if kind != "predict_log":
                raise ServingError("UNIMPLEMENTED", f"warmup record {count}: {kind} replay is not "
                                   "supported by fm-keras serve; use predict_log records")
            request = entry.predict_log.request
            sig = servable.signature(request.model_spec.signature_name)
            run_signature(sig, arrays_from_request(sig, request.inputs))
            count += 1
    except ServingError as err:
        raise ServingError(err.code, f"Failed to warm up model {servable.name} version "
                           f"{servable.version}: {err.message}") from err
    except (tf.errors.OpError, ValueError) as err:
        raise ServingError("INVALID_ARGUMENT", f"Failed to read warmup requests {path}: {err}") from err
    log.info("Finished reading warmup data for model at %s. Number of warmup records read: %d. "
             "Elapsed time (microseconds): %d.", servable.path, count,
             (time.monotonic() - started) * 1e6)
    return count
