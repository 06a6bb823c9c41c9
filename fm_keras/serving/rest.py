"""The HTTP/REST API: TF Serving's paths, JSON formats and status-to-HTTP mapping.

    POST /v1/models/NAME[/versions/V | /labels/L]:predict   {"instances": [...]} | {"inputs": ...}
    POST /v1/models/NAME[...]:classify | :regress           {"context": {...}, "examples": [...]}
    GET  /v1/models/NAME[/versions/V | /labels/L]           model status
    GET  /v1/models/NAME[/versions/V | /labels/L]/metadata  signature defs
Errors are ``{"error": "..."}`` with the HTTP code of the TF status (errors.HTTP_STATUS).
JSON <-> tensor rules follow tensorflow_serving/util/json_tensor.cc: the row format returns
``predictions``, the columnar format ``outputs``; a single output is not wrapped in an object;
``{"b64": ...}`` carries bytes; string outputs whose alias ends in ``_bytes`` are base64.
The HTTP server around it (timeouts, limits, threads) is ``http_server.RestServer``.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import math
import re
import time
from collections.abc import Callable

import numpy as np

from fm_keras.serving import grpc_server as core
from fm_keras.serving.client import rest_json
from fm_keras.serving.errors import ServingError, invalid_argument, request_version
from fm_keras.serving.predict import check_input_names, check_shapes

log = logging.getLogger("fm_keras.serving")

_PATH = re.compile(r"/v1/models/([^/:]+)(?:/versions/([^/:]+)|/labels/([^/:]+))?"
                   r"(?::(predict|classify|regress)|(/metadata))?", re.IGNORECASE)


# A number literal that may overflow a double: an exponent of 3+ digits or 309+ digits in a row.
_MAYBE_HUGE_NUMBER = re.compile(rb"[eE][+]?0*[1-9][0-9]{2}|[0-9]{309}")


def _double(text: str) -> float:
    """A JSON number as a double; one beyond the double range is an error (RapidJSON's
    "Number too big to be stored in double"), not inf (``Infinity`` is inf, as in TF Serving)."""
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"Number too big to be stored in double: {text[:40]}")
    return value


def parse_json(body: bytes):
    """A request body -> its JSON value, with TF Serving's INVALID_ARGUMENT parse errors.

    Raises:
        ServingError: INVALID_ARGUMENT for text that is not JSON, nesting too deep for the
            parser, or a finite number literal beyond the double range (e.g. ``1e400``).
    """
    try:
        if _MAYBE_HUGE_NUMBER.search(body if isinstance(body, bytes) else body.encode()):
            return json.loads(body, parse_float=_double)
        return json.loads(body)
    except RecursionError:
        raise invalid_argument("JSON Parse error: The document is too deep (nesting)") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise invalid_argument(f"JSON Parse error: {err}") from None


def signature_name(request) -> str:
    """The body's ``signature_name`` ("" when absent or the body is not an object).

    Raises:
        ServingError: INVALID_ARGUMENT when it is not a JSON string (json_tensor.cc's
            FormatSignatureError): ``5`` or ``null`` is not the default signature.
    """
    if not isinstance(request, dict) or "signature_name" not in request:
        return ""
    name = request["signature_name"]
    if not isinstance(name, str):
        raise invalid_argument(f"JSON Value: {json.dumps(request)[:200]} not formatted correctly. "
                               "'signature_name' key must be a string value.")
    return name


def examples_from_json(request):
    """TF Serving's REST example format -> an ``Input`` (json_tensor.cc FillClassificationRequest...).

    ``{"context": {feature: value}, "examples": [{feature: value}, ...]}``; a value is a scalar
    or a list of one kind: strings (bytes_list), ints (int64_list), floats (float_list), or
    ``{"b64": ...}`` bytes.
    """
    from tensorflow_serving.apis import input_pb2

    if not isinstance(request, dict) or not isinstance(request.get("examples"), list):
        raise invalid_argument('Missing or invalid \'examples\' field: expected {"examples": [...]}')
    result = input_pb2.Input()
    context = request.get("context")
    target = result.example_list_with_context if context is not None else result.example_list
    if context is not None:
        _fill_example(target.context, context, "context")
    for i, features in enumerate(request["examples"]):
        _fill_example(target.examples.add(), features, f"examples[{i}]")
    return result


def _fill_example(example, features, where: str) -> None:
    if not isinstance(features, dict):
        raise invalid_argument(f"{where} must be a JSON object of feature: value, got "
                               f"{json.dumps(features)[:100]}")
    for name, value in features.items():
        values = value if isinstance(value, list) else [value]
        feature = example.features.feature[name]
        if all(isinstance(v, bool) for v in values) and values:
            raise invalid_argument(f"{where}.{name}: booleans are not a tf.Example type")
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            feature.int64_list.value.extend(values)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            feature.float_list.value.extend(values)
        else:
            feature.bytes_list.value.extend(_strings(values, f"{where}.{name}"))


def _strings(value, name):
    if isinstance(value, list):
        return [_strings(v, name) for v in value]
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, dict) and set(value) == {"b64"} and isinstance(value["b64"], str):
        try:
            return base64.b64decode(value["b64"], validate=True)
        except ValueError as err:
            raise invalid_argument(f"Unable to base64 decode input {name}: {err}") from None
    raise invalid_argument(f"JSON Value: {json.dumps(value)} Type: {type(value).__name__} is not "
                           f"of expected type: string (input {name})")


def ragged_lengths(value) -> list[int] | None:
    """The distinct lengths of the lists at the first level of `value` (nested JSON lists)
    where they differ, e.g. ``[1, 2]`` for ``[["a"], ["a", "b"]]``; None when every level is
    rectangular (a tensor). A level mixing lists and scalars gives ``[0, n]``."""
    level = [value]
    while level and any(isinstance(v, list) for v in level):
        if not all(isinstance(v, list) for v in level):
            return sorted({len(v) if isinstance(v, list) else 0 for v in level})
        lengths = sorted({len(v) for v in level})
        if len(lengths) > 1:
            return lengths
        level = [x for v in level for x in v]
    return None


def to_array(value, np_dtype, name: str) -> np.ndarray:
    """A JSON value (scalar or nested lists) -> an array of the signature's dtype.

    Raises:
        ServingError: INVALID_ARGUMENT (HTTP 400) for values not of the dtype, a finite
            number beyond the float dtype's range (1e39 for float32: it would become inf),
            or rows of different lengths: a tensor is rectangular, so string rows (e.g. a
            recall export's ``exclude_item_ids``) are padded with "", which matches no item.
    """
    try:
        if np_dtype == object:
            array = np.array(_strings(value, name), dtype=object)
            if array.ndim != _depth(value):  # NumPy made an array of lists: ragged rows
                raise ValueError("rows of different lengths")
            return array
        array = np.asarray(value)
        if array.dtype.kind not in "biuf" or not _json_kind_fits(value, array, np.dtype(np_dtype)):
            raise invalid_argument(f"JSON Value: {json.dumps(value)[:200]} is not of expected type: "
                                   f"{np.dtype(np_dtype).name} (input {name})")
        _check_range(array, np.dtype(np_dtype), name)
        return array.astype(np_dtype, copy=False)
    except ValueError as err:
        lengths = ragged_lengths(value)
        if lengths is not None:
            pad = ('pad the rows with "" to one length' if np_dtype == object
                   else "pad the rows with 0 (no item) to one length"
                   if name == "exclude_item_keys" else "send rows of one length")
            raise invalid_argument(f"input {name}: rows of different lengths "
                                   f"{lengths[:5]}; {pad}") from None
        raise invalid_argument(f"input {name}: {err}") from None


# JSON numbers each tensor kind takes, as json_tensor.cc's AddValueToTensor: a float takes any
# number, an integer only integers (1.5 and 1.0 are not), a bool only true/false.
_JSON_KINDS = {"f": "iuf", "c": "iuf", "i": "iu", "u": "iu", "b": "b"}


def _json_kind_fits(value, array: np.ndarray, dtype: np.dtype) -> bool:
    """Whether every JSON value in ``value`` (``array`` is ``np.asarray(value)``) is of a kind
    that ``dtype`` takes; NumPy alone would turn ``true`` into 1.0 and ``1.5`` into 1, and
    wrap an integer beyond an integer dtype's range (``2**64 - 1`` into int64 -1), where
    json_tensor.cc's ``IsInt64`` / ``IsInt`` refuse it."""
    if array.size == 0:
        return True
    if array.dtype.kind not in _JSON_KINDS.get(dtype.kind, "biuf"):
        return False
    if dtype.kind in "iu" and array.dtype.kind in "iu":
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            return False
    return dtype.kind == "b" or not _has_bool(value)


def _has_bool(value) -> bool:
    """Whether a JSON scalar or nested list holds ``true`` or ``false``."""
    if not isinstance(value, list):
        return type(value) is bool
    kinds = set(map(type, value))  # C speed: a large batch is walked once, not per element
    return bool in kinds or (list in kinds and any(_has_bool(v) for v in value
                                                   if type(v) is list))


def _check_range(array: np.ndarray, dtype: np.dtype, name: str) -> None:
    """INVALID_ARGUMENT for a finite number that `dtype` (a float) cannot hold: the cast would
    make it inf (NumPy warns "overflow encountered in cast"). inf and NaN stay as they are."""
    if dtype.kind != "f" or array.dtype.kind != "f" or array.dtype.itemsize <= dtype.itemsize:
        return
    limit = np.finfo(dtype).max
    big = np.isfinite(array) & (np.abs(array) > limit)
    if big.any():
        raise invalid_argument(f"input {name}: value {float(array[big].flat[0]):g} is out of "
                               f"{dtype.name} range (+-{str(limit)})")


def _depth(value) -> int:
    """Nesting depth of JSON lists along the first elements (the rank a tensor would have)."""
    depth = 0
    while isinstance(value, list):
        depth += 1
        if not value:
            break
        value = value[0]
    return depth


def arrays_from_json(sig, body) -> tuple[dict, str]:
    """A predict body -> ({alias: array}, "row" | "columnar")."""
    if not isinstance(body, dict):
        raise invalid_argument("Request body must be a JSON object")
    if ("instances" in body) == ("inputs" in body):
        raise invalid_argument("Missing 'inputs' or 'instances' key" if "instances" not in body else
                               "Not formatted correctly expecting only one of 'inputs' or "
                               "'instances' keys exists")
    aliases = sorted(sig.inputs)
    if "instances" in body:
        rows, fmt = body["instances"], "row"
        if not isinstance(rows, list) or not rows:
            raise invalid_argument("'instances' must be a non-empty JSON list")
        if all(isinstance(r, dict) for r in rows) and not (
                len(aliases) == 1 and any("b64" in r for r in rows)):
            check_input_names(sig, rows[0].keys())
            for i, row in enumerate(rows):
                if set(row) != set(aliases):
                    raise invalid_argument(f"Failed to process element: {i} of 'instances' list. "
                                           f"JSON object: {json.dumps(row)[:200]} keys differ "
                                           f"from the signature's inputs {aliases}")
            columns = {a: [row[a] for row in rows] for a in aliases}
        elif len(aliases) == 1:
            columns = {aliases[0]: rows}
        elif not isinstance(rows[0], dict):
            raise invalid_argument("instances is a plain list, but expecting list of objects as "
                                   "multiple input tensors required as per tensorinfo_map")
        else:
            item = next(i for i, row in enumerate(rows) if not isinstance(row, dict))
            raise invalid_argument(f"Expecting object but got list at item {item} of input list")
    else:
        inputs, fmt = body["inputs"], "columnar"
        if isinstance(inputs, dict) and not (len(aliases) == 1 and set(inputs) == {"b64"}):
            check_input_names(sig, inputs.keys())
            columns = inputs
        elif len(aliases) == 1:
            columns = {aliases[0]: inputs}
        else:
            raise invalid_argument("inputs is a plain value/list, but expecting an object as "
                                   "multiple input tensors required as per tensorinfo_map")
    arrays = {a: to_array(columns[a], sig.inputs[a][0], a) for a in aliases}
    check_shapes(sig, arrays)
    return arrays, fmt


def _jsonable(name: str, array: np.ndarray):
    if array.dtype == object:
        encode_b64 = name.endswith("_bytes")

        def conv(v):
            if isinstance(v, list):
                return [conv(x) for x in v]
            if encode_b64:
                return {"b64": base64.b64encode(v).decode("ascii")}
            try:
                return v.decode("utf-8")
            except UnicodeDecodeError:
                return {"b64": base64.b64encode(v).decode("ascii")}
        return conv(array.tolist())
    return array.tolist()


def json_from_outputs(outputs: dict, fmt: str) -> dict:
    names = sorted(outputs)
    if fmt == "columnar":
        if len(names) == 1:
            return {"outputs": _jsonable(names[0], outputs[names[0]])}
        return {"outputs": {n: _jsonable(n, outputs[n]) for n in names}}
    values = {n: _jsonable(n, outputs[n]) for n in names}
    if len(names) == 1:
        return {"predictions": values[names[0]]}
    sizes = {n: len(v) if isinstance(v, list) else None for n, v in values.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise invalid_argument(f"Tensors have inconsistent batch sizes for the row format "
                               f"{sizes}; use the columnar format ('inputs')")
    batch = next(iter(sizes.values()))
    return {"predictions": [{n: values[n][i] for n in names} for i in range(batch)]}


@dataclasses.dataclass(slots=True)
class Call:
    """A request parsed by ``RestApi.parse`` whose model call is still to run.

    A predict carries its servable, signature, input arrays and reply format; a classify or
    regress carries ``work``, the whole call (it is never batched).
    """

    method: str
    path: str
    model: str
    start: float  # time.perf_counter() when the request arrived
    work: Callable | None = None
    servable: object = None
    sig: object = None
    arrays: dict | None = None
    fmt: str | None = None
    api: str = ""  # TF Serving's API label in the metrics: predict, classify or regress

    def run(self, timeout: float | None):
        """The model call on this thread (blocking in the batch queue when batching is on)."""
        if self.work is not None:
            return self.work()
        return self.servable.run(self.sig, self.arrays, timeout)

    def submit(self, deadline: float | None):
        """The model call as an asyncio future when it is batched (``Servable.submit_async``,
        ``deadline`` in the running loop's time), else None: call ``run`` instead.

        Raises:
            ServingError: a request the batch queue refuses at once (too large, queue full).
        """
        if self.work is not None:
            return None
        return self.servable.submit_async(self.sig, self.arrays, deadline)


class RestApi:
    """Request handling, independent of the HTTP server plumbing (easy to test).

    ``handle`` answers a request on the calling thread. It is three steps, which the HTTP
    server also takes apart to await a batched call on its event loop instead of blocking a
    thread: ``parse`` (path, JSON, validation: a ``Call``, or the whole reply when no model
    runs or the request is bad), the model call (``Call.run`` or ``Call.submit``), and
    ``answer`` (outputs or error -> reply). Replies are (HTTP status, content type, body).
    """

    def __init__(self, manager, metrics=None, timeout_ms: int = 30000, prometheus_path: str = ""):
        self.manager, self.metrics = manager, metrics
        self.timeout = timeout_ms / 1000 if timeout_ms > 0 else None
        self.prometheus_path = prometheus_path

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, str, str]:
        """Returns (HTTP status, content type, body)."""
        call = self.parse(method, path, body)
        return self.complete(call) if isinstance(call, Call) else call

    def complete(self, call: Call) -> tuple[int, str, str]:
        """Runs a parsed call on this thread and answers it."""
        try:
            outputs = call.run(self.timeout)
        except Exception as err:  # noqa: BLE001 - answered as TF Serving does (500 if unknown)
            return self.answer(call, error=err)
        return self.answer(call, outputs)

    def parse(self, method: str, path: str, body: bytes) -> Call | tuple[int, str, str]:
        """A predict, classify or regress -> its ``Call``; anything else -> its reply."""
        if self.prometheus_path and path == self.prometheus_path and method == "GET":
            return 200, "text/plain; version=0.0.4", self.metrics.render()
        start, model, api = time.perf_counter(), "", ""
        try:
            match = _PATH.fullmatch(path)
            if match is None or (method == "POST") != bool(match.group(4)) or method not in (
                    "GET", "POST"):
                raise invalid_argument(f"Malformed request: {method} {path}")
            model, version, label, verb, metadata = match.groups()
            api = verb.lower() if verb else ""  # metadata and status are no requests here
            version = request_version(version) if version else None
            if verb == "predict":
                request = parse_json(body)
                servable = self.manager.lookup(model, version, label)
                sig = servable.signature(signature_name(request))
                arrays, fmt = arrays_from_json(sig, request)
                return Call(method, path, model, start, servable=servable, sig=sig,
                            arrays=arrays, fmt=fmt, api=api)
            if verb:
                return Call(method, path, model, start, api=api,
                            work=lambda: self._examples(verb, model, version, label, body))
            result = (self._metadata(model, version, label) if metadata
                      else self._status(model, version, label))
            return self._reply(method, path, model, start, result)
        except Exception as err:  # noqa: BLE001 - the server stays up
            return self._reply(method, path, model, start, error=err, api=api)

    def answer(self, call: Call, outputs=None, error: Exception | None = None):
        """The reply to a call that returned ``outputs`` or raised ``error``."""
        result = None
        if error is None:
            try:
                result = json_from_outputs(outputs, call.fmt) if call.fmt else outputs
            except Exception as err:  # noqa: BLE001 - e.g. outputs the row format cannot hold
                error = err
        return self._reply(call.method, call.path, call.model, call.start, result, error,
                           call.api)

    def _reply(self, method, path, model, start, result=None, error=None, api=""):
        code = "OK"
        if error is None:
            reply = 200, "application/json", json.dumps(result)
        elif isinstance(error, ServingError):
            code = error.code
            reply = error.http_status, "application/json", json.dumps({"error": error.message})
        else:
            code = "INTERNAL"
            log.error("REST %s %s failed", method, path, exc_info=error)
            reply = 500, "application/json", json.dumps(
                {"error": f"{type(error).__name__}: {error}"})
        if self.metrics is not None and model and api:  # as gRPC: predict, classify, regress
            self.metrics.record_request(model, api, "REST", code,
                                        (time.perf_counter() - start) * 1e6)
        return reply

    def _examples(self, verb, model, version, label, body):
        """``:classify`` / ``:regress``: {"signature_name", "context", "examples"} as in TF Serving."""
        from fm_keras.serving import inference
        from tensorflow_serving.apis import classification_pb2, regression_pb2

        request = parse_json(body)
        request_input = examples_from_json(request)
        servable = self.manager.lookup(model, version, label)
        name = signature_name(request)
        if verb == "classify":
            result = classification_pb2.ClassificationResult()
            inference.classify(servable, name, request_input, result)
            return {"result": [[[c.label, c.score] for c in row.classes]
                               for row in result.classifications]}
        result = regression_pb2.RegressionResult()
        inference.regress(servable, name, request_input, result)
        return {"result": [r.value for r in result.regressions]}

    def _metadata(self, model, version, label):
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = model
        if version is not None:
            request.model_spec.version.value = version
        if label:
            request.model_spec.version_label = label
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        core.model_metadata(self.manager, request, response)
        return rest_json(response)

    def _status(self, model, version, label):
        from tensorflow_serving.apis import get_model_status_pb2

        if label:
            version = self.manager.lookup(model, None, label).version
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = model
        if version is not None:
            request.model_spec.version.value = version
        response = get_model_status_pb2.GetModelStatusResponse()
        core.model_status(self.manager, request, response)
        return rest_json(response)
