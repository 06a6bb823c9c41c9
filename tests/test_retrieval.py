"""task: retrieval: the two-tower loss against NumPy, training, export parity, recall, bad input."""

import json
import os

import numpy as np
import pytest

from retrieval_testlib import implicit_experiment, write_implicit
from trained_rows_testlib import changed_rows, record_trained_rows, with_new_catalog_items
from fm_keras._tf import tf
from fm_keras.cli import main
from fm_keras.config import RetrievalConfig, experiment_from_dict
from fm_keras.features import fit_features
from fm_keras.interactions import load_catalog, load_interactions
from fm_keras.model import build_model
from fm_keras.retrieval import RecallTask, RetrievalModel, candidate_log_q, clamp_ks


def _softmax_loss_reference(u, c, log_q, items, temperature):
    """Per-row CE of the in-batch softmax: scores u.c / T - log q, accidental hits masked."""
    scores = u @ c.T / temperature - log_q[None, :]
    b = len(u)
    for i in range(b):
        for j in range(c.shape[0]):
            if j != i and items[j] == items[i]:
                scores[i, j] = -np.inf
    scores -= scores.max(1, keepdims=True)
    log_p = scores - np.log(np.exp(scores).sum(1, keepdims=True))
    return -log_p[np.arange(b), np.arange(b)]


@pytest.mark.parametrize("logq,temperature,weighted", [(True, 1.0, False), (False, 0.5, False),
                                                      (True, 0.2, True)])
def test_loss_matches_numpy_softmax_with_logq_and_accidental_hits(implicit_data, logq,
                                                                   temperature, weighted):
    config = experiment_from_dict(implicit_experiment(implicit_data), base_dir=implicit_data)
    catalog = load_catalog(os.path.join(implicit_data, "items.csv"), config.features, "item_id")
    train = load_interactions(config.data.train, config, catalog)
    base = build_model(fit_features(config.features, train), config.model, config.training)
    rng = np.random.default_rng(0)
    base.fm.assign_parameters(linear=rng.normal(0, 0.3, base.fm.linear.shape),
                              embeddings=rng.normal(0, 0.3, base.fm.embeddings.shape))
    r = RetrievalConfig(temperature=temperature, logq_correction=logq)
    model = RetrievalModel(base.encoder, base.fm, r)
    item_names = model.encoder.side_names(False)
    cat_ids, cat_values = model.encoder.encode_numpy(catalog.columns, names=item_names)
    log_q = np.log(rng.uniform(0.001, 0.1, len(catalog))).astype(np.float32)
    model.use_catalog(cat_ids, cat_values, log_q)
    items = np.array([3, 7, 3, 11, 20, 7])  # two accidental hits
    q_ids, q_values = model.encoder.encode_numpy(
        {n: train.features[n][:6] for n in model.encoder.side_names(True)},
        names=model.encoder.side_names(True))
    weights = (np.array([0.5, 2.0, 1.0, 0.0, 3.0, 1.0], np.float32) if weighted
               else np.ones(6, np.float32))  # data: weight (e.g. recency)
    loss = model.compute_loss(({"ids": q_ids, "values": q_values}, items, weights)).numpy()
    u = model.user_tower({n: tf.constant(train.features[n][:6])
                          for n in model.encoder.side_names(True)})["user_vector"].numpy()
    c = model.item_tower({n: tf.constant(catalog.columns[n][items]) for n in item_names}).numpy()
    expected = _softmax_loss_reference(u.astype(np.float64), c.astype(np.float64),
                                       log_q[items] if logq else np.zeros(6), items, temperature)
    assert loss == pytest.approx((weights * expected).mean(), rel=1e-4)


def test_a_context_feature_does_not_split_a_users_queries_or_lose_exclusions(implicit_data,
                                                                            tmp_path):
    import pandas as pd

    for name in ("items", "train", "valid"):  # a different hour on every log row
        frame = pd.read_csv(os.path.join(implicit_data, f"{name}.csv"))
        if name != "items":
            frame["hour"] = np.arange(len(frame)) % 24
        frame.to_csv(tmp_path / f"{name}.csv", index=False)
    raw = implicit_experiment(tmp_path)
    raw["data"].pop("test")
    raw["features"] = raw["features"] + [{"name": "hour", "kind": "categorical",
                                          "tower": "context"}]
    config = experiment_from_dict(raw, base_dir=str(tmp_path))
    catalog = load_catalog(str(tmp_path / "items.csv"), config.features, "item_id")
    train, valid = (load_interactions(path, config, catalog)
                    for path in (config.data.train, config.data.valid))
    model = build_model(fit_features(config.features, train), config.model, config.training)
    assert model.encoder.query_key_names() == ["user_id", "segment"]
    task = RecallTask(model, catalog, valid, seen=train)
    users = sorted(set(valid.features["user_id"]))
    assert len(task.relevant) == len(users)  # one query per user, not one per row
    seen = {u: set(train.features["item_id"][train.features["user_id"] == u]) for u in users}
    assert sum(len(e) for e in task.exclude) == sum(len(seen[u]) for u in users)


def test_the_global_bias_is_not_trained_the_softmax_cancels_it(implicit_data):
    config = experiment_from_dict(implicit_experiment(implicit_data), base_dir=implicit_data)
    catalog = load_catalog(os.path.join(implicit_data, "items.csv"), config.features, "item_id")
    train = load_interactions(config.data.train, config, catalog)
    base = build_model(fit_features(config.features, train), config.model, config.training)
    model = RetrievalModel(base.encoder, base.fm)
    names = {w.name for w in model.trainable_weights}
    assert base.fm.bias.name not in names
    assert names == {w.name for w in base.fm.trainable_weights} - {base.fm.bias.name}


def test_candidate_log_q_is_frequency_plus_uniform_share():
    counts = np.array([6.0, 3.0, 1.0, 0.0])
    assert np.exp(candidate_log_q(counts, 10, 0)) == pytest.approx([0.6, 0.3, 0.1, 1e-12])
    assert np.exp(candidate_log_q(counts, 10, 20)) == pytest.approx(
        [0.6 + 0.5, 0.3 + 0.5, 0.1 + 0.5, 0.5])


def test_trained_model_beats_popularity_and_reports_metrics(retrieval_run):
    _, record = retrieval_run
    assert record["task"] == "retrieval" and record["logit_correction"] == 0.0
    valid = record["metrics"]["valid"]
    assert set(valid) >= {"recall@10", "ndcg@10", "hit_rate@10", "coverage@10", "popularity"}
    # Users pick their segment's genre: a fitted model finds it, popularity cannot.
    assert record["metrics"]["test"]["recall@10"] > 1.5 * \
        record["metrics"]["test"]["popularity"]["recall@10"]
    assert "val_recall_at_k" in record["history"][0]


def test_export_parity_and_python_towers_equal_signatures(retrieval_run, implicit_data,
                                                          tmp_path):
    from fm_keras.export import export_run
    from fm_keras.runs import load_run

    run_dir, _ = retrieval_run
    version = export_run(run_dir, "rec", base=str(tmp_path), parity_rows=500)
    meta = json.load(open(os.path.join(version, "assets.extra", "fm_keras.json")))
    assert meta["parity"]["max_abs_diff"] < 1e-4
    loaded = tf.saved_model.load(version)
    model = load_run(run_dir).model
    users = {"user_id": tf.constant(["u1", "u2", "nobody"]), "segment": tf.constant(["s1", "", "s3"])}
    items = {"item_id": tf.constant(["i0", "i5", "new"]), "genre": tf.constant(["g0", "g0", "x"])}
    got_u, want_u = model.user_tower(users), loaded.signatures["user_tower"](**users)
    for key in ("user_vector", "user_offset"):
        np.testing.assert_allclose(got_u[key].numpy(), want_u[key].numpy(), atol=1e-5)
    np.testing.assert_allclose(model.item_tower(items).numpy(),
                               loaded.signatures["item_tower"](**items)["item_vector"].numpy(),
                               atol=1e-5)


def test_evaluate_cli_prints_recall_and_popularity(retrieval_run, implicit_data, capsys):
    run_dir, _ = retrieval_run
    argv = ["evaluate", "--run", run_dir, "--data", os.path.join(implicit_data, "test.csv"),
            "--items", os.path.join(implicit_data, "items.csv"), "--recall_at", "5,10,500",
            "--exclude", os.path.join(implicit_data, "train.csv")]
    assert main(argv) == 0
    out = capsys.readouterr()
    result = json.loads(out.out)
    assert "--recall_at [500] is more than the catalog's 60 items; evaluated at 60" in out.err
    assert result["recall@60"] == 1.0  # the whole catalog, minus nothing relevant
    for k in (5, 10):
        assert 0 <= result[f"recall@{k}"] <= 1 and f"ndcg@{k}" in result["popularity"]


def test_clamp_ks():
    assert clamp_ks([10, 50, 100], 60, "K") == [10, 50, 60]


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing left in --out.

def _train_cli(tmp_path, data_dir, raw, capsys):
    import yaml

    config = os.path.join(data_dir, "bad.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(raw, f)
    out = str(tmp_path / "run")
    code = main(["train", "--config", config, "--out", out, "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    return code, [line for line in err if line.startswith("fm-keras: error")], out


@pytest.mark.parametrize("change,message", [
    (lambda r: r.update(features=[f for f in r["features"] if f["tower"] != "item"]),
     "features: retrieval training needs at least one item \\(tower: item\\) feature"),
    (lambda r: r.update(features=[f for f in r["features"] if f["tower"] == "item"]),
     "features: retrieval training needs at least one query-side"),
    (lambda r: r["data"].pop("items"), "data: items: task: retrieval needs the item catalog"),
    # A new user's trial: the retrieval path never asked, and trained in memory silently.
    (lambda r: r["data"].update(out_of_core="true"),
     "data: out_of_core: task retrieval trains in memory only"),
])
def test_bad_config_one_line_error(implicit_data, tmp_path, capsys, change, message):
    raw = implicit_experiment(implicit_data)
    change(raw)
    code, errors, out = _train_cli(tmp_path, implicit_data, raw, capsys)
    assert code == 2 and len(errors) == 1
    assert errors[0].startswith("fm-keras: error: ") and __import__("re").search(message, errors[0])
    assert not os.path.exists(out)


def test_log_without_positives_is_an_error(tmp_path, capsys):
    data = write_implicit(str(tmp_path / "d"), users=10, items=10, per_user=3)
    import pandas as pd

    for name in ("train", "valid", "test"):
        path = os.path.join(data, f"{name}.csv")
        pd.read_csv(path).assign(click=0).to_csv(path, index=False)
    code, errors, out = _train_cli(tmp_path, data, implicit_experiment(data), capsys)
    assert code == 2 and "train.csv: no positive interactions" in errors[0]
    assert not os.path.exists(out)


def test_evaluate_log_without_the_label_column_counts_every_row(retrieval_run, implicit_data,
                                                                 tmp_path, capsys):
    import pandas as pd

    run_dir, _ = retrieval_run
    labelled = os.path.join(implicit_data, "test.csv")
    unlabelled = str(tmp_path / "picks.csv")
    pd.read_csv(labelled, dtype=str).drop(columns=["click"]).to_csv(unlabelled, index=False)
    results = []
    for data in (labelled, unlabelled):
        assert main(["evaluate", "--run", run_dir, "--data", data, "--recall_at", "5"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[1]["recall@5"] == results[0]["recall@5"]  # every test row has click = 1
    assert results[1]["queries"] == results[0]["queries"] > 0


def test_train_cli_stdout_is_one_json_document_and_records_convergence(implicit_data, tmp_path, capsys):
    import yaml

    config = os.path.join(implicit_data, "one_epoch.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(implicit_experiment(implicit_data, epochs=1), f)
    out = str(tmp_path / "run")
    assert main(["train", "--config", config, "--out", out]) == 0  # Keras progress on
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["run"] == out
    assert "val_recall_at_k" in captured.err  # the epoch line went to stderr
    # Its only epoch was a gain: the epoch cap, not early stopping, ended it.
    with open(os.path.join(out, "run.json")) as f:
        record = json.load(f)
    assert result["converged"] is False and record["converged"] is False
    assert "raise training.epochs" in record["warnings"][0] and "raise training.epochs" in \
        captured.err
    # The input path's choice is logged and recorded, as a binary run's is.
    assert record["out_of_core"]["enabled"] is False
    assert f"in-memory training: {record['out_of_core']['reason']}" in captured.err


def test_trained_rows_cover_the_catalog_items_an_epoch_trains(tmp_path, monkeypatch):
    """The catalog's items that no interaction holds are trained too (sampled candidates):
    the rows of the best-weights copy cover every row an epoch changes."""
    import pandas as pd

    from fm_keras import retrieval
    from fm_keras.training import train

    data = write_implicit(str(tmp_path / "data"))
    with_new_catalog_items(data)
    seen = record_trained_rows(monkeypatch, retrieval)
    train(experiment_from_dict(implicit_experiment(data, epochs=1), base_dir=data),
          str(tmp_path / "run"), verbose=0)
    trained = seen["trained"]
    changed = changed_rows(*seen["epochs"], len(trained))
    assert seen["state"].best_weights.rows is not None
    assert changed.any() and not np.any(changed & ~trained)
    query_and_items = np.zeros(len(trained), bool)  # the ids of the interactions alone
    encoder, log = seen["state"].model.encoder, pd.read_csv(os.path.join(data, "train.csv"))
    for side in (True, False):
        names = encoder.side_names(side)
        ids, _ = encoder.encode_numpy({n: log[n].to_numpy() for n in names}, names=names)
        query_and_items[ids.ravel()] = True
    assert np.any(changed & ~query_and_items)  # rows of catalog items no interaction holds
