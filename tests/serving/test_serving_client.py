"""GrpcClient and RestClient against the running server; retry only on UNAVAILABLE."""

import contextlib
import http.server
import threading
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


@pytest.mark.parametrize("make", [
    lambda: GrpcClient("127.0.0.1:1", timeout=0.5, retries=0),
    lambda: RestClient("http://127.0.0.1:1", timeout=0.5, retries=0),
])
def test_a_version_and_a_label_together_are_refused_before_any_request(make):
    # TF Serving's ModelSpec holds one of them; the label was dropped silently (a new user's
    # trial, through `fm-keras query`). Port 1: a request would fail otherwise.
    with make() as client, pytest.raises(ValueError, match="give a version or a label, not "
                                                           "both"):
        client.metadata("ctr", 2, "stable")


def test_timeouts_must_be_positive():
    with pytest.raises(ValueError, match="timeout"):
        RestClient(timeout=0)


# ---------------------------------------------------------------------------------------------
# ExperimentClient: routes each unit to its arm's version label (gRPC and REST).

AB_CONFIG = """\
model_config_list {{ config {{
  name: "ranking" base_path: "{root}/ranking" model_platform: "tensorflow"
  model_version_policy {{ specific {{ versions: 1 versions: 2 }} }}
  version_labels {{ key: "control" value: 1 }} version_labels {{ key: "treatment" value: 2 }}
}} config {{
  name: "ranking_recall" base_path: "{root}/ranking_recall" model_platform: "tensorflow"
}} }}
"""


@pytest.fixture(scope="module")
def ab_server(tmp_path_factory):
    """ranking/1 (bias 0) and ranking/2 (bias 5), labelled control and treatment; and
    ranking_recall/1 (top-10 item ids, strings)."""
    from serving_testlib import start_server

    from fm_keras.serving import toy_models

    root = tmp_path_factory.mktemp("ab_models")
    toy_models.write_ranking_model(str(root / "ranking"), 1, bias=0.0)
    toy_models.write_ranking_model(str(root / "ranking"), 2, bias=5.0)
    toy_models.write_recall_model(str(root / "ranking_recall"), 1)
    config = root / "models.config"
    config.write_text(AB_CONFIG.format(root=root))
    srv = start_server(model_config_file=str(config))
    yield srv
    srv.stop()


def ab_experiment(tmp_path, treatment_label="treatment"):
    from fm_keras.experiments.config import load_ab_experiment

    path = tmp_path / "ab.yaml"
    path.write_text("name: t\nunit: user_id\nsalt: client\narms:\n"
                    "  - {name: control, model: ranking, label: control, weight: 0.5}\n"
                    f"  - {{name: treatment, model: ranking, label: {treatment_label}, "
                    "weight: 0.5}\n")
    return load_ab_experiment(path)


@pytest.mark.parametrize("transport", ["grpc", "rest"])
def test_experiment_client_routes_each_unit_to_its_arms_label(ab_server, tmp_path, transport):
    from fm_keras.experiments.assignment import Assigner
    from fm_keras.serving.client import ExperimentClient

    client = (GrpcClient(f"127.0.0.1:{ab_server.grpc_port}", timeout=10) if transport == "grpc"
              else RestClient(f"http://127.0.0.1:{ab_server.rest_port}", timeout=10))
    experiment = ab_experiment(tmp_path)
    router = ExperimentClient(experiment, client)
    router.check()
    units = [f"u{i}" for i in range(20)]
    expected = Assigner(experiment).assign(units)
    assert {"control", "treatment"} == set(expected)
    for unit, arm in zip(units, expected):
        reply = router.predict(unit, {**RANKING_ROW, "user_id": [unit]})
        assert reply.arm == arm == router.arm(unit).name and reply.label == arm
        logit = np.ravel(reply.outputs["logit"])[0]
        # version 2 has bias 5: its logits are 5 above version 1's for the same row
        one = client.predict("ranking", {**RANKING_ROW, "user_id": [unit]}, version=1) \
            if transport == "grpc" else client.predict(
                "ranking", inputs={**RANKING_ROW, "user_id": [unit]}, version=1)["outputs"]
        assert logit - np.ravel(one["logit"])[0] == pytest.approx(5.0 if arm == "treatment"
                                                                  else 0.0, abs=1e-4)
        assert reply.version == (2 if arm == "treatment" else 1)
    if transport == "grpc":
        client.close()


@pytest.mark.parametrize("target, inputs, signature", [
    # three float outputs, by label
    ("model: ranking, label: treatment", {**RANKING_ROW, "user_id": ["u1"]}, ""),
    # one output (REST does not wrap it in an object), 2-D, by version
    ("model: ranking, version: 1", {"item_id": ["i1", "i2"], "price": [1.0, 2.0]},
     "item_tower"),
    # strings: bytes over gRPC, JSON text over REST
    ("model: ranking_recall, version: 1", {"user_id": ["u1", "u2"]}, ""),
    # bytes in (a recall reply's item_ids, one not UTF-8) and float32 NumPy: over REST this
    # was a TypeError (bytes are not JSON serializable)
    ("model: ranking, version: 1", {"item_id": np.array([b"i1", b"\xff\xfe"], dtype=object),
                                    "price": np.array([1.0, 2.0], np.float32)}, "item_tower"),
])
def test_experiment_client_returns_the_same_structure_over_grpc_and_rest(
        ab_server, tmp_path, target, inputs, signature):
    # The same request gave {alias: array} and the answering version over gRPC but the raw
    # JSON reply ({"outputs": ...}: lists, str, float64) and version None for a label over REST.
    from fm_keras.experiments.config import load_ab_experiment
    from fm_keras.serving.client import ArmResponse, ExperimentClient

    path = tmp_path / "ab.yaml"
    path.write_text("name: t\nunit: user_id\nsalt: same\narms:\n"
                    f"  - {{name: a, {target}, weight: 0.5}}\n"
                    f"  - {{name: b, {target}, weight: 0.5}}\n")
    experiment = load_ab_experiment(path)
    with GrpcClient(f"127.0.0.1:{ab_server.grpc_port}", timeout=10) as grpc_client:
        by_grpc = ExperimentClient(experiment, grpc_client).predict("u7", inputs, signature)
    rest_client = RestClient(f"http://127.0.0.1:{ab_server.rest_port}", timeout=10)
    by_rest = ExperimentClient(experiment, rest_client).predict("u7", inputs, signature)
    assert type(by_grpc) is type(by_rest) is ArmResponse
    assert by_grpc[:4] == by_rest[:4]  # arm, model, label, version
    assert type(by_rest.version) is int and by_rest.version == (2 if "treatment" in target else 1)
    assert sorted(by_grpc.outputs) == sorted(by_rest.outputs)
    for alias, array in by_grpc.outputs.items():
        other = by_rest.outputs[alias]
        assert type(other) is np.ndarray
        assert (other.dtype, other.shape) == (array.dtype, array.shape), alias
        assert array.shape[0] == len(next(iter(inputs.values())))
        if array.dtype == object:
            assert {type(x) for x in array.ravel()} == {type(x) for x in other.ravel()} == {bytes}
            assert array.tolist() == other.tolist()
        else:
            np.testing.assert_array_equal(array, other)  # float32 survives JSON exactly


def test_experiment_client_check_names_an_arm_the_server_does_not_serve(ab_server, tmp_path):
    from fm_keras.errors import ConfigError
    from fm_keras.serving.client import ExperimentClient

    experiment = ab_experiment(tmp_path, treatment_label="canary")
    with GrpcClient(f"127.0.0.1:{ab_server.grpc_port}", timeout=10) as client:
        with pytest.raises(ConfigError, match="arm 'treatment': the server does not serve "
                                              "ranking@canary"):
            ExperimentClient(experiment, client).check()
    with pytest.raises(TypeError, match="GrpcClient or RestClient"):
        ExperimentClient(experiment, object())


class _StatusHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        body = b'{"model_version_status": [{"version": "1", "state": "AVAILABLE"}]}'
        self.send_response(200 if self.path == "/v1/models/ranking" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _status_server():
    """A stub REST server answering model status (`_StatusHandler`); yields its port."""
    httpd = http.server.HTTPServer(("127.0.0.1", 0), _StatusHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_port
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def test_rest_client_takes_host_port_like_the_grpc_client():
    # RestClient("localhost:8501") retried, then raised UNAVAILABLE "unknown url type".
    with _status_server() as port:
        client = RestClient(f"127.0.0.1:{port}", timeout=10, retries=0)
        assert client.base_url == f"http://127.0.0.1:{port}"
        assert client.status("ranking")["model_version_status"][0]["state"] == "AVAILABLE"


def test_rest_client_is_a_context_manager_like_the_grpc_client():
    # docs/experiments.md: `with GrpcClient(...) as c: ExperimentClient(..., c)  # or a
    # RestClient` raised TypeError: 'RestClient' object does not support the context manager
    # protocol.
    with _status_server() as port:
        made = RestClient(f"127.0.0.1:{port}", timeout=10, retries=0)
        with made as client:
            assert client is made
            assert client.status("ranking")["model_version_status"][0]["state"] == "AVAILABLE"
        with pytest.raises(ServingError), made:
            raise ServingError("NOT_FOUND", "raised in the block: not swallowed by __exit__")


@pytest.mark.parametrize("url, problem", [
    ("grpc://localhost:8500", "scheme 'grpc' is not http or https"),
    ("localhost:port", "not a URL of a host and port"),
    ("http://", "not a URL of a host and port"),
    ("localhost:99999", "not a URL of a host and port"),
])
def test_a_rest_url_that_cannot_work_is_a_value_error_at_construction(url, problem):
    with pytest.raises(ValueError, match=f"REST base URL '{url}': {problem}; give "
                       "http://HOST:PORT of the REST API, e.g. http://localhost:8501"):
        RestClient(url)
    assert RestClient("https://example.test/").base_url == "https://example.test"
