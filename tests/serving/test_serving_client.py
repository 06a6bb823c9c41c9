"""GrpcClient and RestClient against the running server; retry only on UNAVAILABLE."""

import time

import numpy as np
import pytest
from serving_testlib import RANKING_ROW, free_port

from fm_keras.serving.client import GrpcClient, RestClient
from fm_keras.serving.errors import ServingError


def test_grpc_client_predict_status_metadata(server):
    with GrpcClient(f"127.0.0.1:{server.grpc_port}", timeout=10) as client:
        out = client.predict("ranking", RANKING_ROW)
        assert 0 < out["probability"][0] < 1
        recall = client.predict("ranking_recall", {"user_id": ["u1"]})
        assert recall["item_ids"].shape == (1, 10)
        assert client.status("ranking")[0]["state"] == "AVAILABLE"
        assert "user_tower" in client.metadata("ranking").signature_def
        with pytest.raises(ServingError) as info:
            client.predict("nope", RANKING_ROW)
        assert info.value.code == "NOT_FOUND"


def test_rest_client_row_and_columnar(server):
    client = RestClient(f"http://127.0.0.1:{server.rest_port}", timeout=10)
    rows = client.predict("ranking", instances=[{k: v[0] for k, v in RANKING_ROW.items()}])
    cols = client.predict("ranking", inputs=RANKING_ROW)
    np.testing.assert_allclose(rows["predictions"][0]["logit"], cols["outputs"]["logit"][0])
    assert client.status("ranking")["model_version_status"][0]["state"] == "AVAILABLE"
    with pytest.raises(ServingError) as info:
        client.predict("ranking", inputs=RANKING_ROW, signature="nope")
    assert info.value.code == "INVALID_ARGUMENT"  # HTTP 400 (FAILED_PRECONDITION maps to 400 too)


@pytest.mark.parametrize("make", [
    lambda port: GrpcClient(f"127.0.0.1:{port}", timeout=0.5, retries=2, backoff=0.05),
    lambda port: RestClient(f"http://127.0.0.1:{port}", timeout=0.5, retries=2, backoff=0.05),
])
def test_unavailable_is_retried_with_backoff_then_raised(make):
    client = make(free_port())  # nothing listens there
    start = time.monotonic()
    with pytest.raises(ServingError) as info:
        client.status("ranking")
    assert info.value.code == "UNAVAILABLE"
    assert time.monotonic() - start >= 0.05 + 0.1  # two backoffs


def test_timeouts_must_be_positive():
    with pytest.raises(ValueError, match="timeout"):
        RestClient(timeout=0)
