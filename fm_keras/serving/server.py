"""``ModelServer``: the manager, gRPC and REST servers and metrics, started and stopped together."""

from __future__ import annotations

import logging
import os
import threading

from fm_keras.serving.config import (ServerOptions, apply_tf_threads, load_batching_parameters,
                                     load_model_server_config, load_monitoring_config,
                                     parse_grpc_channel_arguments, single_model_config)

log = logging.getLogger("fm_keras.serving")


class ModelServer:
    """A TF Serving–compatible model server.

    ``start()`` loads the initial versions (blocking, as TF Serving does before it listens),
    then serves gRPC on ``grpc_port`` and, if ``rest_api_port`` is set, REST on ``rest_port``.
    Port 0 binds a free port (tests); the bound ports are the attributes below.
    """

    def __init__(self, options: ServerOptions):
        self.options = options
        self.grpc_port: int | None = None
        self.rest_port: int | None = None
        self._grpc = self._rest = self.manager = None
        self._stopped = threading.Event()

    def start(self, rest: bool | None = None) -> "ModelServer":
        """Starts serving. ``rest=True`` forces the REST API on (port 0 = pick a free one)."""
        from fm_keras.serving.grpc_server import start_grpc_server
        from fm_keras.serving.manager import ModelManager
        from fm_keras.serving.metrics import Metrics
        from fm_keras.serving.http_server import start_rest_server
        from fm_keras.serving.rest import RestApi

        opts = self.options
        apply_tf_threads(opts)
        config = (load_model_server_config(opts.model_config_file) if opts.model_config_file
                  else single_model_config(opts.model_name, opts.model_base_path))
        batching = load_batching_parameters(opts.batching_parameters_file) if opts.enable_batching else None
        prometheus, prometheus_path = load_monitoring_config(opts.monitoring_config_file)
        channel_arguments = parse_grpc_channel_arguments(opts.grpc_channel_arguments)
        metrics = Metrics()
        self.manager = ModelManager(opts, batching, metrics)
        self.manager.start(config)
        threads = opts.grpc_max_threads or max(8, 4 * (os.cpu_count() or 1))
        self._grpc, self.grpc_port = start_grpc_server(self.manager, metrics, opts.host, opts.port,
                                                       threads, channel_arguments)
        log.info("Running gRPC ModelServer at %s:%d ...", opts.host, self.grpc_port)
        if rest or (rest is None and opts.rest_api_port):
            api = RestApi(self.manager, metrics, opts.rest_api_timeout_in_ms,
                          prometheus_path if prometheus else "")
            self._rest, self.rest_port = start_rest_server(
                api, opts.host, opts.rest_api_port, opts.rest_api_timeout_in_ms,
                opts.rest_api_num_threads or max(32, 4 * (os.cpu_count() or 1)),
                opts.rest_api_max_connections, opts.rest_api_max_body_bytes,
                batching=batching is not None)
            log.info("Exporting HTTP/REST API at:%s:%d ...", opts.host, self.rest_port)
        return self

    def stop(self, grace: float = 1.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        # Both front ends stop taking requests now and drain theirs at the same time.
        grpc_stopped = self._grpc.stop(grace) if self._grpc is not None else None
        if self._rest is not None:
            self._rest.stop(grace)
        if grpc_stopped is not None:
            grpc_stopped.wait()
        if self.manager is not None:
            self.manager.stop()

    def wait(self) -> None:
        """Blocks until ``stop()`` (from another thread or a signal handler)."""
        while not self._stopped.wait(3600):
            pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
