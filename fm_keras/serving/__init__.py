"""A TensorFlow Serving–compatible model server for fm_keras SavedModels.

TensorFlow Serving is what users deploy; its binary is not installable everywhere, so
``fm-keras serve`` speaks the same API (gRPC PredictionService + ModelService, REST
``/v1/models/...``), reads the same flags and config files, and follows the same version
semantics. Modules:

    config      flags (``ServerOptions``) and TF Serving's text-format config files
    errors      ``ServingError``: a TF status code + message, mapped to gRPC and HTTP
    predict     TensorProto <-> tensor conversion, signature validation, Predict
    loading     one SavedModel version: SignatureDefs, custom (ScaNN) ops, load errors
    manager     version polling, loading, warmup replay, labels, status
    inference   Classify / Regress / MultiInference on classify/regress signatures
    batching    server-side batching of concurrent requests
    grpc_server PredictionService and ModelService over gRPC
    rest        the HTTP/REST API
    metrics     Prometheus text exposition
    server      ``ModelServer``: everything above, started and stopped together
    client      gRPC and REST clients with timeouts and retry on UNAVAILABLE
    cli         ``fm-keras serve`` and ``fm-keras query``
    toy_models  small FM-shaped SavedModels with the export contract (tests, benchmarks)

grpc and TensorFlow are imported lazily by the modules that need them.
"""
