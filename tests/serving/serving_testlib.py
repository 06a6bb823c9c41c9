"""Helpers shared by the serving tests: configs, servers, requests (official stubs only)."""

import socket
import time

from fm_keras.serving.config import ServerOptions

RANKING_ROW = {"user_id": ["u1"], "item_id": ["item_1"], "price": [1.0]}


def models_config(root, labels=None, models=("ranking", "ranking_recall")) -> str:
    """A ModelServerConfig text for ``root/<model>`` (ranking + recall), optional labels."""
    parts = ["model_config_list {"]
    for name in models:
        parts += ["  config {", f'    name: "{name}"', f'    base_path: "{root}/{name}"',
                  '    model_platform: "tensorflow"']
        if name == "ranking":
            parts.append("    model_version_policy { latest { num_versions: 1 } }")
            parts += [f'    version_labels {{ key: "{k}" value: {v} }}'
                      for k, v in (labels or {}).items()]
        parts.append("  }")
    parts.append("}")
    return "\n".join(parts) + "\n"


def start_server(**overrides):
    from fm_keras.serving.server import ModelServer

    options = dict(port=0, host="127.0.0.1", file_system_poll_wait_seconds=1,
                   max_num_load_retries=0)
    options.update(overrides)
    return ModelServer(ServerOptions(**options)).start(rest=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def predict_request(model="ranking", inputs=None, signature="", version=None, label=None):
    from tensorflow_serving.apis import predict_pb2

    from fm_keras._tf import tf

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    if signature:
        request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    if label:
        request.model_spec.version_label = label
    for name, value in (RANKING_ROW if inputs is None else inputs).items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    return request


def outputs(response):
    from fm_keras._tf import tf

    return {name: tf.make_ndarray(proto) for name, proto in response.outputs.items()}


def wait_for(predicate, timeout=30.0) -> bool:
    """Polls ``predicate`` every 0.1 s until it is true (True) or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False
