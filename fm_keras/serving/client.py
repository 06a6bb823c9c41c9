"""Clients for TF Serving and ``fm-keras serve``: gRPC (official stubs) and REST.

Every call has an explicit timeout; UNAVAILABLE (gRPC) and 503 / connection refused (REST)
are retried with exponential backoff, nothing else is. Failures raise ``ServingError`` with
the server's status code and message, whichever transport was used.

    with GrpcClient("localhost:8500", timeout=2.0) as client:
        out = client.predict("ranking", {"user_id": ["u1"], "item_id": ["i9"], "price": [3.5]})
        out["probability"]          # numpy array [batch]
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import NamedTuple

import numpy as np

from fm_keras.serving.errors import HTTP_STATUS, ServingError

_HTTP_TO_CODE = {}
for _code, _http in HTTP_STATUS.items():
    _HTTP_TO_CODE.setdefault(_http, _code)


def _retrying(call, retries: int, backoff: float, retryable):
    for attempt in range(retries + 1):
        try:
            return call()
        except ServingError as err:
            if not retryable(err) or attempt == retries:
                raise
            time.sleep(backoff * 2**attempt)


class GrpcClient:
    """PredictionService / ModelService client over one channel.

    Args:
        target: ``host:port`` of the gRPC API.
        timeout: seconds per call (gRPC deadline).
        retries: extra attempts after UNAVAILABLE.
        backoff: first retry delay in seconds, doubled each time.
        max_message_size: client-side limit for sent and received messages, bytes.
    """

    def __init__(self, target: str = "localhost:8500", timeout: float = 5.0, retries: int = 3,
                 backoff: float = 0.05, max_message_size: int = 64 * 1024 * 1024):
        import grpc
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self._grpc = grpc
        self._channel = grpc.insecure_channel(target, options=[
            ("grpc.max_send_message_length", max_message_size),
            ("grpc.max_receive_message_length", max_message_size)])
        self._predict = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)

    def _call(self, method, request):
        def once():
            try:
                return method(request, timeout=self.timeout)
            except self._grpc.RpcError as err:
                raise ServingError(err.code().name, err.details() or str(err)) from None
        return _retrying(once, self.retries, self.backoff, lambda e: e.code == "UNAVAILABLE")

    @staticmethod
    def _spec(spec, model, version=None, label=None, signature=""):
        _one_version_choice(version, label)
        spec.name = model
        if version is not None:
            spec.version.value = version
        elif label:
            spec.version_label = label
        if signature:
            spec.signature_name = signature

    def predict_response(self, model: str, inputs: dict, signature: str = "",
                         version: int | None = None, label: str | None = None,
                         output_filter=()):
        """The raw PredictResponse (with ``model_spec.version`` of the version that answered)."""
        from tensorflow_serving.apis import predict_pb2

        from fm_keras._tf import tf

        request = predict_pb2.PredictRequest(output_filter=list(output_filter))
        self._spec(request.model_spec, model, version, label, signature)
        for name, value in inputs.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
        return self._call(self._predict.Predict, request)

    def predict(self, model: str, inputs: dict, **kwargs) -> dict[str, np.ndarray]:
        """Predict; returns {output alias: numpy array}. kwargs: see ``predict_response``."""
        from fm_keras._tf import tf

        response = self.predict_response(model, inputs, **kwargs)
        return {name: tf.make_ndarray(proto) for name, proto in response.outputs.items()}

    def metadata_response(self, model: str, version: int | None = None,
                          label: str | None = None):
        """GetModelMetadata's reply (a ``GetModelMetadataResponse``, its signature defs packed
        in an ``Any``); `rest_json` of it is what the REST metadata (GET
        /v1/models/NAME/metadata) returns."""
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        self._spec(request.model_spec, model, version, label)
        return self._call(self._predict.GetModelMetadata, request)

    def metadata(self, model: str, version: int | None = None, label: str | None = None):
        """The model's SignatureDefMap."""
        from tensorflow_serving.apis import get_model_metadata_pb2

        response = self.metadata_response(model, version, label)
        result = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(result)
        return result

    def status(self, model: str, version: int | None = None,
               label: str | None = None) -> list[dict]:
        """[{"version", "state", "error_code", "error_message"}] of each version (version and
        error_code ints, state the enum's name: "AVAILABLE", ...); `status_response` gives
        the reply itself."""
        from tensorflow_serving.apis import get_model_status_pb2

        response = self.status_response(model, version, label)
        State = get_model_status_pb2.ModelVersionStatus.State
        return [{"version": s.version, "state": State.Name(s.state),
                 "error_code": s.status.error_code, "error_message": s.status.error_message}
                for s in response.model_version_status]

    def status_response(self, model: str, version: int | None = None,
                        label: str | None = None):
        """GetModelStatus' reply (a ``GetModelStatusResponse``); `rest_json` of it is what
        the REST status (GET /v1/models/NAME) returns.

        GetModelStatus takes no label (TF Serving ignores it), so a ``label`` is resolved to
        its version by GetModelMetadata first, as the REST ``/labels/L`` status path does.
        """
        from tensorflow_serving.apis import get_model_status_pb2

        if label:
            _one_version_choice(version, label)
            version = self.metadata_response(model, label=label).model_spec.version.value
        request = get_model_status_pb2.GetModelStatusRequest()
        self._spec(request.model_spec, model, version)
        return self._call(self._models.GetModelStatus, request)

    def reload_config(self, config) -> None:
        """HandleReloadConfigRequest with a ModelServerConfig (message or text)."""
        from google.protobuf import text_format
        from tensorflow_serving.apis import model_management_pb2
        from tensorflow_serving.config import model_server_config_pb2

        if isinstance(config, str):
            config = text_format.Parse(config, model_server_config_pb2.ModelServerConfig())
        self._call(self._models.HandleReloadConfigRequest,
                   model_management_pb2.ReloadConfigRequest(config=config))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def rest_base_url(url: str) -> str:
    """The REST API's base URL: `url` without a trailing ``/``, ``http://`` put before a bare
    ``host:port``.

    ``RestClient("localhost:8501")`` used to retry, then fail UNAVAILABLE with urllib's
    "unknown url type"; a URL that cannot work fails here, before any request.

    Raises:
        ValueError: naming `url` and the fix: another scheme than http/https, no host, or a
            port that is not a number in 1..65535.
    """
    import urllib.parse

    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    fix = "give http://HOST:PORT of the REST API, e.g. http://localhost:8501"
    parts = urllib.parse.urlsplit(text)
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(f"REST base URL {url!r}: scheme {parts.scheme!r} is not http or "
                         f"https; {fix}")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if not parts.hostname or port == 0 or parts.query or parts.fragment:
        raise ValueError(f"REST base URL {url!r}: not a URL of a host and port; {fix}")
    return text.rstrip("/")


class RestClient:
    """The REST API with the standard library only.

    Args:
        base_url: e.g. ``http://localhost:8501``; a bare ``host:port`` (the form of
            ``GrpcClient``'s target) means ``http://host:port``.
        timeout: seconds per HTTP request.
        retries: extra attempts after 503 or a refused connection.
        backoff: first retry delay in seconds, doubled each time.

    Raises:
        ValueError: a timeout that is not positive, or a base_url that is not an http(s) URL
            with a host (e.g. ``grpc://host:8500``, ``localhost:port``), naming the fix.
    """

    def __init__(self, base_url: str = "http://localhost:8501", timeout: float = 5.0,
                 retries: int = 3, backoff: float = 0.05):
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.base_url = rest_base_url(base_url)
        self.timeout, self.retries, self.backoff = timeout, retries, backoff

    def _request(self, path: str, body=None):
        data = None if body is None else json.dumps(body).encode("utf-8")

        def once():
            request = urllib.request.Request(self.base_url + path, data=data,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as err:
                text = err.read().decode("utf-8", "replace")
                try:
                    message = json.loads(text).get("error", text)
                except ValueError:
                    message = text
                raise ServingError(_HTTP_TO_CODE.get(err.code, "UNKNOWN"), message) from None
            except (urllib.error.URLError, ConnectionError) as err:
                reason = getattr(err, "reason", err)
                if isinstance(reason, TimeoutError) or "timed out" in str(reason):
                    raise ServingError("DEADLINE_EXCEEDED", f"{path}: {reason}") from None
                raise ServingError("UNAVAILABLE", f"{self.base_url}: {reason}") from None
            except TimeoutError as err:
                raise ServingError("DEADLINE_EXCEEDED", f"{path}: {err}") from None

        return _retrying(once, self.retries, self.backoff, lambda e: e.code == "UNAVAILABLE")

    @staticmethod
    def _model_path(model, version=None, label=None):
        _one_version_choice(version, label)
        path = f"/v1/models/{model}"
        if version is not None:
            path += f"/versions/{version}"
        elif label:
            path += f"/labels/{label}"
        return path

    def predict(self, model: str, instances=None, inputs=None, signature: str = "",
                version: int | None = None, label: str | None = None) -> dict:
        """Row (``instances``) or columnar (``inputs``) predict; returns the JSON reply."""
        if (instances is None) == (inputs is None):
            raise ValueError("pass exactly one of instances= (row format) or inputs= (columnar)")
        body = {"instances": instances} if instances is not None else {"inputs": inputs}
        if signature:
            body["signature_name"] = signature
        return self._request(self._model_path(model, version, label) + ":predict", body)

    def status(self, model: str, version: int | None = None, label: str | None = None) -> dict:
        """The model's version status (GET /v1/models/NAME[/versions/V | /labels/L])."""
        return self._request(self._model_path(model, version, label))

    def metadata(self, model: str, version: int | None = None, label: str | None = None) -> dict:
        return self._request(self._model_path(model, version, label) + "/metadata")

    def close(self) -> None:
        """Nothing to release: each request opens and closes its own connection. Here so that
        code written for ``GrpcClient`` (``close()``, ``with ... as client``) takes either."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def rest_json(response) -> dict:
    """A ``GetModelStatusResponse`` or ``GetModelMetadataResponse`` as TF Serving's REST API
    returns it: the proto's JSON with its field names and the fields left at their defaults
    (``"error_code": "OK"``), the signature defs without the ``Any``'s ``@type``."""
    from google.protobuf import json_format

    result = json_format.MessageToDict(response, preserving_proto_field_name=True,
                                       always_print_fields_with_no_presence=True)
    result.get("metadata", {}).get("signature_def", {}).pop("@type", None)
    return result


def arrays_from_rest(outputs, specs: dict) -> dict[str, np.ndarray]:
    """A REST columnar reply's ``outputs`` -> {alias: numpy array}, as gRPC's
    ``tf.make_ndarray`` gives them.

    Args:
        outputs: the reply's ``outputs``: {alias: nested lists}, or the nested lists alone
            when the signature has one output.
        specs: the signature's outputs from the REST metadata, {alias: {"dtype": "DT_FLOAT",
            ...}}.

    Returns:
        {alias: array} with the dtype of the signature (``DT_STRING``: an object array of
        ``bytes``; ``{"b64": ...}`` values are decoded) and the shape of the nested lists.

    Raises:
        KeyError: an output the signature does not list.
    """
    import base64

    from tensorflow.core.framework import types_pb2

    from fm_keras._tf import tf

    def to_bytes(value):
        if isinstance(value, list):
            return [to_bytes(v) for v in value]
        if isinstance(value, dict):
            return base64.b64decode(value["b64"])
        return value.encode("utf-8")

    if len(specs) == 1:  # TF Serving does not wrap a single output in an object
        outputs = {next(iter(specs)): outputs}
    arrays = {}
    for alias, value in outputs.items():
        dtype = tf.dtypes.as_dtype(types_pb2.DataType.Value(specs[alias]["dtype"]))
        arrays[alias] = (np.array(to_bytes(value), dtype=object) if dtype == tf.string
                         else np.asarray(value, dtype=dtype.as_numpy_dtype))
    return arrays


def json_column(column):
    """An input column (list, NumPy array, scalar) as TF Serving's REST JSON takes it.

    Bytes (what gRPC outputs such as a recall's ``item_ids`` are, and what gRPC inputs may
    be) become text when they are UTF-8 and ``{"b64": ...}`` otherwise, so that the server
    reads the same bytes as over gRPC; NumPy values become JSON numbers and lists.
    """
    import base64

    def convert(value):
        if isinstance(value, list):
            return [convert(v) for v in value]
        if isinstance(value, bytes):
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError:
                return {"b64": base64.b64encode(value).decode("ascii")}
        return value

    return convert(np.asarray(column).tolist())


class ArmResponse(NamedTuple):
    """A response and the arm that served it.

    Attributes:
        arm: the arm's name (log it with the request: ``fm_keras.experiments.events``).
        model: the model name asked.
        label: the version label asked, or None.
        version: the version that answered (an int, over either transport).
        outputs: {output alias: numpy array} with the signature's dtypes and shapes, the same
            over gRPC and REST: ``DT_FLOAT`` -> float32, ``DT_INT64`` -> int64, ``DT_STRING``
            -> an object array of ``bytes`` (as ``tf.make_ndarray`` gives), ...
    """

    arm: str
    model: str
    label: str | None
    version: int | None
    outputs: dict


class ExperimentClient:
    """Routes each request to its unit's arm: the arm's (model, version label or version).

    TF Serving serves versions and labels but does not split traffic; this client does: the
    unit id is hashed with the experiment's salt (``fm_keras.experiments.assignment``), so a
    unit gets the same arm in every request, process and release.

    Args:
        experiment: a loaded ``fm_keras.experiments.config.ABExperiment``.
        client: a ``GrpcClient`` or ``RestClient`` of the server that serves the arms.

    Example:
        with GrpcClient("localhost:8500") as grpc_client:
            router = ExperimentClient(load_ab_experiment("ab.yaml"), grpc_client)
            reply = router.predict("u42", {"user_id": ["u42"], ...})
            log(unit="u42", arm=reply.arm, ...)
    """

    def __init__(self, experiment, client: GrpcClient | RestClient):
        from fm_keras.experiments.assignment import Assigner

        if not isinstance(client, (GrpcClient, RestClient)):
            raise TypeError(f"client must be a GrpcClient or RestClient, got "
                            f"{type(client).__name__}")
        self.experiment, self.client = experiment, client
        self.assigner = Assigner(experiment)

    def arm(self, unit: str):
        """The unit's arm (an ``Arm``)."""
        return self.experiment.arm(self.assigner.arm(unit))

    def predict(self, unit: str, inputs: dict, signature: str = "") -> ArmResponse:
        """Predicts with the unit's arm; ``inputs`` are columns as for ``predict``.

        Over REST this takes two requests: the arm's metadata (the version its label names
        now, and the output dtypes), then the predict of that version.

        Args:
            unit: the unit id (e.g. the user id) that picks the arm.
            inputs: {input alias: column}, each column [batch, ...].
            signature: the signature name; "" is ``serving_default``.

        Returns:
            The same structure over gRPC and REST: an ``ArmResponse`` whose ``outputs`` are
            {alias: numpy array} with the signature's dtypes and shapes ([batch, ...];
            strings as ``bytes``) and whose ``version`` is the int version that answered.

        Raises:
            ServingError: the server's error (e.g. an unknown label: INVALID_ARGUMENT).
            ValueError: a unit id that is not text or an integer: None, empty, a float, a
                bool, a date/time or pd.NA (``Assigner.arm``).
        """
        arm = self.arm(unit)
        if isinstance(self.client, GrpcClient):
            from fm_keras._tf import tf

            response = self.client.predict_response(arm.model, inputs, signature=signature,
                                                    version=arm.version, label=arm.label)
            outputs = {k: tf.make_ndarray(v) for k, v in response.outputs.items()}
            version = response.model_spec.version.value or arm.version
        else:
            version, outputs = self._rest_predict(arm, inputs, signature)
        return ArmResponse(arm.name, arm.model, arm.label, version, outputs)

    def _rest_predict(self, arm, inputs: dict, signature: str) -> tuple[int, dict]:
        # A REST reply names neither the version that answered nor the outputs' dtypes (and a
        # single output comes unwrapped): the arm's metadata, by its label or version, gives
        # both, then the predict asks that exact version. A label moved and its old version
        # unloaded in between gives NOT_FOUND: the label is resolved once more.
        from fm_keras.versions import parse_version

        body = {k: json_column(v) for k, v in inputs.items()}
        for attempt in range(2):
            meta = self.client.metadata(arm.model, version=arm.version, label=arm.label)
            version = parse_version(meta["model_spec"]["version"])
            try:
                reply = self.client.predict(arm.model, inputs=body, signature=signature,
                                            version=version)
                break
            except ServingError as err:
                if err.code != "NOT_FOUND" or not arm.label or attempt:
                    raise
        signatures = meta["metadata"]["signature_def"]["signature_def"]
        specs = signatures[signature or "serving_default"]["outputs"]
        return version, arrays_from_rest(reply["outputs"], specs)

    def check(self) -> None:
        """Asks the server for every arm's model metadata (by its label or version).

        Raises:
            ConfigError: naming the arm whose model, label or version the server does not
                serve.
        """
        from fm_keras.errors import ConfigError

        for arm in self.experiment.arms:
            try:
                self.client.metadata(arm.model, version=arm.version, label=arm.label)
            except ServingError as err:
                raise ConfigError(f"{self.experiment.source}: arm {arm.name!r}: the server "
                                  f"does not serve {arm.target}: {err.code}: {err}") from None


def _one_version_choice(version: int | None, label: str | None) -> None:
    """Raises ValueError when both `version` and `label` are given: TF Serving's ModelSpec
    holds one of them (``version_choice`` is a oneof), and a REST URL names one."""
    if version is not None and label:
        raise ValueError(f"give a version or a label, not both (version {version}, label "
                         f"{label!r})")
