"""`fm-keras serve` with TF Serving's flags in a real process, and `fm-keras query`."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from serving_testlib import free_port, models_config

from fm_keras.cli import build_parser, main
from fm_keras.errors import ConfigError
from fm_keras.serving.cli import input_columns, typed_inputs
from fm_keras.serving.client import GrpcClient
from fm_keras.serving.errors import ServingError


def test_serve_accepts_tf_serving_flag_forms():
    args = build_parser().parse_args([
        "serve", "--port=9000", "--rest_api_port", "9001", "--model_name=m",
        "--model_base_path=/m", "--enable_batching", "--enable_model_warmup=false",
        "--batching_parameters_file=b.txt", "--file_system_poll_wait_seconds=5"])
    assert (args.port, args.rest_api_port, args.model_name) == (9000, 9001, "m")
    assert args.enable_batching is True and args.enable_model_warmup is False
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--enable_batching=maybe"])


def test_serve_process_query_and_sigterm(scann_models, tmp_path, capsys):
    """A fresh process: the ScaNN recall model loads only because the loader imports scann."""
    grpc_port, rest_port = free_port(), free_port()
    config = tmp_path / "models.config"
    config.write_text(models_config(scann_models))
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen(
        [sys.executable, "-m", "fm_keras.cli", "serve", f"--port={grpc_port}",
         f"--rest_api_port={rest_port}", f"--model_config_file={config}", "--host=127.0.0.1",
         "--tensorflow_intra_op_parallelism=1", "--tensorflow_inter_op_parallelism=1"],
        cwd=repo, env={**os.environ, "PYTHONPATH": repo}, stderr=subprocess.PIPE, text=True)
    try:
        with GrpcClient(f"127.0.0.1:{grpc_port}", timeout=2, retries=0) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    client.status("ranking")
                    break
                except ServingError:
                    assert proc.poll() is None and time.monotonic() < deadline
                    time.sleep(0.3)
        assert main(["query", f"--server=127.0.0.1:{grpc_port}", "--model_name=ranking",
                     "--input=user_id=u1,u2", "--input=item_id=item_1,item_2",
                     "--input=price=1,2"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert len(out["probability"]) == 2
        assert main(["query", f"--rest=http://127.0.0.1:{rest_port}", "--model_name=ranking",
                     "--signature_name=user_tower", "--input=user_id=u1"]) == 0
        assert len(json.loads(capsys.readouterr().out)["outputs"]["user_vector"][0]) == 5
        assert main(["query", f"--server=127.0.0.1:{grpc_port}", "--model_name=ranking_recall",
                     "--input=user_id=u1"]) == 0
        assert len(json.loads(capsys.readouterr().out)["item_ids"][0]) == 10
        assert main(["query", f"--server=127.0.0.1:{grpc_port}", "--model_name=nope",
                     "--status"]) == 2
        assert "NOT_FOUND" in capsys.readouterr().err
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=30) == 0
        finally:
            proc.kill()
            proc.stderr.close()


def test_query_types_inputs_by_the_signature():
    inputs = {"user_id": {"dtype": "DT_STRING", "tensor_shape": {"dim": [{"size": "-1"}]}},
              "price": {"dtype": "DT_FLOAT", "tensor_shape": {"dim": [{"size": "-1"}]}},
              "exclude_item_ids": {"dtype": "DT_STRING",
                                   "tensor_shape": {"dim": [{"size": "-1"}, {"size": "-1"}]}}}
    typed = typed_inputs({"user_id": ["007", "1e3"], "price": ["1", "2.5"],
                          "exclude_item_ids": ["a|b|c", ""], "extra": ["3"]}, inputs)
    assert typed == {"user_id": ["007", "1e3"], "price": [1.0, 2.5],
                     "exclude_item_ids": [["a", "b", "c"], ["", "", ""]], "extra": ["3"]}
    assert typed_inputs({"exclude_item_ids": ["", ""]}, inputs) == {"exclude_item_ids": [[""], [""]]}
    # exclude_item_keys takes ids too, and sends their item keys ("i0" = 0x3069), 0 pads.
    keys = {"exclude_item_keys": {"dtype": "DT_INT64",
                                  "tensor_shape": {"dim": [{"size": "-1"}, {"size": "-1"}]}}}
    assert typed_inputs({"exclude_item_keys": ["i0 | i1", ""]}, keys) == \
        {"exclude_item_keys": [[0x3069, 0x3169], [0, 0]]}
    # Regression (trial): the blanks recommend drops (ASCII space and control characters), not
    # str.strip's Unicode ones: "i1\u3000" is no catalog id in recommend, so not "i1" here.
    assert typed_inputs({"exclude_item_keys": ["\x1bi0\t|i1\u3000|\xa0i2"]}, keys) == \
        {"exclude_item_keys": [[0x3069, 0x8080E33169, 0x3269A0C2]]}  # i1 E3 80 80, C2 A0 i2
    assert typed_inputs({"exclude_item_ids": ["\x1bi0\t| i1\u3000"]}, inputs) == \
        {"exclude_item_ids": [["i0", "i1\u3000"]]}
    # Regression (trial): no rows at all was a TypeError traceback (max(1) of nothing).
    for spec in (keys, inputs):
        name = next(n for n in spec if n.startswith("exclude"))
        with pytest.raises(ConfigError, match=f"--input {name}: no rows \\(\\[\\]\\); give a "
                                              "list per row, \\[\\] for one that excludes"):
            typed_inputs(input_columns([f"{name}=[]"]), spec)
    with pytest.raises(ConfigError, match="--input price: \\['1', 'x'\\] are not all numbers"):
        typed_inputs({"price": ["1", "x"]}, inputs)


def test_query_rest_with_a_url_that_cannot_work_is_one_line_exit_2(capsys):
    # it was a ValueError traceback (before: retries, then UNAVAILABLE "unknown url type")
    assert main(["query", "--rest", "grpc://localhost:8500", "--model_name", "ranking",
                 "--status"]) == 2
    assert capsys.readouterr().err == (
        "fm-keras: error: --rest: REST base URL 'grpc://localhost:8500': scheme 'grpc' is not "
        "http or https; give http://HOST:PORT of the REST API, e.g. http://localhost:8501\n")


def test_query_with_both_a_version_and_a_label_is_one_line_exit_2(capsys):
    # A new user's trial: both were accepted and the label ignored (ModelSpec's version_choice
    # is a oneof in TF Serving).
    assert main(["query", "--model_name", "ctr", "--version", "2", "--label", "stable",
                 "--status"]) == 2
    assert capsys.readouterr().err == (
        "fm-keras: error: --version and --label name the same thing (TF Serving's ModelSpec "
        "holds one of them); give one\n")


def test_query_input_takes_a_json_list_for_values_with_commas():
    """A new user's trial: ids holding commas could not be given to --input."""
    inputs = {"item_id": {"dtype": "DT_STRING", "tensor_shape": {"dim": [{"size": "-1"}]}},
              "price": {"dtype": "DT_FLOAT", "tensor_shape": {"dim": [{"size": "-1"}]}},
              "exclude_item_ids": {"dtype": "DT_STRING",
                                   "tensor_shape": {"dim": [{"size": "-1"}, {"size": "-1"}]}}}
    columns = input_columns(['item_id=["Toy Story (1995), The", "b"]', "price=[1, 2.5]",
                             'exclude_item_ids=[["x,y", "z"], []]', "user_id=u1,u2"])
    assert columns == {"item_id": ["Toy Story (1995), The", "b"], "price": ["1", "2.5"],
                       "exclude_item_ids": [["x,y", "z"], []], "user_id": ["u1", "u2"]}
    assert typed_inputs(columns, inputs) == {
        "item_id": ["Toy Story (1995), The", "b"], "price": [1.0, 2.5],
        "exclude_item_ids": [["x,y", "z"], ["", ""]], "user_id": ["u1", "u2"]}
    # '|' lists drop the spaces around ids, as recommend's --exclude-column does
    assert typed_inputs({"exclude_item_ids": ["a | b", "c"]}, inputs) == \
        {"exclude_item_ids": [["a", "b"], ["c", ""]]}
    for bad in ('item_id=["a", ', "item_id=[true]", 'item_id=[{"a": 1}]', "item_id=[[[1]]]"):
        with pytest.raises(ConfigError, match="--input item_id: a value starting with '\\[' is "
                                              "a JSON list of strings or numbers"):
            input_columns([bad])


@pytest.mark.parametrize("transport", ["grpc", "rest"])
def test_query_status_takes_the_label(server, capsys, transport):
    """`query --status --label L` printed every version's status: the label was dropped."""
    target = (f"--server=127.0.0.1:{server.grpc_port}" if transport == "grpc"
              else f"--rest=http://127.0.0.1:{server.rest_port}")
    assert main(["query", target, "--model_name=ranking", "--status", "--label=stable"]) == 0
    assert "1" in capsys.readouterr().out
    assert main(["query", target, "--model_name=ranking", "--status", "--label=nope"]) == 2
    assert "Unrecognized servable version label: nope" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--status", "--metadata"])
def test_query_status_and_metadata_print_the_same_json_over_grpc_and_rest(server, capsys,
                                                                          flag):
    """Trial: over gRPC `query --status` printed [{"version": 1, "state": ...}] and
    `--metadata` the bare signature map, over REST TF Serving's JSON; both now print the REST
    form."""
    printed = []
    for target in (f"--server=127.0.0.1:{server.grpc_port}",
                   f"--rest=http://127.0.0.1:{server.rest_port}"):
        assert main(["query", target, "--model_name=ranking", flag]) == 0
        printed.append(json.loads(capsys.readouterr().out))
    assert printed[0] == printed[1]
    if flag == "--status":
        assert printed[0]["model_version_status"][0]["state"] == "AVAILABLE"
        assert printed[0]["model_version_status"][0]["status"]["error_code"] == "OK"
    else:
        assert printed[0]["model_spec"]["name"] == "ranking"
        assert "serving_default" in printed[0]["metadata"]["signature_def"]["signature_def"]


def test_query_over_rest_sends_numeric_looking_ids_as_text_like_grpc(server, capsys):
    """MovieLens ids are digits: REST sent user_id=7 as the number 7.0 (INVALID_ARGUMENT)."""
    flags = ["--model_name=ranking", "--input=user_id=7,007", "--input=item_id=1,2",
             "--input=price=1,2"]
    assert main(["query", f"--server=127.0.0.1:{server.grpc_port}", *flags]) == 0
    grpc_out = json.loads(capsys.readouterr().out)
    assert main(["query", f"--rest=http://127.0.0.1:{server.rest_port}", *flags]) == 0
    rest_out = json.loads(capsys.readouterr().out)["outputs"]
    assert rest_out["probability"] == pytest.approx(grpc_out["probability"], abs=1e-6)
    # the same rows with JSON lists (ids with commas can be given so), over both protocols
    listed = ["--model_name=ranking", '--input=user_id=["7", "007"]', "--input=item_id=[1, 2]",
              "--input=price=[1, 2]"]
    assert main(["query", f"--server=127.0.0.1:{server.grpc_port}", *listed]) == 0
    assert json.loads(capsys.readouterr().out)["probability"] == \
        pytest.approx(grpc_out["probability"], abs=1e-6)
    assert main(["query", f"--rest=http://127.0.0.1:{server.rest_port}", *listed]) == 0
    assert json.loads(capsys.readouterr().out)["outputs"]["probability"] == \
        pytest.approx(grpc_out["probability"], abs=1e-6)


def test_query_grpc_sends_exclude_item_keys_as_int64(monkeypatch, capsys):
    """A new user's trial of serving/README's exclude_seen_keys query: the item keys went out
    as Python ints, which `tf.make_tensor_proto` makes int32, and the server answered
    "Expects arg[1] (exclude_item_keys) to be int64 but int32 is provided"."""
    from google.protobuf import json_format
    from tensorflow_serving.apis import get_model_metadata_pb2

    from fm_keras._tf import tf
    from fm_keras.serving import client as client_module

    signatures = json_format.ParseDict({"signature_def": {"exclude_seen_keys": {"inputs": {
        "user_id": {"dtype": "DT_STRING", "tensor_shape": {"dim": [{"size": "-1"}]}},
        "exclude_item_keys": {"dtype": "DT_INT64",
                              "tensor_shape": {"dim": [{"size": "-1"}, {"size": "-1"}]}}}}}},
        get_model_metadata_pb2.SignatureDefMap())
    sent = {}

    class Recording:
        def __init__(self, server, timeout=None):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def metadata(self, model, version=None, label=None):
            return signatures

        def predict(self, model, inputs, **kwargs):
            sent.update({k: tf.make_tensor_proto(v).dtype for k, v in inputs.items()})
            return {}

    monkeypatch.setattr(client_module, "GrpcClient", Recording)
    assert main(["query", "--server=localhost:1", "--model_name=ctr_recall",
                 "--signature_name=exclude_seen_keys", "--input=user_id=u1,u2",
                 "--input=exclude_item_keys=i9|i3,"]) == 0
    assert sent == {"user_id": tf.string.as_datatype_enum,
                    "exclude_item_keys": tf.int64.as_datatype_enum}
    assert json.loads(capsys.readouterr().out) == {}
