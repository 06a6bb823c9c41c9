"""Recall exports: exact agreement with the ranking model, ScaNN recall, exclusions, errors."""

import json
import os

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from fm_keras.calibration import Calibration
from fm_keras.errors import DataError, ExportError
from fm_keras.recall import (BruteForceIndex, ScannIndex, ScannParams, build_index,
                             item_vectors, read_catalog)
from fm_keras.servables import load_export

USERS = {"user_id": ["u1", "u7", "u-new"], "user_segment": ["s1", "s3", ""],
         "device": ["ios", "web", "android"], "hour": ["3", "12", "23"]}


def _recall(path, signature="serving_default", **extra):
    _, loaded, _ = load_export(path)
    feed = {k: tf.constant(v) for k, v in {**USERS, **extra}.items()}
    return {k: v.numpy() for k, v in loaded.signatures[signature](**feed).items()}


def _ranking_scores(exports, synth_dir):
    """FM logit of every (user, catalog item) pair from the ranking model's serving_default."""
    _, ranking, _ = load_export(exports["ranking"])
    items = pd.read_csv(os.path.join(synth_dir, "items.csv"), dtype=str)
    scores = []
    for u in range(len(USERS["user_id"])):
        feed = {k: tf.constant([v[u]] * len(items)) for k, v in USERS.items()}
        feed.update({c: tf.constant(items[c].to_numpy()) for c in
                     ("item_id", "item_category", "item_tags")})
        feed["item_price"] = tf.constant(items["item_price"].astype(np.float32).to_numpy())
        scores.append(ranking.signatures["serving_default"](**feed)["logit"].numpy())
    return items["item_id"].to_numpy(), np.stack(scores)


@pytest.mark.parametrize("backend", ["brute_force", "scann"])
def test_top_k_is_the_ranking_models_top_k(exports, small_synth, backend):
    """Both backends on a 5k catalog are exact (ScaNN picks brute force for small catalogs):
    ids and scores equal the ranking model's top 20 over every catalog item."""
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
    calibration = Calibration.from_dict(load_export(exports[backend])[2]["calibration"])
    assert calibration.method == "isotonic" and calibration.logit_correction == -np.log(4.0)
    np.testing.assert_allclose(out["probabilities"],
                               calibration.probability_numpy(out["scores"]), atol=1e-6)
    _, ranking, _ = load_export(exports["ranking"])
    items = pd.read_csv(os.path.join(small_synth[0], "items.csv"), dtype=str).set_index("item_id")
    got_ids = out["item_ids"][0].astype(str)
    feed = {k: tf.constant([v[0]] * len(got_ids)) for k, v in USERS.items()}
    feed.update({c: tf.constant(items.loc[got_ids, c].to_numpy())
                 for c in ("item_category", "item_tags")})
    feed["item_id"] = tf.constant(got_ids.astype(object))
    feed["item_price"] = tf.constant(items.loc[got_ids, "item_price"].astype(np.float32).to_numpy())
    ranked = ranking.signatures["serving_default"](**feed)["probability"].numpy()
    np.testing.assert_allclose(out["probabilities"][0], ranked, atol=1e-6)


def test_exclude_seen_leaves_out_the_given_items(exports):
    first = _recall(exports["scann"])
    seen = np.array([[first["item_ids"][u][0], first["item_ids"][u][3], b""]
                     for u in range(3)], dtype=object)
    out = _recall(exports["scann"], "exclude_seen", exclude_item_ids=seen)
    for u in range(3):
        assert not set(seen[u]) & set(out["item_ids"][u])
        kept = [i for i in first["item_ids"][u] if i not in set(seen[u])]
        assert list(out["item_ids"][u][:len(kept)]) == kept
    assert out["item_ids"].shape == (3, 20)


def test_metadata_lists_custom_ops(exports):
    def meta(which):
        with open(os.path.join(exports[which], "assets.extra", "fm_keras.json")) as f:
            return json.load(f)

    assert meta("scann")["custom_ops"] == ["Scann>ScannSearchBatched", "Scann>TensorsToScann"]
    assert meta("brute_force")["custom_ops"] == []
    assert meta("scann")["items"] == 5000 and meta("scann")["k"] == 20


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
    _, ranking, meta = load_export(exports["ranking"])
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


@pytest.mark.parametrize("backend", ["scann", "brute_force"])
def test_warmup_requests_replay_on_the_export(exports, backend):
    """Each warmup record is a valid PredictRequest for its signature (TF Serving replays them
    at load and refuses the version otherwise)."""
    from tensorflow_serving.apis import prediction_log_pb2

    _, loaded, _ = load_export(exports[backend])
    path = os.path.join(exports[backend], "assets.extra", "tf_serving_warmup_requests")
    records = [prediction_log_pb2.PredictionLog.FromString(r.numpy())
               for r in tf.data.TFRecordDataset(path)]
    assert sorted(r.predict_log.request.model_spec.signature_name for r in records) == \
        ["exclude_seen", "serving_default"]
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
