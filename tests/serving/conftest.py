"""Fixtures for the model server tests: small generic SavedModels and a running server.

The models come from ``fm_keras.serving.toy_models`` (plain tf.Module SavedModels with the
export contract's signatures and warmup records), so the server is tested independently of
fm_keras training. Servers bind free loopback ports and are always stopped.
"""

import os

import pytest
from serving_testlib import models_config, start_server


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory):
    """``root/ranking/1`` and ``root/ranking_recall/1``; returns root."""
    from fm_keras.serving import toy_models

    root = tmp_path_factory.mktemp("saved_models")
    toy_models.write_ranking_model(str(root / "ranking"), 1)
    toy_models.write_recall_model(str(root / "ranking_recall"), 1)
    return root


@pytest.fixture(scope="session")
def scann_models(saved_models, tmp_path_factory):
    """ranking (stock ops) + ranking_recall (ScaNN ops) under one root."""
    from fm_keras.serving import toy_models

    root = tmp_path_factory.mktemp("scann_models")
    (root / "ranking").mkdir()
    toy_models.copy_version(str(saved_models / "ranking" / "1"), str(root / "ranking"), 1)
    toy_models.write_scann_recall_model(str(root / "ranking_recall"), 1)
    return root


@pytest.fixture(scope="module")
def server(saved_models, tmp_path_factory):
    """A server for ranking + ranking_recall from one models.config, gRPC and REST."""
    config = tmp_path_factory.mktemp("config") / "models.config"
    config.write_text(models_config(saved_models, {"stable": 1}))
    monitoring = config.parent / "monitoring.config"
    monitoring.write_text('prometheus_config { enable: true, path: "/monitoring/prometheus/metrics" }\n')
    srv = start_server(model_config_file=str(config),
                       monitoring_config_file=str(monitoring))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def stubs(server):
    import grpc
    from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    yield (prediction_service_pb2_grpc.PredictionServiceStub(channel),
           model_service_pb2_grpc.ModelServiceStub(channel))
    channel.close()


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
