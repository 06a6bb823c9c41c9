"""Version semantics: hot swap under load, corrupt versions, policies, labels, warmup."""

import gc
import os
import threading
import time

import grpc
import numpy as np
import pytest
from serving_testlib import predict_request, start_server, wait_for
from tensorflow_serving.apis import (get_model_status_pb2, prediction_service_pb2_grpc,
                                     model_service_pb2_grpc)

from fm_keras.serving import toy_models
from fm_keras.serving.config import ServerOptions, single_model_config
from fm_keras.serving.errors import ServingError
from fm_keras.serving.manager import ModelManager, replay_warmup
from fm_keras.versions import version_dirs


def _corrupt(base, version):
    tmp = os.path.join(base, f".tmp-corrupt-{version}")
    os.makedirs(tmp)
    with open(os.path.join(tmp, "saved_model.pb"), "wb") as f:
        f.write(b"this is not a SavedModel")
    os.rename(tmp, os.path.join(base, str(version)))


def test_hot_swap_under_load_then_corrupt_version_keeps_old(saved_models, tmp_path):
    source = str(saved_models / "ranking" / "1")
    base = str(tmp_path / "ranking")
    os.makedirs(base)
    toy_models.copy_version(source, base, 1)
    server = start_server(model_name="ranking", model_base_path=base)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        stop = threading.Event()
        seen = [[] for _ in range(3)]
        failures = []

        def client(i):
            while not stop.is_set():
                try:
                    response = stub.Predict(predict_request(), timeout=10)
                    seen[i].append(response.model_spec.version.value)
                except grpc.RpcError as err:
                    failures.append((err.code(), err.details()))

        clients = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for thread in clients:
            thread.start()
        try:
            for version in (2, 3, 4):
                time.sleep(1.0)
                toy_models.copy_version(source, base, version)
            assert wait_for(lambda: all(s and s[-1] == 4 for s in seen))
        finally:
            stop.set()
            for thread in clients:
                thread.join(timeout=30)
        assert failures == []
        for versions in seen:
            assert versions == sorted(versions), "served version moved backwards"
            assert versions[0] == 1 and versions[-1] == 4
        assert sum(map(len, seen)) > 30

        _corrupt(base, 5)
        status_stub = model_service_pb2_grpc.ModelServiceStub(channel)
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "ranking"

        def statuses():
            return {s.version: s for s in status_stub.GetModelStatus(request, timeout=10)
                    .model_version_status}
        assert wait_for(lambda: 5 in statuses() and statuses()[5].state ==
                         get_model_status_pb2.ModelVersionStatus.END)
        failed = statuses()[5]
        assert failed.status.error_code != 0 and os.path.join(base, "5") in failed.status.error_message
        assert statuses()[4].state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
        assert stub.Predict(predict_request(), timeout=10).model_spec.version.value == 4
        channel.close()
    finally:
        server.stop()


def _config(base, policy_text=""):
    from google.protobuf import text_format

    config = single_model_config("ranking", base)
    if policy_text:
        text_format.Parse(policy_text, config.model_config_list.config[0].model_version_policy)
    return config


def _manager(base, policy_text=""):
    manager = ModelManager(ServerOptions(model_base_path=base, file_system_poll_wait_seconds=0,
                                         max_num_load_retries=0))
    manager.start(_config(base, policy_text))
    return manager


@pytest.fixture(scope="module")
def three_versions(saved_models, tmp_path_factory):
    base = str(tmp_path_factory.mktemp("versions") / "ranking")
    os.makedirs(base)
    for version in (1, 2, 3):
        toy_models.copy_version(str(saved_models / "ranking" / "1"), base, version)
    os.makedirs(os.path.join(base, ".tmp-export-4"))  # an exporter's half-written version
    os.makedirs(os.path.join(base, "latest"))
    return base


def test_a_zero_padded_version_directory_is_served(saved_models, tmp_path):
    """As by TF Serving, ``00000123`` is version 123, loaded from that directory (the load
    looked for <base>/123 and failed)."""
    base = str(tmp_path / "ranking")
    os.makedirs(base)
    os.rename(toy_models.copy_version(str(saved_models / "ranking" / "1"), base, 1),
              os.path.join(base, "00000123"))
    manager = _manager(base)
    try:
        servable = manager.lookup("ranking")
        assert (servable.version, servable.path) == (123, os.path.join(base, "00000123"))
    finally:
        manager.stop()


def test_non_numeric_directories_are_skipped(three_versions):
    assert version_dirs(three_versions) == [1, 2, 3]


@pytest.mark.parametrize("policy, loaded", [
    ("", [3]),
    ("latest { num_versions: 2 }", [2, 3]),
    ("all {}", [1, 2, 3]),
    ("specific { versions: 1 versions: 3 }", [1, 3]),
])
def test_version_policies(three_versions, policy, loaded):
    manager = _manager(three_versions, policy)
    try:
        assert [v for v, state, *_ in manager.model_status("ranking") if state == "AVAILABLE"] == \
            sorted(loaded, reverse=True)
        assert manager.lookup("ranking").version == max(loaded)
        with pytest.raises(ServingError) as info:
            manager.lookup("ranking", version=min(set(range(1, 5)) - set(loaded)))
        assert info.value.code == "NOT_FOUND"
    finally:
        manager.stop()


def test_an_unloaded_version_is_freed_at_once_so_reloads_do_not_pile_up(three_versions):
    """Issue 14, item 5: a loaded SavedModel is a web of reference cycles. Before the unload
    collected them, each reload cycle left its objects and eager functions behind until
    Python's next full collection (RSS rose in a sawtooth). Automatic collection is off here,
    so only the unload's own collection can free them."""
    from tensorflow.python.eager import context

    manager = _manager(three_versions, "specific { versions: 1 }")
    gc.disable()
    try:
        functions, objects = [], []
        for cycle in range(6):
            manager.reload_config(_config(three_versions,
                                          f"specific {{ versions: {2 - cycle % 2} }}"))
            assert manager.lookup("ranking").version == 2 - cycle % 2
            functions.append(len(context.context().list_function_names()))
            objects.append(len(gc.get_objects()))
        assert functions[2:] == [functions[1]] * 4, functions
        assert max(objects[2:]) - objects[1] < 1000, objects  # a load is ~25k objects
    finally:
        gc.enable()
        manager.stop()


def test_warmup_records_are_replayed_and_a_bad_one_fails_the_load(saved_models, tmp_path):
    manager = _manager(str(saved_models / "ranking"))
    try:
        assert replay_warmup(manager.lookup("ranking")) == len(toy_models.RANKING_WARMUP)
    finally:
        manager.stop()
    base = str(tmp_path / "ranking")
    model = toy_models.ToyRanking()
    toy_models.save_version(model, {"serving_default": model.serve}, base, 1,
                            warmup=[("no_such_signature", {"user_id": ["u1"]})])
    manager = _manager(base)
    try:
        ((version, state, code, message),) = manager.model_status("ranking")
        assert (version, state, code) == (1, "END", "FAILED_PRECONDITION")
        assert "Failed to warm up model ranking version 1" in message
        with pytest.raises(ServingError):
            manager.lookup("ranking")
    finally:
        manager.stop()


def test_model_config_file_is_polled(saved_models, tmp_path):
    from serving_testlib import models_config

    from fm_keras.serving.config import load_model_server_config

    path = tmp_path / "models.config"
    path.write_text(models_config(saved_models, models=("ranking",)))
    options = ServerOptions(model_config_file=str(path), model_config_file_poll_wait_seconds=1,
                            file_system_poll_wait_seconds=0, max_num_load_retries=0)
    manager = ModelManager(options)
    manager.start(load_model_server_config(str(path)))
    try:
        with pytest.raises(ServingError):
            manager.lookup("ranking_recall")
        path.write_text(models_config(saved_models, {"stable": 1}))
        assert wait_for(lambda: ("ranking_recall", "AVAILABLE") in [
            (name, manager.model_status(name)[0][1]) for name in manager.model_names()])
        assert manager.lookup("ranking_recall").version == 1
        assert manager.lookup("ranking", label="stable").version == 1
    finally:
        manager.stop()


def test_reload_with_a_new_base_path_serves_from_it(saved_models, tmp_path):
    """The old path's version keeps serving while the new path's loads (it was unloaded
    first: NOT_FOUND for the whole load), and is unloaded once the new one serves."""
    moved = str(tmp_path / "elsewhere")
    os.makedirs(moved)
    toy_models.copy_version(str(saved_models / "ranking" / "1"), moved, 1)
    manager = _manager(str(saved_models / "ranking"))
    old = manager.lookup("ranking")
    seen_while_loading = []
    load = manager._load_servable

    def observed_load(name, version, path):
        seen_while_loading.append(manager.lookup("ranking").path)
        return load(name, version, path)

    manager._load_servable = observed_load
    try:
        manager.reload_config(single_model_config("ranking", moved))
        assert seen_while_loading == [old.path]
        assert manager.lookup("ranking").path == os.path.join(moved, "1")
        assert [s for v, s, *_ in manager.model_status("ranking")] == ["AVAILABLE"]
        assert not [t for t in threading.enumerate() if t.name.startswith("load-retry-")]
    finally:
        manager.stop()


def test_a_moved_model_that_cannot_load_keeps_its_old_version_until_removed(saved_models,
                                                                             tmp_path):
    broken = str(tmp_path / "broken")
    os.makedirs(broken)
    _corrupt(broken, 1)
    manager = _manager(str(saved_models / "ranking"))
    try:
        old_path = manager.lookup("ranking").path
        manager.reload_config(single_model_config("ranking", broken))
        assert manager.lookup("ranking").path == old_path  # availability preserved
        assert manager.model_status("ranking")[0][2] != "OK"  # the new version failed
        # moved again while the last move's path has served nothing: still the old version
        manager.reload_config(single_model_config("ranking", str(tmp_path / "missing")))
        assert manager.lookup("ranking").path == old_path
        manager.reload_config(single_model_config("other", str(saved_models / "ranking")))
        with pytest.raises(ServingError):
            manager.lookup("ranking")
    finally:
        manager.stop()


def test_load_retries_do_not_stall_polling_and_stop_when_no_longer_aspired(saved_models,
                                                                            tmp_path):
    """A corrupt version retried with TF Serving's flags used to retry inside the poll, under
    the manager's lock: for max_num_load_retries x load_retry_interval every model's polling
    stalled (a label edit was not seen) and removing the version did not stop its retries. Now
    the retries run on their own thread, and leaving the aspired set cancels them."""
    import shutil

    from serving_testlib import models_config

    from fm_keras.serving.config import load_model_server_config

    root = tmp_path / "models"
    for name in ("ranking", "ranking_recall"):
        os.makedirs(root / name)
        toy_models.copy_version(str(saved_models / name / "1"), str(root / name), 1)
    path = tmp_path / "models.config"
    path.write_text(models_config(root))
    # 1000 retries 0.5 s apart: the old code stalled every poll for over 8 minutes.
    options = ServerOptions(model_config_file=str(path), model_config_file_poll_wait_seconds=1,
                            file_system_poll_wait_seconds=1, max_num_load_retries=1000,
                            load_retry_interval_micros=500_000)
    manager = ModelManager(options)
    manager.start(load_model_server_config(str(path)))

    def state(name, version):
        statuses = {v: rest for v, *rest in manager.model_status(name)}
        return statuses.get(version, [None])[0]

    try:
        _corrupt(str(root / "ranking_recall"), 2)
        assert wait_for(lambda: state("ranking_recall", 2) == "LOADING")
        path.write_text(models_config(root, {"stable": 1}))  # the other model's label edit
        assert wait_for(lambda: _serves_label(manager, "ranking", "stable"))
        assert manager.lookup("ranking", label="stable").version == 1
        assert state("ranking_recall", 2) == "LOADING"  # still retrying
        shutil.rmtree(root / "ranking_recall" / "2")
        assert wait_for(lambda: state("ranking_recall", 2) == "END")
        ((version, _, code, message),) = [s for s in manager.model_status("ranking_recall")
                                          if s[0] == 2]
        assert code != "OK" and os.path.join(str(root), "ranking_recall", "2") in message
        assert state("ranking_recall", 1) == "AVAILABLE"

        _corrupt(str(root / "ranking"), 2)  # then its model leaves the config mid-retries
        assert wait_for(lambda: state("ranking", 2) == "LOADING")
        path.write_text(models_config(root, models=("ranking_recall",)))
        assert wait_for(lambda: manager.model_names() == ["ranking_recall"])
        assert wait_for(lambda: not [t for t in threading.enumerate()  # both retry loops ended
                                     if t.name.startswith("load-retry-")])
        assert manager.lookup("ranking_recall").version == 1
    finally:
        manager.stop()


def test_startup_waits_out_the_initial_versions_load_retries(saved_models, tmp_path):
    """TF Serving's startup returns once the initial versions are loaded or have failed, load
    retries included: the retries moving off the poll must not make `start` return early."""
    from serving_testlib import models_config

    from fm_keras.serving.config import load_model_server_config

    root = tmp_path / "models"
    for name in ("ranking", "ranking_recall"):
        os.makedirs(root / name)
        toy_models.copy_version(str(saved_models / name / "1"), str(root / name), 1)
    _corrupt(str(root / "ranking_recall"), 2)
    path = tmp_path / "models.config"
    path.write_text(models_config(root))
    options = ServerOptions(model_config_file=str(path), max_num_load_retries=2,
                            load_retry_interval_micros=100_000)
    manager = ModelManager(options)
    manager.start(load_model_server_config(str(path)))
    try:  # no wait: start has returned after both retries
        statuses = {v: rest for v, *rest in manager.model_status("ranking_recall")}
        assert statuses[2][0] == "END"  # latest policy: version 2 alone is aspired
    finally:
        manager.stop()


def _serves_label(manager, name, label):
    try:
        manager.lookup(name, label=label)
    except ServingError:
        return False
    return True


def test_a_request_on_an_unloaded_version_starts_no_batch_threads(three_versions):
    """A request that looked a version up just before it was unloaded, for a signature not yet
    called on it, made a new Batcher: its threads were never stopped and kept the unloaded
    model alive. It now runs inline, as requests already queued there do."""
    from fm_keras.serving.config import BatchingOptions
    from serving_testlib import RANKING_ROW

    manager = ModelManager(ServerOptions(model_base_path=three_versions,
                                         file_system_poll_wait_seconds=0, max_num_load_retries=0),
                           BatchingOptions(num_batch_threads=1))
    manager.start(_config(three_versions, "specific { versions: 1 }"))
    try:
        servable = manager.lookup("ranking")
        manager.reload_config(_config(three_versions, "specific { versions: 2 }"))
        sig = servable.signature("")
        arrays = {name: np.asarray(RANKING_ROW[name], dtype=sig.inputs[name][0])
                  for name in sig.inputs}
        outputs = servable.run(sig, arrays, timeout=30)
        assert outputs["probability"].shape == (1,)
        assert not [t for t in threading.enumerate() if t.name.startswith("batch-ranking-1-")]
    finally:
        manager.stop()
