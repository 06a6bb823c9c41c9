"""``fm-keras serve`` (tensorflow_model_server's flags) and ``fm-keras query``.

Flags keep TF Serving's names and forms: ``--port=8500``, ``--rest_api_port=8501``,
``--enable_batching`` or ``--enable_batching=true``. Only ``--host`` is ours.
"""

from __future__ import annotations

import argparse
import json
import sys


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_commands(subparsers) -> dict:
    """Adds ``serve`` and ``query`` to the fm-keras subparsers; returns {name: handler}."""
    from fm_keras.serving.config import ServerOptions

    d = ServerOptions.__dataclass_fields__
    p = subparsers.add_parser("serve", help="TF Serving-compatible model server (same flags)")
    for name, kind, text in [
            ("port", int, "gRPC port"), ("rest_api_port", int, "REST port (0: no REST API)"),
            ("grpc_max_threads", int, "gRPC worker threads (0: auto)"),
            ("grpc_channel_arguments", str, "k=v,... e.g. grpc.max_receive_message_length=N"),
            ("rest_api_num_threads", int, "threads for REST model calls not run inline (0: auto)"),
            ("rest_api_timeout_in_ms", int, "REST request timeout: arrival and model call"),
            ("rest_api_max_connections", int, "fm-keras only: open REST connections allowed"),
            ("rest_api_max_body_bytes", int, "fm-keras only: largest REST request body"),
            ("allow_ops", str, "fm-keras only: file-system/print/save/py_func ops to accept in "
                               "served signatures, e.g. ReadFile,PrintV2 (a model is a program)"),
            ("model_name", str, "model name (ignored with --model_config_file)"),
            ("model_base_path", str, "directory of integer versions"),
            ("model_config_file", str, "text-format ModelServerConfig"),
            ("model_config_file_poll_wait_seconds", int, "re-read the config file (0: never)"),
            ("file_system_poll_wait_seconds", int, "poll base paths for versions (0: once)"),
            ("batching_parameters_file", str, "text-format BatchingParameters"),
            ("monitoring_config_file", str, "text-format MonitoringConfig (Prometheus)"),
            ("max_num_load_retries", int, "retries of a failed version load"),
            ("load_retry_interval_micros", int, "wait between load retries"),
            ("tensorflow_session_parallelism", int, "TF op threads, intra and inter (0: auto)"),
            ("tensorflow_intra_op_parallelism", int, "threads inside one op (0: auto)"),
            ("tensorflow_inter_op_parallelism", int, "ops run at once (0: auto)"),
            ("host", str, "fm-keras only: address to bind (default all interfaces)")]:
        p.add_argument(f"--{name}", type=kind, default=d[name].default, help=text)
    for name, text in [("enable_batching", "batch concurrent requests"),
                       ("enable_model_warmup", "replay assets.extra/tf_serving_warmup_requests"),
                       ("allow_version_labels_for_unavailable_models",
                        "allow labels on versions that are not loaded")]:
        p.add_argument(f"--{name}", type=_bool, nargs="?", const=True, default=d[name].default,
                       help=text)

    q = subparsers.add_parser("query", help="one request to a TF Serving (or fm-keras serve) server")
    q.add_argument("--server", default="localhost:8500", help="gRPC host:port")
    q.add_argument("--rest", help="use REST at this URL instead, e.g. http://localhost:8501 "
                   "(localhost:8501 means the same)")
    q.add_argument("--model_name", required=True)
    q.add_argument("--signature_name", default="")
    q.add_argument("--version", type=int)
    q.add_argument("--label")
    q.add_argument("--input", action="append", default=[], metavar="NAME=V1,V2",
                   help="an input column (repeat); numeric inputs are sent as float32 when the "
                        "signature says so; values with commas: a JSON list, "
                        "NAME='[\"a,b\", \"c\"]'")
    q.add_argument("--status", action="store_true", help="print the model's version status")
    q.add_argument("--metadata", action="store_true", help="print the model's signatures")
    q.add_argument("--timeout", type=float, default=5.0, help="seconds per call")
    return {"serve": serve, "query": query}


def serve(args) -> int:
    import logging
    import signal

    from fm_keras.errors import ConfigError
    from fm_keras.serving.config import ServerOptions
    from fm_keras.serving.errors import ServingError
    from fm_keras.serving.server import ModelServer

    fields = ServerOptions.__dataclass_fields__
    options = ServerOptions(**{k: getattr(args, k) for k in fields if hasattr(args, k)})
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    server = ModelServer(options)
    try:
        server.start()
    except ServingError as err:
        server.stop()
        raise ConfigError(f"cannot start the model server: {err.message}") from err
    except OSError as err:
        server.stop()
        raise ConfigError(f"cannot start the model server: {err}") from err
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: server.stop())
    rest = f", REST on {options.host}:{server.rest_port}" if server.rest_port else ""
    print(f"fm-keras: serving gRPC on {options.host}:{server.grpc_port}{rest}", file=sys.stderr,
          flush=True)
    server.wait()
    return 0


def input_columns(specs: list[str]) -> dict[str, list]:
    """`fm-keras query`'s ``--input`` flags -> {input name: one value per row}.

    ``NAME=V1,V2`` splits at commas. ``NAME=[...]`` is a JSON list, for values that hold
    commas: strings or numbers (sent as their text), or, for a rank-2 input such as
    ``exclude_item_ids``, lists of strings (``NAME=[["a,b", "c"], []]``).

    Raises:
        ConfigError: a flag without ``NAME=``, or a ``[`` value that is not such a JSON list.
    """
    from fm_keras.errors import ConfigError

    columns = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        if not sep or not name:
            raise ConfigError(f"--input must be NAME=V1,V2,... or NAME=[JSON list], got {spec!r}")
        columns[name] = _json_values(name, values) if values.lstrip().startswith("[") \
            else values.split(",")
    return columns


def _json_values(name: str, text: str) -> list:
    """A ``--input NAME=[...]`` value: numbers become their JSON text, lists stay lists."""
    from fm_keras.errors import ConfigError

    def cell(v, nested: bool):
        if isinstance(v, str):
            return v
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return json.dumps(v)
        if isinstance(v, list) and not nested:
            return [cell(x, True) for x in v]
        raise ValueError(f"{json.dumps(v)} is not a string or number"
                         + ("" if nested else " or a list of them"))

    try:
        values = json.loads(text)
        if not isinstance(values, list):
            raise ValueError("not a list")
        return [cell(v, False) for v in values]
    except ValueError as err:
        raise ConfigError(f"--input {name}: a value starting with '[' is a JSON list of strings "
                          f"or numbers (of lists of them for a rank-2 input), e.g. "
                          f"{name}='[\"a,b\", \"c\"]': {err}") from None


def query(args) -> int:
    from fm_keras.errors import ConfigError
    from fm_keras.serving.errors import ServingError

    if args.version is not None and args.label is not None:
        # TF Serving's ModelSpec holds one of them (a oneof): the label was dropped silently.
        raise ConfigError("--version and --label name the same thing (TF Serving's ModelSpec "
                          "holds one of them); give one")
    columns = input_columns(args.input)
    try:
        if args.rest:
            result = _query_rest(args, columns)
        else:
            result = _query_grpc(args, columns)
    except ServingError as err:
        raise ConfigError(f"{err.code}: {err.message}") from err
    print(json.dumps(result, indent=2))
    return 0


def _query_grpc(args, columns):
    from google.protobuf import json_format

    from fm_keras.serving.client import GrpcClient, rest_json

    with GrpcClient(args.server, timeout=args.timeout) as client:
        # --status and --metadata print the replies as TF Serving's REST API returns them
        if args.status:
            return rest_json(client.status_response(args.model_name, args.version, args.label))
        if args.metadata:
            return rest_json(client.metadata_response(args.model_name, args.version,
                                                      args.label))
        signatures = client.metadata(args.model_name, args.version, args.label)
        signatures = json_format.MessageToDict(signatures, preserving_proto_field_name=True)
        specs = signature_inputs(signatures, args.signature_name)
        inputs = tensor_values(typed_inputs(columns, specs), specs)
        outputs = client.predict(args.model_name, inputs, signature=args.signature_name,
                                 version=args.version, label=args.label)
        return {k: [x.decode() if isinstance(x, bytes) else x for x in v.tolist()]
                if v.dtype == object and v.ndim == 1 else _plain(v) for k, v in outputs.items()}


def _plain(array):
    if array.dtype == object:
        return [[x.decode() for x in row] for row in array.tolist()]
    return array.tolist()


def _query_rest(args, columns):
    from fm_keras.errors import ConfigError
    from fm_keras.serving.client import RestClient

    try:
        client = RestClient(args.rest, timeout=args.timeout)
    except ValueError as err:  # not a URL that can work: say so once, do not retry
        raise ConfigError(f"--rest: {err}") from None
    if args.status:
        return client.status(args.model_name, args.version, args.label)
    metadata = client.metadata(args.model_name, args.version, args.label)
    if args.metadata:
        return metadata
    signatures = metadata.get("metadata", {}).get("signature_def", {})
    inputs = typed_inputs(columns, signature_inputs(signatures, args.signature_name))
    return client.predict(args.model_name, inputs=inputs, signature=args.signature_name,
                          version=args.version, label=args.label)


def signature_inputs(signatures: dict, name: str) -> dict:
    """The ``inputs`` of one signature of a SignatureDefMap as JSON (the REST metadata's
    ``signature_def``, or the gRPC one through `json_format.MessageToDict`); ``{}`` when the
    signature is not there (the server then answers the request with its own error)."""
    return signatures.get("signature_def", {}).get(name or "serving_default", {}).get("inputs", {})


def tensor_values(typed: dict[str, list], inputs: dict) -> dict:
    """`typed_inputs`' values for a gRPC request: a ``DT_INT64`` input as an int64 array, since
    `tf.make_tensor_proto` makes Python ints int32 and the server refuses those ("Expects
    arg[1] (exclude_item_keys) to be int64 but int32 is provided"); other inputs as they are
    (text and float32 are inferred right). REST needs no such step: JSON numbers take the
    signature's dtype there."""
    import numpy as np

    return {name: np.asarray(values, dtype=np.int64)
            if inputs.get(name, {}).get("dtype") == "DT_INT64" else values
            for name, values in typed.items()}


def typed_inputs(columns: dict[str, list[str]], inputs: dict) -> dict[str, list]:
    """`fm-keras query`'s ``--input NAME=V1,V2`` columns typed by the signature, the same for
    gRPC and REST.

    Args:
        columns: {input name: its values as text, one per row} (`input_columns`); a value of
            a rank-2 input is a list of strings or text of ``|``-separated ones.
        inputs: the signature's inputs as JSON (`signature_inputs`): ``dtype`` and
            ``tensor_shape.dim``.

    Returns:
        {name: values}: float numbers for a ``DT_FLOAT`` input, text otherwise (an id ``007``
        stays ``"007"``); for an input of rank 2 (the recall export's ``exclude_item_ids``)
        each value is a list (text: split at ``|``, ASCII spaces and control characters
        around each item dropped, as ``recommend`` does), padded with ``""`` to the longest;
        a rank-2 ``DT_INT64`` input (``exclude_item_keys``) takes the same lists of ids and
        gets their item keys (`fm_keras.exclusion.item_keys`, 0 pads).

    Raises:
        ConfigError: a value of a ``DT_FLOAT`` input that is not a number; a rank-2 input
            without rows (``NAME=[]``).
    """
    import numpy as np

    # What `recommend` cuts off around a listed id, not str.strip's Unicode blanks too
    # ("i1\u3000" is no catalog id there).
    from fm_keras.arrow_text import BLANKS
    from fm_keras.errors import ConfigError
    from fm_keras.exclusion import item_keys

    typed = {}
    for name, values in columns.items():
        spec = inputs.get(name, {})
        cells = values
        if len(spec.get("tensor_shape", {}).get("dim", [])) == 2:
            rows = [value if isinstance(value, list) else
                    [v.strip(BLANKS) for v in value.split("|")] if value else []
                    for value in values]
            if not rows:
                raise ConfigError(f"--input {name}: no rows ([]); give a list per row, [] for "
                                  f"one that excludes nothing: {name}='[[]]'")
            width = max(1, *(len(row) for row in rows))
            cells = [row + [""] * (width - len(row)) for row in rows]
            if spec.get("dtype") == "DT_INT64":
                ids = np.array([[v.encode("utf-8") for v in row] for row in cells], dtype=object)
                cells = item_keys(ids.reshape(len(cells), width)).tolist()
        if spec.get("dtype") == "DT_FLOAT":
            try:
                cells = [float(v) for v in cells]
            except ValueError:
                raise ConfigError(f"--input {name}: {values} are not all numbers (the signature "
                                  "takes float32)") from None
        typed[name] = cells
    return typed
