"""Flags and TF Serving's text-format config files (the same files real TF Serving reads)."""

import functools
import pathlib
import re

import pytest

from fm_keras.errors import ConfigError
from fm_keras.serving.config import (BatchingOptions, ServerOptions, load_batching_parameters,
                                     load_model_server_config, load_monitoring_config,
                                     parse_grpc_channel_arguments)

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_repo_configs_parse():
    config = load_model_server_config(str(REPO / "serving" / "models.config"))
    names = [m.name for m in config.model_config_list.config]
    assert names == ["ctr", "ctr_recall"]
    batching = load_batching_parameters(str(REPO / "serving" / "batching_parameters.txt"))
    assert batching.max_batch_size == 128 and batching.batch_timeout_micros > 0
    assert load_monitoring_config(str(REPO / "serving" / "monitoring.config")) == (
        True, "/monitoring/prometheus/metrics")


def test_model_config_policies_and_labels(tmp_path):
    path = tmp_path / "models.config"
    path.write_text("""
        model_config_list {
          config { name: "a" base_path: "/m/a" model_platform: "tensorflow"
                   model_version_policy { specific { versions: 3 versions: 4 } }
                   version_labels { key: "stable" value: 3 } version_labels { key: "canary" value: 4 } }
          config { name: "b" base_path: "/m/b" model_version_policy { all {} } }
        }""")
    config = load_model_server_config(str(path))
    a, b = config.model_config_list.config
    assert list(a.model_version_policy.specific.versions) == [3, 4]
    assert dict(a.version_labels) == {"stable": 3, "canary": 4}
    assert b.model_version_policy.WhichOneof("policy_choice") == "all"


@pytest.mark.parametrize("text, words", [
    ("model_config_list { config { name: 'a' base_path: '/x' } config { name: 'a' base_path: '/y' } }",
     "multiple times"),
    ("model_config_list { config { name: 'a' } }", "no base_path"),
    ("model_config_list { config { name: 'a' base_path: '/x' bogus: 1 } }", "Invalid protobuf file"),
    ("# all models commented out\n", "no model_config_list: the file is empty"),
    ("custom_model_config { type_url: 'x' }", r"only model_config_list is supported \(not custom"),
])
def test_bad_model_configs_name_the_problem(tmp_path, text, words):
    path = tmp_path / "models.config"
    path.write_text(text)
    with pytest.raises(ConfigError, match=words):
        load_model_server_config(str(path))


def test_batching_defaults_and_partial_file(tmp_path):
    assert load_batching_parameters(None).max_batch_size == 1000
    path = tmp_path / "batching.txt"
    path.write_text("max_batch_size { value: 32 }\nnum_batch_threads { value: 2 }\n")
    params = load_batching_parameters(str(path))
    assert (params.max_batch_size, params.num_batch_threads, params.max_enqueued_batches) == (32, 2, 10)
    with pytest.raises(ConfigError, match="max_batch_size"):
        BatchingOptions(max_batch_size=0)


def test_flags_are_checked():
    with pytest.raises(ConfigError, match="model_config_file or --model_base_path"):
        ServerOptions()
    with pytest.raises(ConfigError, match="cannot be same"):
        ServerOptions(model_base_path="/m", port=8500, rest_api_port=8500)
    assert parse_grpc_channel_arguments("grpc.max_receive_message_length=10,grpc.x=y") == [
        ("grpc.max_receive_message_length", 10), ("grpc.x", "y")]
    with pytest.raises(ConfigError, match="key=value"):
        parse_grpc_channel_arguments("nonsense")
    # A user's trial: --grpc_max_threads=-1 loaded every model, then died with a traceback from
    # ThreadPoolExecutor; negative load retries and retry intervals were taken silently.
    for name, auto in [("grpc_max_threads", " (0: auto)"), ("max_num_load_retries", ""),
                       ("load_retry_interval_micros", "")]:
        with pytest.raises(ConfigError, match=re.escape(f"--{name} must be >= 0{auto}, got -1")):
            ServerOptions(model_base_path="/m", **{name: -1})


def test_tf_thread_flags_follow_main_cc():
    from fm_keras._tf import tf
    from fm_keras.serving.config import apply_tf_threads, tf_thread_counts

    opts = functools.partial(ServerOptions, model_base_path="/m")
    assert tf_thread_counts(opts()) == (0, 0)
    assert tf_thread_counts(opts(tensorflow_session_parallelism=2)) == (2, 2)
    assert tf_thread_counts(opts(tensorflow_session_parallelism=2, tensorflow_intra_op_parallelism=1,
                                 tensorflow_inter_op_parallelism=3)) == (1, 3)
    with pytest.raises(ConfigError, match="tensorflow_inter_op_parallelism must be >= 0"):
        opts(tensorflow_inter_op_parallelism=-1)
    apply_tf_threads(opts())  # auto: nothing to set
    tf.constant(1.0) + 1.0  # this process's TensorFlow runtime is up: too late to resize pools
    with pytest.raises(ConfigError, match="tensorflow_intra_op_parallelism=7 cannot be applied.*own"):
        apply_tf_threads(opts(tensorflow_session_parallelism=7))


def test_kubernetes_configmap_matches_the_config_files():
    import yaml
    from google.protobuf import text_format

    from fm_keras.serving.config import BatchingParameters, MonitoringConfig
    from tensorflow_serving.config import model_server_config_pb2

    data = yaml.safe_load((REPO / "serving" / "k8s" / "configmap.yaml").read_text())["data"]
    for name, message in [("models.config", model_server_config_pb2.ModelServerConfig),
                          ("batching_parameters.txt", BatchingParameters),
                          ("monitoring.config", MonitoringConfig)]:
        from_file = text_format.Parse((REPO / "serving" / name).read_text(), message())
        assert text_format.Parse(data[name], message()) == from_file, name


def test_a_model_config_file_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "models.config"
    path.write_bytes(b"\xff\xfe model_config_list {}")  # was a UnicodeDecodeError traceback
    with pytest.raises(ConfigError, match="cannot read model config file .*: not UTF-8 text"):
        load_model_server_config(str(path))
