"""Ranking export: layout, tower parity, fresh-process loading, unseen values, refusals."""

import functools
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from fm_keras.errors import ExportError
from fm_keras.export import RankingServable, check_parity, export_run, next_version, sample_rows
from fm_keras.runs import load_run, predict_split
from fm_keras.towers import item_vector


# The session's ranking export and run, loaded once in this module (seconds each): these
# tests only call their signatures and models; loading in a fresh process is tested below.
_load_saved_model = functools.cache(tf.saved_model.load)
_load_run = functools.cache(load_run)


def _meta(version_dir):
    with open(os.path.join(version_dir, "assets.extra", "fm_keras.json")) as f:
        return json.load(f)


def test_layout_metadata_and_warmup(exports):
    from tensorflow_serving.apis import prediction_log_pb2

    version_dir = exports["ranking"]
    assert os.path.basename(version_dir) == "1"
    assert [d for d in os.listdir(os.path.dirname(version_dir)) if not d.isdigit()] == []
    meta = _meta(version_dir)
    assert meta["format"] == "fm_keras.ranking"
    assert meta["query_features"] == ["user_id", "user_segment", "device", "hour"]
    assert meta["item_features"] == ["item_id", "item_category", "item_tags", "item_price"]
    assert set(meta["signatures"]) == {"serving_default", "user_tower", "item_tower"}
    assert meta["signatures"]["item_tower"]["outputs"] == {"item_vector": "float32"}
    assert meta["calibration"]["logit_correction"] == pytest.approx(-np.log(4.0))
    assert meta["metrics"]["test"]["auc"] > 0.6 and meta["custom_ops"] == []
    assert meta["parity"]["max_abs_diff"] <= 1e-4
    warmup = os.path.join(version_dir, "assets.extra", "tf_serving_warmup_requests")
    records = [prediction_log_pb2.PredictionLog.FromString(r.numpy())
               for r in tf.data.TFRecordDataset(warmup)]
    assert sorted(r.predict_log.request.model_spec.signature_name for r in records) == \
        ["item_tower", "serving_default", "user_tower"]
    item = next(r for r in records if r.predict_log.request.model_spec.signature_name
                == "item_tower").predict_log.request
    assert sorted(item.inputs) == sorted(meta["item_features"])


def test_towers_reproduce_logit_on_10k_rows(small_run, exports):
    """user_vector . item_vector + user_offset == logit, checked against an independent sum."""
    run = _load_run(small_run)
    rows = sample_rows(run, 10_000, seed=5)
    loaded = _load_saved_model(exports["ranking"])
    meta = _meta(exports["ranking"])
    batch = {k: tf.constant(v) for k, v in rows.items()}
    logit = loaded.signatures["serving_default"](**batch)["logit"].numpy().astype(np.float64)
    user = loaded.signatures["user_tower"](**{k: batch[k] for k in meta["query_features"]})
    item = loaded.signatures["item_tower"](**{k: batch[k] for k in meta["item_features"]})
    recon = (np.sum(user["user_vector"].numpy().astype(np.float64)
                    * item["item_vector"].numpy(), axis=1) + user["user_offset"].numpy())
    assert len(logit) == 10_000
    np.testing.assert_allclose(recon, logit, atol=1e-4)
    np.testing.assert_array_equal(user["user_vector"].numpy()[:, 0], 1.0)
    # And the exported logit is the trained model's logit.
    from fm_keras.data import Split

    split = Split({k: v for k, v in rows.items()}, None, len(logit), {}, [])
    np.testing.assert_allclose(predict_split(run.model, split)["logit"], logit, atol=1e-5)


def test_exported_probability_is_the_in_process_calibrated_probability(small_run, exports):
    """Must show 3: serving_default's probability == the run's calibrated probability (1e-6),
    and the metadata's calibration block is the run's calibrator."""
    from fm_keras.calibration import Calibration
    from fm_keras.data import Split

    run = _load_run(small_run)
    meta = _meta(exports["ranking"])
    assert meta["calibration"]["method"] == "isotonic" == run.model.calibration.method
    assert Calibration.from_dict(meta["calibration"]) == run.model.calibration
    rows = sample_rows(run, 5000, seed=9)
    loaded = _load_saved_model(exports["ranking"])
    out = loaded.signatures["serving_default"](**{k: tf.constant(v) for k, v in rows.items()})
    split = Split(dict(rows), None, 5000, {}, [])
    in_process = predict_split(run.model, split)
    np.testing.assert_allclose(out["probability"].numpy(), in_process["probability"], atol=1e-6)
    np.testing.assert_allclose(out["raw_probability"].numpy(),
                               1 / (1 + np.exp(-out["logit"].numpy().astype(np.float64))),
                               atol=1e-6)
    np.testing.assert_allclose(out["probability"].numpy(),
                               run.model.calibration.probability_numpy(out["logit"].numpy()),
                               atol=1e-6)
    assert not np.allclose(out["probability"].numpy(), out["raw_probability"].numpy(), atol=1e-3)


def test_unseen_and_bad_values_give_finite_outputs(exports):
    loaded = _load_saved_model(exports["ranking"])
    n = 6
    rows = {
        "user_id": ["never", "", "u1", "ü-new", " ", "u0"],
        "user_segment": ["", "s999", "s1", "x", "s1", "s0"],
        "device": ["fridge", "", "ios", "web", "IOS", "ios"],
        "hour": ["25", "-1", "", "3.5", "x", "0"],
        "item_id": ["i-new", "", "i1", "zz", "i0", "i0"],
        "item_category": ["", "c-new", "c1", "c1", "c1", "c1"],
        "item_tags": ["", "|||", "t1:abc|t2:1e999", "t1:nan|t3:-inf", "new:2|t1", "t1:0.5|t2:inf"],
        "item_price": np.array([np.nan, np.inf, -np.inf, 1e38, -5.0, 0.0], np.float32),
    }
    batch = {k: tf.constant(v) for k, v in rows.items()}
    for name, fn in loaded.signatures.items():
        inputs = fn.structured_input_signature[1]
        out = fn(**{k: batch[k] for k in inputs})
        for key, value in out.items():
            assert value.shape[0] == n
            assert np.all(np.isfinite(value.numpy())), (name, key)


FRESH = r"""
import json, sys
import tensorflow as tf
def signatures(path):
    loaded = tf.saved_model.load(path)
    results = {}
    for name, fn in loaded.signatures.items():
        feed = {}
        for key, spec in fn.structured_input_signature[1].items():
            shape = [3] + [2] * (len(spec.shape) - 1)
            feed[key] = tf.fill(shape, "x") if spec.dtype == tf.string else \
                tf.ones(shape, spec.dtype)
        results[name] = sorted(fn(**feed))
    return results
results = {which: signatures(path) for which, path in json.loads(sys.argv[1])}
assert "scann" not in sys.modules  # the stock-op exports needed no ScaNN op
import scann
results["scann"] = signatures(sys.argv[2])
assert "fm_keras" not in sys.modules
print(json.dumps(results))
"""


def test_fresh_process_loads_every_signature(exports):
    """The ranking and brute-force exports load and answer in a process with neither fm_keras
    nor ScaNN imported; the ScaNN recall export once ``import scann`` registers its ops."""
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    stock = [(which, exports[which]) for which in ("ranking", "brute_force")]
    proc = subprocess.run([sys.executable, "-c", FRESH, json.dumps(stock), exports["scann"]],
                          capture_output=True, text=True, env=env, cwd="/", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results["ranking"] == {"serving_default": ["logit", "probability", "raw_probability"],
                                  "user_tower": ["user_offset", "user_vector"],
                                  "item_tower": ["item_vector"]}
    for which in ("scann", "brute_force"):
        assert results[which]["serving_default"] == results[which]["exclude_seen"] == \
            results[which]["exclude_seen_keys"] == ["item_ids", "probabilities", "scores"]


def test_saved_model_cli_lists_signatures_with_raw_inputs(exports):
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    proc = subprocess.run([cli, "show", "--all", "--dir", exports["ranking"]],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    for signature in ("serving_default", "user_tower", "item_tower"):
        assert f"signature_def['{signature}']" in proc.stdout
    for raw in ("user_id", "item_tags", "item_price", "device", "hour"):
        assert f"inputs['{raw}']" in proc.stdout


def _traced_functions(version_dir, name):
    """How many functions of the export's graph library were traced from the method `name`."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    with open(os.path.join(version_dir, "saved_model.pb"), "rb") as f:
        saved.ParseFromString(f.read())
    traced = re.compile(f"__inference_{name}_[0-9]+")
    return sum(bool(traced.fullmatch(f.signature.name))
               for f in saved.meta_graphs[0].graph_def.library.function)


def test_each_signature_is_saved_once(exports):
    """A signature's function is in the graph once (a tf.function attribute of the saved
    module was traced and saved a second time beside its signature)."""
    for name in ("_serve", "_user_tower", "_item_tower"):
        assert _traced_functions(exports["ranking"], name) == 1, name
    for backend in ("scann", "brute_force", "partitioned"):
        for name in ("_recall", "_recall_excluding"):
            assert _traced_functions(exports[backend], name) == 1, (backend, name)


def test_signatures_are_traced_without_autograph(small_run, monkeypatch):
    """The signature functions branch on Python values only, so they are traced as written:
    AutoGraph's source conversion was most of an export's tracing time."""
    from tensorflow.python.autograph.pyct import transpiler

    converted = []  # every conversion, the ones AutoGraph has cached too
    original = transpiler.PyToPy.transform_function

    def recording(self, fn, *args, **kwargs):
        converted.append(getattr(fn, "__qualname__", fn))
        return original(self, fn, *args, **kwargs)

    monkeypatch.setattr(transpiler.PyToPy, "transform_function", recording)
    signatures = RankingServable(_load_run(small_run).model).signatures()
    assert sorted(signatures) == ["item_tower", "serving_default", "user_tower"]
    assert converted == []


def test_refuses_a_model_that_fails_parity(small_run, tmp_path, monkeypatch):
    def broken_item_tower(self, features):  # drops L_I + P_I: the classic decomposition bug
        vector = item_vector(self.fm, *self.encoder.encode(features, self.item_names))
        return {"item_vector": tf.concat([tf.zeros_like(vector[:, :1]), vector[:, 1:]], axis=1)}

    monkeypatch.setattr(RankingServable, "_item_tower", broken_item_tower)
    with pytest.raises(ExportError, match="differs from logit"):
        export_run(small_run, "ctr", base=str(tmp_path / "new"), parity_rows=500)
    assert os.listdir(tmp_path) == []  # no version, no temp directory, no model/base directory
    (tmp_path / "ctr").mkdir()  # a model directory that was there stays
    with pytest.raises(ExportError, match="differs from logit"):
        export_run(small_run, "ctr", base=str(tmp_path), parity_rows=500)
    assert os.listdir(tmp_path / "ctr") == []


def test_a_regression_run_exports_its_prediction_as_the_fm_score(regression_export):
    """A regression model's serving output is ``prediction``, its FM score (it has no logit):
    the parity check compares the towers with it (the export failed with KeyError 'logit')."""
    run_dir, version_dir = regression_export
    meta = _meta(version_dir)
    assert meta["parity"]["rows"] == 2000 and meta["parity"]["max_abs_diff"] <= 1e-4
    assert meta["signatures"]["serving_default"]["outputs"] == {"prediction": "float32"}
    assert meta["task"] == "regression" and "calibration" not in meta  # nothing to calibrate
    loaded = tf.saved_model.load(version_dir)
    rows = sample_rows(load_run(run_dir), 50, seed=1)
    out = loaded.signatures["serving_default"](**{k: tf.constant(v) for k, v in rows.items()})
    user = loaded.signatures["user_tower"](**{k: tf.constant(rows[k])
                                              for k in meta["query_features"]})
    item = loaded.signatures["item_tower"](**{k: tf.constant(rows[k])
                                              for k in meta["item_features"]})
    np.testing.assert_allclose(
        np.sum(user["user_vector"].numpy() * item["item_vector"].numpy(), axis=1)
        + user["user_offset"].numpy(), out["prediction"].numpy(), atol=1e-4)


def test_check_parity_reports_the_difference(small_run, exports):
    run = _load_run(small_run)
    meta = _meta(exports["ranking"])
    loaded = _load_saved_model(exports["ranking"])
    result = check_parity(loaded, sample_rows(run, 200), meta["query_features"],
                          meta["item_features"])
    assert result["rows"] == 200 and result["max_abs_diff"] <= 1e-4


def test_versions_are_immutable_and_names_checked(small_run, exports, tmp_path):
    base = os.path.dirname(os.path.dirname(exports["ranking"]))
    with pytest.raises(ExportError, match="exists already"):
        export_run(small_run, "ctr", base=base, version=1)
    for bad in ("", "12", "../x", ".hidden"):
        with pytest.raises(ExportError, match="not a usable model name"):
            export_run(small_run, bad, base=str(tmp_path))
    os.makedirs(tmp_path / "m" / "3")
    os.makedirs(tmp_path / "m" / ".tmp-4-abc")
    assert next_version(str(tmp_path / "m")) == 4
    assert next_version(str(tmp_path / "none")) == 1
