"""gRPC PredictionService and ModelService, registered from tensorflow-serving-api's stubs.

Each handler turns a ``ServingError`` into the same gRPC status TF Serving returns; a deadline
that has already passed is DEADLINE_EXCEEDED before any work; the server's message size limit
is INT32_MAX unless ``--grpc_channel_arguments`` lowers it (then gRPC itself answers
RESOURCE_EXHAUSTED for bigger messages).
"""

from __future__ import annotations

import logging
import time
from concurrent import futures

import grpc
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2,
                                     get_model_status_pb2, inference_pb2, model_management_pb2,
                                     model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc, regression_pb2)

from fm_keras.serving import inference
from fm_keras.serving.config import DEFAULT_MAX_MESSAGE_SIZE, validate_model_server_config
from fm_keras.serving.errors import (ERROR_CODE_NUMBER, ServingError, invalid_argument,
                                     request_version)
from fm_keras.serving.predict import (arrays_from_request, check_output_filter, fill_outputs,
                                      signature_def_map)

log = logging.getLogger("fm_keras.serving")
_NO_DEADLINE = 86_400.0  # seconds


def model_spec_of(request):
    """The request's ModelSpec; INVALID_ARGUMENT "Missing ModelSpec" when it has none (TF
    Serving's predict_impl.cc and the other services: not a NOT_FOUND for a model named "")."""
    if not request.HasField("model_spec"):
        raise invalid_argument("Missing ModelSpec")
    return request.model_spec


def resolve(manager, model_spec):
    """ModelSpec -> servable (version, label or latest)."""
    choice = model_spec.WhichOneof("version_choice")
    version = request_version(model_spec.version.value) if choice == "version" else None
    return manager.lookup(model_spec.name, version,
                          model_spec.version_label if choice == "version_label" else None)


def remaining(context) -> float | None:
    """Seconds left before the client's deadline (None: no deadline); DEADLINE_EXCEEDED if none are left.

    A call without a deadline reports an "infinite" time_remaining (~1e10 s) that
    ``threading`` waits cannot take (OverflowError), so anything past a day counts as none.
    """
    left = context.time_remaining()
    if left is not None and left <= 0:
        raise ServingError("DEADLINE_EXCEEDED", "Deadline Exceeded")
    return left if left is not None and left < _NO_DEADLINE else None


def predict(manager, request, response, timeout: float | None = None) -> None:
    """The Predict core shared by gRPC and REST (the REST side builds a PredictRequest)."""
    servable = resolve(manager, model_spec_of(request))
    sig = servable.signature(request.model_spec.signature_name)
    arrays = arrays_from_request(sig, request.inputs)
    names = check_output_filter(sig, request.output_filter)
    outputs = servable.run(sig, arrays, timeout)
    response.model_spec.name = servable.name
    response.model_spec.version.value = servable.version
    response.model_spec.signature_name = sig.name
    fill_outputs(response.outputs, outputs, names)


def model_metadata(manager, request, response) -> None:
    model_spec_of(request)
    if not request.metadata_field:
        raise invalid_argument("GetModelMetadataRequest must specify at least one metadata_field")
    for field in request.metadata_field:
        if field != "signature_def":
            raise invalid_argument(f"Metadata field {field} is not supported")
    servable = resolve(manager, request.model_spec)
    response.model_spec.name = servable.name
    response.model_spec.version.value = servable.version
    response.metadata["signature_def"].Pack(signature_def_map(servable.signature_defs))


def model_status(manager, request, response) -> None:
    spec = model_spec_of(request)
    version = request_version(spec.version.value) if spec.HasField("version") else None
    State = get_model_status_pb2.ModelVersionStatus.State
    for number, state, code, message in manager.model_status(spec.name, version):
        entry = response.model_version_status.add(version=number, state=State.Value(state))
        entry.status.error_code = ERROR_CODE_NUMBER[code]
        entry.status.error_message = message


_RECORDED_APIS = ("Predict", "Classify", "Regress")


class _Handlers:
    """Shared by both servicers: error mapping and request metrics."""

    def __init__(self, manager, metrics):
        self.manager = manager
        self.metrics = metrics

    def call(self, context, api, model_name, fn):
        """Runs ``fn`` for the RPC ``api``, answering its errors with their gRPC codes; counts
        Predict, Classify and Regress calls in the metrics under those API names, the only
        ones TF Serving's PredictionServiceImpl records."""
        start = time.perf_counter()
        code = "OK"
        try:
            return fn()
        except ServingError as err:
            code = err.code
            context.abort(grpc.StatusCode[err.code], err.message)
        except Exception as err:  # noqa: BLE001 - answer INTERNAL, never drop the server
            code = "INTERNAL"
            log.exception("%s failed", api)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}")
        finally:
            if self.metrics is not None and api in _RECORDED_APIS:
                self.metrics.record_request(model_name, api, "GRPC", code,
                                            (time.perf_counter() - start) * 1e6)


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer, _Handlers):
    def Predict(self, request, context):
        def run():
            response = predict_pb2.PredictResponse()
            predict(self.manager, request, response, remaining(context))
            return response
        return self.call(context, "Predict", request.model_spec.name, run)

    def GetModelMetadata(self, request, context):
        def run():
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            model_metadata(self.manager, request, response)
            return response
        return self.call(context, "GetModelMetadata", request.model_spec.name, run)

    def Classify(self, request, context):
        return self._single_inference(context, "Classify", request,
                                      classification_pb2.ClassificationResponse, inference.classify)

    def Regress(self, request, context):
        return self._single_inference(context, "Regress", request,
                                      regression_pb2.RegressionResponse, inference.regress)

    def _single_inference(self, context, kind, request, response_type, infer):
        """Classify and Regress: one signature over tf.Examples, the result into response."""
        def run():
            remaining(context)
            response = response_type()
            servable = resolve(self.manager, model_spec_of(request))
            infer(servable, request.model_spec.signature_name, request.input, response.result)
            response.model_spec.name, response.model_spec.version.value = servable.name, servable.version
            return response
        return self.call(context, kind, request.model_spec.name, run)

    def MultiInference(self, request, context):
        def run():
            remaining(context)
            response = inference_pb2.MultiInferenceResponse()
            inference.multi_inference(self.manager, request, response)
            return response
        name = request.tasks[0].model_spec.name if request.tasks else ""
        return self.call(context, "MultiInference", name, run)


class ModelService(model_service_pb2_grpc.ModelServiceServicer, _Handlers):
    def GetModelStatus(self, request, context):
        def run():
            response = get_model_status_pb2.GetModelStatusResponse()
            model_status(self.manager, request, response)
            return response
        return self.call(context, "GetModelStatus", request.model_spec.name, run)

    def HandleReloadConfigRequest(self, request, context):
        def run():
            from fm_keras.errors import ConfigError

            if request.config.WhichOneof("config") is None:
                # As server_core.cc: nothing to load; a later request may bring a config.
                log.info("Taking no action for empty config.")
                return model_management_pb2.ReloadConfigResponse()
            try:
                validate_model_server_config(request.config, "ReloadConfigRequest")
            except ConfigError as err:
                raise invalid_argument(str(err)) from err
            self.manager.reload_config(request.config)
            return model_management_pb2.ReloadConfigResponse()
        return self.call(context, "HandleReloadConfigRequest", "", run)


def start_grpc_server(manager, metrics, host: str, port: int, max_threads: int,
                      channel_arguments: list[tuple]):
    """Starts the gRPC server; returns (server, bound port)."""
    options = [("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_SIZE),
               ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_SIZE),
               ("grpc.so_reuseport", 0)]
    overridden = {key for key, _ in channel_arguments}
    options = [o for o in options if o[0] not in overridden] + list(channel_arguments)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_threads,
                                                    thread_name_prefix="grpc"),
                         options=options)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionService(manager, metrics), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(manager, metrics), server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:  # newer grpcio raises instead of returning 0
        bound = 0
    if bound == 0:
        raise OSError(f"cannot bind gRPC port {host}:{port}")
    server.start()
    return server, bound
