"""Recall exports: exact agreement with the ranking model, ScaNN recall, exclusions, pads,
UTF-8 ids, stock ops in a fresh process, errors."""

import functools
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from fm_keras.calibration import Calibration
from fm_keras.errors import DataError, ExportError
from fm_keras.exclusion import item_keys
from fm_keras.interactions import read_catalog
from fm_keras.recall import (PAD_SCORE, BruteForceIndex, ScannIndex, ScannParams, build_index,
                             index_settings, item_vectors)
from fm_keras.scoring import recommend
from fm_keras.servables import load_export

USERS = {"user_id": ["u1", "u7", "u-new"], "user_segment": ["s1", "s3", ""],
         "device": ["ios", "web", "android"], "hour": ["3", "12", "23"]}


@functools.cache
def _load(path):
    """`load_export`, once per export in this module: loading a SavedModel takes seconds and
    the tests only call its signatures (tests of loading itself use a process of their own)."""
    return load_export(path)


def _recall(path, signature="serving_default", **extra):
    _, loaded, _ = _load(path)
    feed = {k: tf.constant(v) for k, v in {**USERS, **extra}.items()}
    return {k: v.numpy() for k, v in loaded.signatures[signature](**feed).items()}


def _ranking_scores(exports, synth_dir):
    """FM logit of every (user, catalog item) pair from the ranking model's serving_default."""
    _, ranking, _ = _load(exports["ranking"])
    items = pd.read_csv(os.path.join(synth_dir, "items.csv"), dtype=str)
    scores = []
    for u in range(len(USERS["user_id"])):
        feed = {k: tf.constant([v[u]] * len(items)) for k, v in USERS.items()}
        feed.update({c: tf.constant(items[c].to_numpy()) for c in
                     ("item_id", "item_category", "item_tags")})
        feed["item_price"] = tf.constant(items["item_price"].astype(np.float32).to_numpy())
        scores.append(ranking.signatures["serving_default"](**feed)["logit"].numpy())
    return items["item_id"].to_numpy(), np.stack(scores)


BACKENDS = ["brute_force", "scann", "partitioned"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_is_the_ranking_models_top_k(exports, small_synth, backend):
    """Every backend on a 5k catalog is exact (ScaNN picks brute force for small catalogs, the
    partitioned index searches every block): ids and scores equal the ranking model's top 20
    over every catalog item (u-new is a user the model never saw)."""
    ids, scores = _ranking_scores(exports, small_synth[0])
    out = _recall(exports[backend])
    for u in range(len(USERS["user_id"])):
        expected = np.sort(scores[u])[::-1][:20]
        np.testing.assert_allclose(out["scores"][u], expected, atol=1e-4)
        got_ids = out["item_ids"][u].astype(str)
        lookup = dict(zip(ids, scores[u]))
        np.testing.assert_allclose([lookup[i] for i in got_ids], out["scores"][u], atol=1e-4)
    # probabilities: the ranking run's calibration (isotonic after the pos_weight correction)
    # of the scores, as in NumPy, and as the ranking export's own `probability` of those rows.
    calibration = Calibration.from_dict(_load(exports[backend])[2]["calibration"])
    assert calibration.method == "isotonic" and calibration.logit_correction == -np.log(4.0)
    np.testing.assert_allclose(out["probabilities"],
                               calibration.probability_numpy(out["scores"]), atol=1e-6)
    _, ranking, _ = _load(exports["ranking"])
    items = pd.read_csv(os.path.join(small_synth[0], "items.csv"), dtype=str).set_index("item_id")
    got_ids = out["item_ids"][0].astype(str)
    feed = {k: tf.constant([v[0]] * len(got_ids)) for k, v in USERS.items()}
    feed.update({c: tf.constant(items.loc[got_ids, c].to_numpy())
                 for c in ("item_category", "item_tags")})
    feed["item_id"] = tf.constant(got_ids.astype(object))
    feed["item_price"] = tf.constant(items.loc[got_ids, "item_price"].astype(np.float32).to_numpy())
    ranked = ranking.signatures["serving_default"](**feed)["probability"].numpy()
    np.testing.assert_allclose(out["probabilities"][0], ranked, atol=1e-6)


def test_partitioned_equals_brute_force(exports):
    """Top-K parity on a small catalog (every block searched): identical ids, equal scores and
    probabilities, for both signatures, seen and unseen users."""
    seen = np.array([[b"item_3", b"", b"no-such-item"]] * 3, dtype=object)
    for signature, extra in (("serving_default", {}),
                             ("exclude_seen", {"exclude_item_ids": seen})):
        want = _recall(exports["brute_force"], signature, **extra)
        got = _recall(exports["partitioned"], signature, **extra)
        np.testing.assert_array_equal(got["item_ids"], want["item_ids"])
        for key in ("scores", "probabilities"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exclude_seen_leaves_out_the_given_items(exports, backend):
    first = _recall(exports[backend])
    seen = np.array([[first["item_ids"][u][0], first["item_ids"][u][3], b"", b"unknown"]
                     for u in range(3)], dtype=object)
    out = _recall(exports[backend], "exclude_seen", exclude_item_ids=seen)
    for u in range(3):
        assert not set(seen[u]) & set(out["item_ids"][u])
        kept = [i for i in first["item_ids"][u] if i not in set(seen[u])]
        assert list(out["item_ids"][u][:len(kept)]) == kept
    assert out["item_ids"].shape == (3, 20)
    # No exclusions (an empty [B, 0] list, or only pads) is serving_default.
    for empty in (np.zeros((3, 0), dtype=object), np.array([[b""]] * 3, dtype=object)):
        none = _recall(exports[backend], "exclude_seen", exclude_item_ids=empty)
        np.testing.assert_array_equal(none["item_ids"], first["item_ids"])
        np.testing.assert_allclose(none["scores"], first["scores"], rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exclude_seen_equals_the_reference_on_many_exclusions(exports, small_synth, backend):
    """600 excluded ids per user against a NumPy reference (the ranking model's scores of the
    items left): user 0 excludes its own top 40 (more than the slack searched: its row is
    searched again), user 1 random items with duplicates and unknown ids, user 2 none."""
    ids, scores = _ranking_scores(exports, small_synth[0])
    rng = np.random.default_rng(0)
    top = np.argsort(-scores[0])[:40]
    seen = [np.concatenate([ids[top], rng.choice(ids, 560)]),
            np.concatenate([rng.choice(ids, 590), ["nope"] * 5, ids[:5]]),
            np.array([""] * 600)]
    out = _recall(exports[backend], "exclude_seen",
                  exclude_item_ids=np.array(seen).astype(object))
    for u in range(3):
        left = ~np.isin(ids, seen[u])
        want = np.sort(scores[u][left])[::-1][:20]
        np.testing.assert_allclose(out["scores"][u], want, atol=1e-4)
        got = out["item_ids"][u].astype(str)
        assert not set(got) & set(seen[u]) and len(set(got)) == 20
        lookup = dict(zip(ids, scores[u]))
        np.testing.assert_allclose([lookup[i] for i in got], out["scores"][u], atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_excluding_every_item_returns_pads(exports, small_synth, backend):
    """Fewer than k items left: excluded ids never come back; empty slots are "" with the
    finite pad score and probability 0 (JSON-safe)."""
    items = pd.read_csv(os.path.join(small_synth[0], "items.csv"), dtype=str)["item_id"]
    every = np.array([items.to_numpy().astype(object)] * 3)
    out = _recall(exports[backend], "exclude_seen", exclude_item_ids=every)
    assert np.all(out["item_ids"] == b"") and out["item_ids"].shape == (3, 20)
    assert np.all(out["scores"] == np.float32(PAD_SCORE)) and np.all(out["probabilities"] == 0)
    all_but = every.copy()
    all_but[1, 17] = b""  # user 1 may still get item 17
    out = _recall(exports[backend], "exclude_seen", exclude_item_ids=all_but)
    assert out["item_ids"][1, 0] == items[17].encode() and np.all(out["item_ids"][1, 1:] == b"")
    assert np.isfinite(out["scores"]).all() and out["scores"][1, 0] > PAD_SCORE


def _meta(path):
    with open(os.path.join(path, "assets.extra", "fm_keras.json")) as f:
        return json.load(f)


def test_metadata_lists_ops_and_custom_ops(exports):
    assert _meta(exports["scann"])["custom_ops"] == ["Scann>ScannSearchBatched",
                                                     "Scann>TensorsToScann"]
    assert _meta(exports["brute_force"])["custom_ops"] == []
    meta = _meta(exports["partitioned"])
    assert meta["custom_ops"] == [] and meta["needs"] == "stock TensorFlow / TF Serving"
    assert {"TopKV2", "GatherV2", "ResourceGather", "Sum"} <= set(meta["ops"])
    assert meta["index"]["backend"] == "partitioned" and meta["index"]["block_size"] >= 8
    assert meta["pad"] == {"item_id": "", "score": PAD_SCORE, "probability": 0.0}
    assert _meta(exports["scann"])["items"] == 5000 and _meta(exports["scann"])["k"] == 20


FRESH_PROCESS = """
import json, sys
import tensorflow as tf
from tensorflow.python.framework import op_def_registry
users = {"user_id": ["u1", "u-new"], "user_segment": ["s1", ""], "device": ["ios", "web"],
         "hour": ["3", "12"]}
seen = tf.constant([[b"item_1", b""], [b"", b""]])
results = {}
for path in sys.argv[1:]:
    meta = json.load(open(path + "/assets.extra/fm_keras.json"))
    unknown = [op for op in meta["ops"] if op_def_registry.get(op) is None]
    loaded = tf.saved_model.load(path)
    out = loaded.signatures["serving_default"](**{k: tf.constant(v) for k, v in users.items()})
    excl = loaded.signatures["exclude_seen"](exclude_item_ids=seen,
                                             **{k: tf.constant(v) for k, v in users.items()})
    results[path] = {"unknown": unknown, "shape": out["item_ids"].shape.as_list(),
                     "excl": excl["item_ids"].shape.as_list()}
results["modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("scann", "fm_keras"))
print(json.dumps(results))
"""


def test_stock_op_exports_load_in_a_fresh_process(exports):
    """Each stock-op export's op list (partitioned, brute force) is a subset of TensorFlow's
    registered ops (no custom op library), and the models load and answer in a process that
    never imports scann or fm_keras."""
    paths = [exports[backend] for backend in ("partitioned", "brute_force")]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, *paths], cwd="/",
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result.pop("modules") == []
    assert result == {path: {"unknown": [], "shape": [2, 20], "excl": [2, 20]} for path in paths}
    assert all(len(_meta(path)["ops"]) > 10 for path in paths)


def test_index_settings_overrides():
    ivf = index_settings("partitioned", 1_000_000, 100, partitions_to_search=7, quantize="int8")
    assert (ivf.num_partitions, ivf.partitions_to_search, ivf.quantize) == (2000, 7, "int8")
    tree = index_settings("scann", 1_000_000, 100, rescore=500)
    assert (tree.num_leaves, tree.reorder) == (2000, 500)
    assert index_settings("scann", 5000, 20) is None
    assert index_settings("scann", 5000, 20, partitions=10, partitions_to_search=2).num_leaves == 10
    with pytest.raises(ExportError, match="--quantize is not a setting of --backend scann"):
        index_settings("scann", 1_000_000, 100, quantize="int8")
    with pytest.raises(ExportError, match="--partitions is not a setting of --backend brute"):
        index_settings("brute_force", 1000, 10, partitions=3)
    with pytest.raises(ExportError, match="needs both --partitions"):
        index_settings("scann", 5000, 20, rescore=10)


def test_scann_partitioned_index_recall_against_exact():
    """Tree + AH + reorder on 60k clustered vectors: recall@100 by score vs NumPy exact search
    (scores, not ids: ties between equal scores are not errors)."""
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 1, (200, 11))
    vectors = (centers[rng.integers(0, 200, 60_000)] + rng.normal(0, 0.5, (60_000, 11)))
    vectors = vectors.astype(np.float32)
    queries = np.concatenate([np.ones((200, 1)), rng.normal(0, 1, (200, 10))], 1)
    queries = queries.astype(np.float32)
    params = ScannParams.for_catalog(len(vectors), 100)
    assert params is not None and params.num_leaves <= len(vectors) / 100
    got, _ = ScannIndex(vectors, 100, params).search(tf.constant(queries), 100)
    exact = np.sort(queries @ vectors.T, axis=1)[:, ::-1][:, :100]
    kth = exact[:, -1:]
    recall = np.mean(np.sum(got.numpy() >= kth - 1e-5, axis=1) / 100)
    assert recall >= 0.95
    bf_scores, _ = BruteForceIndex(vectors).search(tf.constant(queries), 100)
    np.testing.assert_allclose(bf_scores.numpy(), exact, rtol=1e-5, atol=1e-5)


def test_item_vectors_of_the_catalog(exports, small_synth):
    _, ranking, meta = _load(exports["ranking"])
    ids, columns = read_catalog(os.path.join(small_synth[0], "items.csv"), meta, "item_id")
    vectors = item_vectors(ranking, columns, batch_size=1000)
    assert vectors.shape == (5000, 11) and len(ids) == 5000
    assert np.all(np.isfinite(vectors))


def _catalog(tmp_path, frame):
    path = tmp_path / "items.csv"
    frame.to_csv(path, index=False)
    return str(path)


def test_catalog_errors(exports, small_synth, tmp_path):
    items = pd.read_csv(os.path.join(small_synth[0], "items.csv"), dtype=str)
    base = str(tmp_path / "out")
    cases = [
        (items.drop(columns=["item_tags"]), DataError, "missing column 'item_tags'"),
        (items.iloc[:0], DataError, "header but no rows"),
        (pd.concat([items.iloc[:3], items.iloc[:1]]), ExportError, "duplicate item ids"),
    ]
    for frame, error, message in cases:
        with pytest.raises(error, match=message):
            build_index(exports["ranking"], _catalog(tmp_path, frame), "r", base=base)
        assert not os.path.exists(base) or os.listdir(os.path.join(base, "r")) == []
    with pytest.raises(ExportError, match="is a 'fm_keras.recall' export"):
        build_index(exports["scann"], os.path.join(small_synth[0], "items.csv"), "r", base=base)
    with pytest.raises(ExportError, match="--backend"):
        build_index(exports["ranking"], os.path.join(small_synth[0], "items.csv"), "r",
                    base=base, backend="faiss")


@pytest.mark.parametrize("backend", BACKENDS)
def test_warmup_requests_replay_on_the_export(exports, backend):
    """Each warmup record is a valid PredictRequest for its signature (TF Serving replays them
    at load and refuses the version otherwise)."""
    from tensorflow_serving.apis import prediction_log_pb2

    _, loaded, _ = _load(exports[backend])
    path = os.path.join(exports[backend], "assets.extra", "tf_serving_warmup_requests")
    records = [prediction_log_pb2.PredictionLog.FromString(r.numpy())
               for r in tf.data.TFRecordDataset(path)]
    assert sorted(r.predict_log.request.model_spec.signature_name for r in records) == \
        ["exclude_seen", "exclude_seen_keys", "serving_default"]
    for record in records:
        request = record.predict_log.request
        fn = loaded.signatures[request.model_spec.signature_name]
        specs = fn.structured_input_signature[1]
        feed = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
        assert sorted(feed) == sorted(specs)
        for name, value in feed.items():
            assert specs[name].shape.is_compatible_with(value.shape), name
        out = fn(**{k: tf.constant(v) for k, v in feed.items()})
        assert out["item_ids"].shape[0] == 4


def _small_catalog(tmp_path, small_synth, ids, name="items.csv"):
    items = pd.read_csv(os.path.join(small_synth[0], "items.csv"), dtype=str).head(len(ids))
    items["item_id"] = ids
    path = tmp_path / name
    items.to_csv(path, index=False)
    return str(path)


def test_utf8_item_ids_in_and_out(exports, small_synth, tmp_path):
    """Ids in any script: index, both signatures, exclusion and `recommend` output (issue 14
    item 8: 'ascii' codec errors)."""
    from fm_keras.scoring import recommend

    ids = ["café-☕", "商品1", "plain", "ñandú"]
    catalog = _small_catalog(tmp_path, small_synth, ids)
    path = build_index(exports["ranking"], catalog, "utf8", base=str(tmp_path / "m"),
                       backend="partitioned", k=4)
    out = _recall(path)
    assert sorted(i.decode("utf-8") for i in out["item_ids"][0]) == sorted(ids)
    seen = np.array([["café-☕".encode(), "商品1".encode()]] * 3, dtype=object)
    out = _recall(path, "exclude_seen", exclude_item_ids=seen)
    assert sorted(i.decode() for i in out["item_ids"][0] if i) == ["plain", "ñandú"]
    users = tmp_path / "users.csv"
    pd.DataFrame({**{k: v[:1] for k, v in USERS.items()}, "seen": ["商品1|café-☕"]}).to_csv(
        users, index=False)
    recs = str(tmp_path / "recs.csv")
    summary = recommend(path, [str(users)], recs, k=4, exclude_column="seen", progress=False)
    got = pd.read_csv(recs, dtype=str, encoding="utf-8")
    # "café-☕" is 10 bytes: no item keys for this catalog, the ids go as strings.
    assert "exclude_seen_keys" not in _load(path)[1].signatures
    assert "exclude_seen_keys" not in _meta(path)["signatures"]
    assert summary["signature"] == "exclude_seen"
    assert sorted(got["item_id"]) == ["plain", "ñandú"] and list(got["rank"]) == ["1", "2"]


def test_failed_index_leaves_no_directory(exports, small_synth, tmp_path):
    """A failed `index` leaves neither the version nor a model (or base) directory it created;
    an existing model directory stays as it was."""
    base = tmp_path / "new_base"
    bad = _small_catalog(tmp_path, small_synth, ["a", "", "c"], "bad.csv")
    with pytest.raises(DataError, match="empty item id"):
        build_index(exports["ranking"], bad, "r", base=str(base))
    assert not base.exists()
    good = _small_catalog(tmp_path, small_synth, ["a", "b", "c"], "good.csv")
    with pytest.raises(ExportError, match="--quantize is not a setting"):
        build_index(exports["ranking"], good, "r", base=str(base), settings={"quantize": "int8"})
    assert not base.exists()
    (base / "r").mkdir(parents=True)
    with pytest.raises(ExportError, match="--partitions is not a setting"):
        build_index(exports["ranking"], good, "r", base=str(base), backend="brute_force",
                    settings={"partitions": 2})
    assert os.listdir(base / "r") == []


def _strict_json(text):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def tiny_server(exports, small_synth, tmp_path_factory):
    """`fm-keras serve` (gRPC + REST) over 3-item recall models of every backend."""
    from fm_keras.serving.config import ServerOptions
    from fm_keras.serving.server import ModelServer

    root = tmp_path_factory.mktemp("tiny")
    catalog = _small_catalog(root, small_synth, ["i0", "i1", "i2"])
    config = ["model_config_list {"]
    for backend in BACKENDS:
        build_index(exports["ranking"], catalog, backend, base=str(root), k=3, backend=backend)
        config += [f' config {{ name: "{backend}" base_path: "{root / backend}" '
                   'model_platform: "tensorflow" }']
    (root / "models.config").write_text("\n".join(config + ["}"]) + "\n")
    server = ModelServer(ServerOptions(port=0, host="127.0.0.1",
                                       model_config_file=str(root / "models.config"),
                                       file_system_poll_wait_seconds=1)).start(rest=True)
    yield server
    server.stop()


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_catalog_over_grpc_and_rest(tiny_server, backend):
    """3 items, 2 excluded, K = 3 (issue 12 item 5): one item and two pads, never an excluded
    id, and a REST body that a strict JSON parser accepts; ragged exclude rows get a 400."""
    import grpc
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    user = {k: v[:1] for k, v in USERS.items()}
    request = predict_pb2.PredictRequest()
    request.model_spec.name = backend
    request.model_spec.signature_name = "exclude_seen"
    for name, value in user.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    request.inputs["exclude_item_ids"].CopyFrom(tf.make_tensor_proto([["i0", "i1"]]))
    with grpc.insecure_channel(f"127.0.0.1:{tiny_server.grpc_port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        response = stub.Predict(request, timeout=60)
    out = {k: tf.make_ndarray(v) for k, v in response.outputs.items()}
    assert out["item_ids"].tolist() == [[b"i2", b"", b""]]
    assert out["scores"][0, 0] > PAD_SCORE and np.all(out["scores"][0, 1:] == np.float32(PAD_SCORE))
    assert out["probabilities"][0, 1:].tolist() == [0.0, 0.0]

    body = {"signature_name": "exclude_seen",
            "instances": [{**{k: v[0] for k, v in user.items()},
                           "exclude_item_ids": ["i0", "i1"]}]}
    status, text = _rest_predict(tiny_server.rest_port, backend, body)
    assert status == 200, text
    row = _strict_json(text)["predictions"][0]
    assert row["item_ids"] == ["i2", "", ""] and row["probabilities"][1:] == [0.0, 0.0]
    assert row["scores"][1:] == [pytest.approx(PAD_SCORE)] * 2

    # Rows of exclude_item_ids of different lengths: a 400 that says to pad, server stays up.
    ragged = {"signature_name": "exclude_seen",
              "inputs": {**{k: [v[0], v[0]] for k, v in user.items()},
                         "exclude_item_ids": [["i0"], ["i0", "i1"]]}}
    status, text = _rest_predict(tiny_server.rest_port, backend, ragged)
    assert status == 400 and json.loads(text) == {"error": (
        'input exclude_item_ids: rows of different lengths [1, 2]; pad the rows with "" to '
        'one length')}
    status, text = _rest_predict(tiny_server.rest_port, backend, body)
    assert status == 200 and json.loads(text)["predictions"][0] == row

    # The same exclusion as item keys ("i0" -> 0x3069), with a pad, over gRPC and REST.
    keys = item_keys(np.array([[b"i0", b"i1", b""]], dtype=object))
    request.model_spec.signature_name = "exclude_seen_keys"
    del request.inputs["exclude_item_ids"]
    request.inputs["exclude_item_keys"].CopyFrom(tf.make_tensor_proto(keys))
    with grpc.insecure_channel(f"127.0.0.1:{tiny_server.grpc_port}") as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
            request, timeout=60)
    keyed = {k: tf.make_ndarray(v) for k, v in response.outputs.items()}
    assert keyed["item_ids"].tolist() == out["item_ids"].tolist()
    np.testing.assert_array_equal(keyed["scores"], out["scores"])
    body = {"signature_name": "exclude_seen_keys",
            "instances": [{**{k: v[0] for k, v in user.items()},
                           "exclude_item_keys": keys[0].tolist()}]}
    status, text = _rest_predict(tiny_server.rest_port, backend, body)
    assert status == 200 and _strict_json(text)["predictions"][0] == row


@pytest.mark.parametrize("backend", BACKENDS)
def test_exclude_seen_keys_equals_exclude_seen(exports, small_synth, backend):
    """600 excluded ids per user as item keys give what `exclude_seen` gives for them as
    strings: user 0 excludes its own top 40 (its row is searched again), user 1 random ids
    with duplicates, an unknown id, one longer than 8 bytes (`UNKNOWN_KEY`) and pads, user 2
    none; and every item excluded gives pads only."""
    ids = pd.read_csv(os.path.join(small_synth[0], "items.csv"), dtype=str)["item_id"].to_numpy()
    paths = exports
    rng = np.random.default_rng(1)
    top = _recall(paths[backend])["item_ids"][0].astype(str)
    seen = np.array([np.concatenate([top, rng.choice(ids, 580)]),
                     np.concatenate([rng.choice(ids, 590), ["nope", "i-longer-than-8"],
                                     [""] * 8]),
                     [""] * 600]).astype(object)
    seen = np.vectorize(lambda v: v.encode(), otypes=[object])(seen)
    want = _recall(paths[backend], "exclude_seen", exclude_item_ids=seen)
    got = _recall(paths[backend], "exclude_seen_keys", exclude_item_keys=item_keys(seen))
    np.testing.assert_array_equal(got["item_ids"], want["item_ids"])
    np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-6)
    np.testing.assert_allclose(got["probabilities"], want["probabilities"], rtol=1e-6)
    for u in range(3):
        assert not set(got["item_ids"][u]) & set(seen[u]) - {b""}
    every = item_keys(np.array([[i.encode() for i in ids]] * 3, dtype=object))
    out = _recall(paths[backend], "exclude_seen_keys", exclude_item_keys=every)
    assert np.all(out["item_ids"] == b"") and np.all(out["scores"] == np.float32(PAD_SCORE))


def test_recommend_uses_item_keys_and_counts_unknown_ids(exports, small_synth, tmp_path):
    """`recommend --exclude-column` on an export with `exclude_seen_keys`: the signature it
    ran, the items `exclude_seen` returns for the same lists, and the unknown ids (one short,
    one longer than 8 bytes) counted and quoted."""
    ids = pd.read_csv(os.path.join(small_synth[0], "items.csv"), dtype=str)["item_id"].to_numpy()
    paths = exports
    users = tmp_path / "users.csv"
    lists = [f"{ids[3]}|{ids[7]} | nope", "", f"{ids[1]}|i-longer-than-8|{ids[1]}"]
    pd.DataFrame({**USERS, "seen": lists}).to_csv(users, index=False)
    recs = str(tmp_path / "recs.csv")
    summary = recommend(paths["scann"], [str(users)], recs, k=20, exclude_column="seen",
                        progress=False)
    assert summary["signature"] == "exclude_seen_keys"
    assert (summary["excluded_ids_checked"], summary["excluded_ids_not_in_catalog"]) == (6, 2)
    assert summary["not_in_catalog_examples"] == ["nope", "i-longer-than-8"]
    got = pd.read_csv(recs, dtype=str, keep_default_na=False)
    seen = np.array([[i.strip().encode() for i in row.split("|")] + [b""] * (3 - len(
        row.split("|"))) if row else [b""] * 3 for row in lists], dtype=object)
    want = _recall(paths["scann"], "exclude_seen", exclude_item_ids=seen)["item_ids"]
    for u, user in enumerate(USERS["user_id"]):
        assert got[got["user_id"] == user]["item_id"].tolist() == want[u].astype(str).tolist()


def _rest_predict(port: int, model: str, body: dict) -> tuple[int, str]:
    """POSTs a predict request; returns (HTTP status, body text)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", f"/v1/models/{model}:predict", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        reply = conn.getresponse()
        return reply.status, reply.read().decode("utf-8")
    finally:
        conn.close()


def test_k_above_the_catalog_is_clamped_with_a_warning(exports, small_synth, tmp_path, capsys):
    catalog = _small_catalog(tmp_path, small_synth, ["a", "b", "c"])
    path = build_index(exports["ranking"], catalog, "clamped", base=str(tmp_path / "m"),
                       backend="brute_force", k=50)
    assert "--k 50 is larger than the catalog (3 items)" in capsys.readouterr().err
    assert _recall(path)["item_ids"].shape[1] == 3
    users = pd.read_csv(os.path.join(small_synth[0], "test.csv"), dtype=str).head(3)
    users["user_id"] = ["u0", "u1", "u2"]
    users["seen"] = ["", " b ", "a | c|zz"]  # spaces around ids are dropped
    users.to_csv(tmp_path / "users.csv", index=False)
    # recommend clamps --k to the catalog as index does (it was an error), counts the users
    # left with fewer than k items by their exclusions and the excluded ids it does not know
    summary = recommend(path, [str(tmp_path / "users.csv")], str(tmp_path / "r.csv"), k=4,
                        exclude_column="seen", progress=False)
    err = capsys.readouterr().err
    assert "warning: --k 4 is larger than the catalog (3 items): recommending at most 3 " \
           "items per user" in err
    assert "warning: 1 of the first 4 excluded ids are not in the catalog (e.g. ['zz']); they exclude " \
           "nothing" in err
    assert summary["k"] == 3 and summary["users_fewer_than_k"] == 2 and summary["rows"] == 3
    assert (summary["excluded_ids_checked"], summary["excluded_ids_not_in_catalog"],
            summary["not_in_catalog_examples"]) == (4, 1, ["zz"])
    recs = pd.read_csv(tmp_path / "r.csv")
    assert recs.groupby("user_id")["item_id"].apply(sorted).to_dict() == \
        {"u0": ["a", "b", "c"], "u1": ["a", "c"], "u2": ["b"]}
    with pytest.raises(ExportError, match=r"--k must be between 1 and 3 \(the catalog holds 3 "
                                          r"items\), got 0"):
        recommend(path, [str(tmp_path / "users.csv")], str(tmp_path / "r.csv"), k=0)


def test_a_regression_models_recall_has_its_predictions_and_no_probabilities(
        regression_export, small_synth, tmp_path):
    """A regression model has no probability: its recall export outputs item ids and scores
    (equal to the ranking export's `prediction`, best first), no `probabilities` (it output
    sigmoid(score)), its pad has no probability, and `recommend` writes no probability column."""
    _, ranking = regression_export
    catalog = _small_catalog(tmp_path, small_synth, ["a", "b", "c", "d"])
    path = build_index(ranking, catalog, "rating_recall", base=str(tmp_path / "m"),
                       backend="brute_force", k=3)
    meta = _meta(path)
    assert meta["task"] == "regression" and "calibration" not in meta
    assert meta["pad"] == {"item_id": "", "score": PAD_SCORE}
    assert set(meta["signatures"]["serving_default"]["outputs"]) == {"item_ids", "scores"}
    _, loaded, _ = load_export(path)
    users = {k: tf.constant(v) for k, v in USERS.items()}
    out = loaded.signatures["exclude_seen"](
        **users, exclude_item_ids=tf.constant([["b"], ["b"], ["a"]]))
    assert set(out) == {"item_ids", "scores"}
    _, ranked, _ = load_export(ranking)
    items = pd.read_csv(catalog, dtype=str)
    for u, excluded in enumerate(["b", "b", "a"]):
        feed = {k: tf.constant([v[u]] * len(items)) for k, v in USERS.items()}
        feed.update({c: tf.constant(items[c].to_numpy()) for c in
                     ("item_id", "item_category", "item_tags")})
        feed["item_price"] = tf.constant(items["item_price"].astype(np.float32).to_numpy())
        prediction = ranked.signatures["serving_default"](**feed)["prediction"].numpy()
        order = [i for i in np.argsort(-prediction) if items["item_id"][i] != excluded]
        assert [x.decode() for x in out["item_ids"].numpy()[u]] == \
            list(items["item_id"][order])
        np.testing.assert_allclose(out["scores"].numpy()[u], prediction[order], atol=1e-5)
    frame = pd.DataFrame(USERS)
    frame["seen"] = ["b", "b", "a"]
    frame.to_csv(tmp_path / "users.csv", index=False)
    recommend(path, [str(tmp_path / "users.csv")], str(tmp_path / "r.csv"), k=3,
              exclude_column="seen", progress=False)
    recs = pd.read_csv(tmp_path / "r.csv")
    assert list(recs.columns) == ["user_id", "rank", "item_id", "score"] and len(recs) == 9
