"""Server flags and TF Serving's text-format config files.

``ModelServerConfig`` comes from ``tensorflow_serving.config``. ``BatchingParameters``
(session_bundle_config.proto) and ``MonitoringConfig`` (monitoring_config.proto) are not
shipped in the tensorflow-serving-api wheel, so their messages are declared here with the same
package, names, field numbers and types; ``google.protobuf.text_format`` then parses exactly
the files real TF Serving reads.
"""

from __future__ import annotations

import dataclasses
import os

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from google.protobuf import wrappers_pb2

from fm_keras.errors import ConfigError

# TF Serving's defaults (model_servers/main.cc) where they matter here.
DEFAULT_MAX_MESSAGE_SIZE = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    """``tensorflow_model_server`` flags, same names and defaults (main.cc)."""

    port: int = 8500
    grpc_max_threads: int = 0  # 0: auto (4 per core, at least 8)
    grpc_channel_arguments: str = ""
    rest_api_port: int = 0  # 0: no REST API
    rest_api_num_threads: int = 0  # 0: auto (4 per core, at least 32): model-call threads
    rest_api_timeout_in_ms: int = 30000
    rest_api_max_connections: int = 1000  # not a TF Serving flag: open REST connections
    rest_api_max_body_bytes: int = 256 * 2**20  # not a TF Serving flag: REST request body
    model_name: str = "default"
    model_base_path: str = ""
    model_config_file: str = ""
    model_config_file_poll_wait_seconds: int = 0
    file_system_poll_wait_seconds: int = 1
    enable_batching: bool = False
    batching_parameters_file: str = ""
    monitoring_config_file: str = ""
    enable_model_warmup: bool = True
    max_num_load_retries: int = 5
    load_retry_interval_micros: int = 60_000_000
    allow_version_labels_for_unavailable_models: bool = False
    allow_ops: str = ""  # not a TF Serving flag: dangerous ops accepted knowingly (A,B)
    tensorflow_session_parallelism: int = 0  # 0: auto; sets intra- and inter-op threads
    tensorflow_intra_op_parallelism: int = 0  # 0: auto; threads inside one op
    tensorflow_inter_op_parallelism: int = 0  # 0: auto; ops run concurrently
    host: str = "0.0.0.0"  # not a TF Serving flag: tests bind 127.0.0.1

    def __post_init__(self):
        if not self.model_config_file and not self.model_base_path:
            raise ConfigError("either --model_config_file or --model_base_path is required")
        if self.rest_api_port and self.rest_api_port == self.port:
            raise ConfigError(f"--rest_api_port cannot be same as --port ({self.port})")
        for name in ("port", "rest_api_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise ConfigError(f"--{name} must be in [0, 65535], got {getattr(self, name)}")
        for name in ("rest_api_timeout_in_ms", "rest_api_max_connections",
                     "rest_api_max_body_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be > 0, got {getattr(self, name)}")
        for name in ("tensorflow_session_parallelism", "tensorflow_intra_op_parallelism",
                     "tensorflow_inter_op_parallelism", "rest_api_num_threads", "grpc_max_threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0 (0: auto), got {getattr(self, name)}")
        for name in ("max_num_load_retries", "load_retry_interval_micros"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.file_system_poll_wait_seconds < 0:
            raise ConfigError("--file_system_poll_wait_seconds must be >= 0 "
                              f"(0 polls once), got {self.file_system_poll_wait_seconds}")


def tf_thread_counts(opts: ServerOptions) -> tuple[int, int]:
    """(intra, inter) op threads as main.cc picks them: both intra and inter given -> those,
    else --tensorflow_session_parallelism for both; 0 leaves TensorFlow's own choice."""
    if opts.tensorflow_intra_op_parallelism and opts.tensorflow_inter_op_parallelism:
        return opts.tensorflow_intra_op_parallelism, opts.tensorflow_inter_op_parallelism
    return opts.tensorflow_session_parallelism, opts.tensorflow_session_parallelism


def apply_tf_threads(opts: ServerOptions) -> None:
    """Sets TensorFlow's op thread pools; they exist once TF has run an op, so call this first."""
    from fm_keras._tf import tf

    threading = tf.config.threading
    for count, get, put, flag in zip(
            tf_thread_counts(opts),
            (threading.get_intra_op_parallelism_threads, threading.get_inter_op_parallelism_threads),
            (threading.set_intra_op_parallelism_threads, threading.set_inter_op_parallelism_threads),
            ("intra", "inter")):
        if not count or get() == count:
            continue
        try:
            put(count)
        except RuntimeError as err:  # the context is already initialized
            raise ConfigError(
                f"--tensorflow_{flag}_op_parallelism={count} cannot be applied: TensorFlow has "
                "already started in this process; start the server in a process of its own "
                "(fm-keras serve)") from err


def _read(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as err:
        raise ConfigError(f"cannot read {what} {path!r}: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"cannot read {what} {path!r}: not UTF-8 text ({err.reason} at byte "
                          f"{err.start})") from err


def _parse_text(text: str, message, path: str):
    try:
        return text_format.Parse(text, message)
    except text_format.ParseError as err:
        raise ConfigError(f"Invalid protobuf file: '{path}': {err}") from err


def load_model_server_config(path: str):
    """Parses a text-format ``ModelServerConfig`` (``--model_config_file``)."""
    from tensorflow_serving.config import model_server_config_pb2

    config = _parse_text(_read(path, "model config file"),
                         model_server_config_pb2.ModelServerConfig(), path)
    validate_model_server_config(config, path)
    return config


def single_model_config(model_name: str, model_base_path: str):
    """The config TF Serving builds from ``--model_name`` and ``--model_base_path``."""
    from tensorflow_serving.config import model_server_config_pb2

    config = model_server_config_pb2.ModelServerConfig()
    model = config.model_config_list.config.add()
    model.name = model_name
    model.base_path = model_base_path
    model.model_platform = "tensorflow"
    return config


def validate_model_server_config(config, source: str = "config") -> None:
    """Rejects what TF Serving rejects: no list, duplicate names, missing base paths."""
    kind = config.WhichOneof("config")
    if kind is None:  # was reported as a custom_model_config the file does not have
        raise ConfigError(f"{source}: no model_config_list: the file is empty (or only comments); "
                          "list the models in model_config_list { config { ... } }")
    if kind != "model_config_list":
        raise ConfigError(f"{source}: only model_config_list is supported (not {kind})")
    names = set()
    for model in config.model_config_list.config:
        if not model.name:
            raise ConfigError(f"{source}: every model config needs a name")
        if model.name in names:
            raise ConfigError(f"{source}: Illegal to list model {model.name} multiple times in config list")
        names.add(model.name)
        if not model.base_path:
            raise ConfigError(f"{source}: model {model.name} has no base_path")
        if model.model_platform not in ("", "tensorflow"):
            raise ConfigError(f"{source}: model {model.name}: model_platform "
                              f"{model.model_platform!r} is not supported; use 'tensorflow'")
        policy = model.model_version_policy
        if policy.WhichOneof("policy_choice") == "specific" and not policy.specific.versions:
            raise ConfigError(f"{source}: model {model.name}: specific version policy lists no versions")


def _build_messages():
    """BatchingParameters and MonitoringConfig with TF Serving's package and field numbers."""
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    f = descriptor_pb2.FileDescriptorProto(
        name="fm_keras/serving/tf_serving_configs.proto", package="tensorflow.serving",
        syntax="proto3", dependency=["google/protobuf/wrappers.proto"])
    T = descriptor_pb2.FieldDescriptorProto
    wrapped = {"i64": ".google.protobuf.Int64Value", "str": ".google.protobuf.StringValue"}

    def add(msg, name, number, kind, label=T.LABEL_OPTIONAL):
        field = msg.field.add(name=name, number=number, label=label)
        if kind in wrapped:
            field.type, field.type_name = T.TYPE_MESSAGE, wrapped[kind]
        elif kind.startswith("."):
            field.type, field.type_name = T.TYPE_MESSAGE, kind
        else:
            field.type = {"bool": T.TYPE_BOOL, "int64": T.TYPE_INT64, "string": T.TYPE_STRING}[kind]

    m = f.message_type.add(name="BatchingParameters")
    for name, number, kind in [
            ("max_batch_size", 1, "i64"), ("batch_timeout_micros", 2, "i64"),
            ("max_enqueued_batches", 3, "i64"), ("num_batch_threads", 4, "i64"),
            ("thread_pool_name", 5, "str"), ("max_execution_batch_size", 6, "i64"),
            ("pad_variable_length_inputs", 8, "bool"), ("enable_large_batch_splitting", 9, "bool")]:
        add(m, name, number, kind)
    add(m, "allowed_batch_sizes", 7, "int64", T.LABEL_REPEATED)
    p = f.message_type.add(name="PrometheusConfig")
    add(p, "enable", 1, "bool")
    add(p, "path", 2, "string")
    m = f.message_type.add(name="MonitoringConfig")
    add(m, "prometheus_config", 1, ".tensorflow.serving.PrometheusConfig")
    pool.Add(f)
    get = lambda n: message_factory.GetMessageClass(pool.FindMessageTypeByName(n))  # noqa: E731
    return get("tensorflow.serving.BatchingParameters"), get("tensorflow.serving.MonitoringConfig")


BatchingParameters, MonitoringConfig = _build_messages()


@dataclasses.dataclass(frozen=True)
class BatchingOptions:
    """The BatchingParameters a batching queue uses, with TF Serving's defaults filled in."""

    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = 4  # TF Serving: number of CPUs

    def __post_init__(self):
        for name in ("max_batch_size", "max_enqueued_batches", "num_batch_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"batching parameter {name} must be >= 1, got {getattr(self, name)}")
        if self.batch_timeout_micros < 0:
            raise ConfigError(f"batch_timeout_micros must be >= 0, got {self.batch_timeout_micros}")


def load_batching_parameters(path: str | None) -> BatchingOptions:
    """Parses ``--batching_parameters_file``; no file means TF Serving's defaults."""
    defaults = BatchingOptions(num_batch_threads=os.cpu_count() or 1)
    if not path:
        return defaults
    params = _parse_text(_read(path, "batching parameters file"), BatchingParameters(), path)
    values = {}
    for name in ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches",
                 "num_batch_threads"):
        if params.HasField(name):
            values[name] = getattr(params, name).value
    return dataclasses.replace(defaults, **values)


def load_monitoring_config(path: str | None) -> tuple[bool, str]:
    """``--monitoring_config_file`` -> (prometheus enabled, path)."""
    if not path:
        return False, ""
    config = _parse_text(_read(path, "monitoring config file"), MonitoringConfig(), path)
    prometheus = config.prometheus_config
    # TF Serving's default path (monitoring_config.proto PrometheusConfig.path comment)
    return prometheus.enable, prometheus.path or "/monitoring/prometheus/metrics"


def parse_grpc_channel_arguments(text: str) -> list[tuple[str, int | str]]:
    """``--grpc_channel_arguments=k=v,k=v``; integer values are passed as ints (main.cc)."""
    result = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--grpc_channel_arguments: expected key=value, got {item!r}")
        try:
            result.append((key, int(value)))
        except ValueError:
            result.append((key, value))
    return result
