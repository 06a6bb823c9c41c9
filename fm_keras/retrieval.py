"""``task: retrieval``: the FM trained as two towers with ``tfrs.tasks.Retrieval``.

The query tower is [1, S_Q] over the user + context features and the candidate tower
[L_I + P_I, S_I] over the item features (`fm_keras.towers`): the decomposition of DESIGN.md,
so the trained model is an ordinary FM whose ``logit`` is ``user_vector . item_vector +
user_offset`` and exports, indexes and serves like a CTR model. The loss is the softmax over
the batch's items (Yi et al., "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item
Recommendations", RecSys 2019):

- logQ correction: each candidate's score is reduced by log q(item), q the probability that
  the item is a candidate in a batch (its frequency in the training log, plus the chance of
  being drawn as an extra negative);
- mixed negative sampling (Yang et al., "Mixed Negative Sampling for Learning Two-tower
  Neural Networks in Recommendations", WWW 2020): ``catalog_negatives`` items drawn uniformly
  from the catalog per batch join the in-batch candidates, so rarely picked items are seen as
  negatives too;
- accidental hits (a candidate equal to the row's own item) are removed.

The per-user offset w0 + L_Q + P_Q is constant over items, so the softmax does not see it and
it stays at its initial value: a retrieval model's ``logit`` ranks the items of one user (up to
that user's constant it is the log-odds of the softmax), and ``probability`` = sigmoid(logit)
is not a click probability. Early stopping watches the validation Recall@K over the whole
catalog (exact search).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

import numpy as np
import tensorflow_recommenders as tfrs

from fm_keras import fsutil, out_of_core
from fm_keras._tf import keras, tf
from fm_keras.batches import batched_dataset, holdout_if_needed
from fm_keras.checkpoints import trained_rows
from fm_keras.config import ExperimentConfig, RetrievalConfig
from fm_keras.convergence import task_monitor
from fm_keras.data import Split, expand_paths
from fm_keras.errors import ConfigError
from fm_keras.features import FittedFeature, fit_features
from fm_keras.fit_progress import fit_progress, fit_verbosity
from fm_keras.interactions import (ITEM_INDEX, WEIGHT, Catalog, item_counts, load_catalog,
                                   load_interactions, query_keys)
from fm_keras.model import FMModel, build_model, make_optimizer
from fm_keras.reading import read_header
from fm_keras.recall_metrics import exact_top_k, group_by_query, popularity_top_k, ranking_metrics
from fm_keras.towers import item_vector, side_slot_order, user_outputs
from fm_keras.progress import log
from fm_keras.runs import TrainingState, check_run_dir, library_versions, load_run

MONITOR = task_monitor("retrieval")[0]  # validation Recall@K, in the epoch logs


class RetrievalModel(FMModel):
    """An `FMModel` whose loss is ``tfrs.tasks.Retrieval`` over its two towers.

    Args:
        encoder, fm: as for `FMModel`.
        retrieval: the objective's settings (temperature, logQ, extra negatives, ...).
        **kwargs: passed to `FMModel`.

    Call `use_catalog` before training: the candidates are catalog items, gathered in-graph.
    A training batch is ``({"ids", "values"}, item_index, weights)``: the query-side slots
    [batch, query slots], the catalog index of the picked item [batch] and row weights [batch].
    """

    def __init__(self, encoder, fm, retrieval: RetrievalConfig = RetrievalConfig(), **kwargs):
        super().__init__(encoder, fm, task="retrieval", **kwargs)
        self.retrieval = retrieval
        self.task = tfrs.tasks.Retrieval(
            loss=keras.losses.CategoricalCrossentropy(
                from_logits=True, reduction=keras.losses.Reduction.NONE),
            temperature=None if retrieval.temperature == 1.0 else retrieval.temperature,
            remove_accidental_hits=retrieval.remove_accidental_hits)
        self._slot_order = side_slot_order(encoder.slot_query_side)
        self._catalog = None

    @property
    def trainable_weights(self):
        # The global bias adds one constant to every candidate's score: the softmax cancels it,
        # so it has no gradient (and the optimizer would warn about it every epoch).
        return [w for w in super().trainable_weights if w is not self.fm.bias]

    def use_catalog(self, ids: np.ndarray, values: np.ndarray, log_q: np.ndarray) -> None:
        """The candidates: encoded item slots [items, item slots] and log q(item) [items]."""
        self._catalog = (tf.constant(ids, tf.int32), tf.constant(values, tf.float32),
                         tf.constant(log_q, tf.float32))

    def compute_loss(self, inputs, training: bool = False):
        if self._catalog is None:
            raise ValueError("RetrievalModel.use_catalog must be called before training")
        encoded, items, weights = inputs
        cat_ids, cat_values, log_q = self._catalog
        items = tf.cast(items, tf.int32)
        extra = self.retrieval.catalog_negatives
        candidates = items
        if extra:
            sampled = tf.random.uniform([extra], 0, tf.shape(cat_ids)[0], tf.int32)
            candidates = tf.concat([items, sampled], 0)
        c_ids, c_values = tf.gather(cat_ids, candidates), tf.gather(cat_values, candidates)
        users = user_outputs(self.fm, encoded["ids"], encoded["values"])["user_vector"]
        cands = item_vector(self.fm, c_ids, c_values)
        # The FM's own call adds the L2 of the rows the positives touch, as in binary training.
        batch = tf.shape(items)[0]
        full = [tf.gather(tf.concat([q, c[:batch]], 1), self._slot_order, axis=1)
                for q, c in ((encoded["ids"], c_ids), (encoded["values"], c_values))]
        self.fm((full[0], full[1]))
        per_row = self.task(
            users, cands, sample_weight=weights,
            candidate_sampling_probability=(tf.exp(tf.gather(log_q, candidates))
                                            if self.retrieval.logq_correction else None),
            candidate_ids=candidates, compute_metrics=False, compute_batch_metrics=False)
        return tf.nn.compute_average_loss(per_row)


def candidate_log_q(counts: np.ndarray, batch_size: int, catalog_negatives: int) -> np.ndarray:
    """log q(item), float32 [items]: the probability that an item is a candidate of a batch,
    per batch row (its share of the log's rows, plus its chance to be one of the uniform
    extra negatives, spread over the batch)."""
    q = counts / max(counts.sum(), 1.0) + catalog_negatives / (batch_size * len(counts))
    return np.log(np.maximum(q, 1e-12)).astype(np.float32)


class RecallTask:
    """Recall@K of a model over the catalog, on one split's queries (exact search).

    A query is identified by its user-tower values (`FeatureEncoder.query_key_names`: a
    context feature such as the hour does not make a new query); its context values are those
    of its first row in `split`.

    Args:
        model: the model (its encoder names the query and item features).
        catalog: the catalog; item vectors are computed from it on each call.
        split: interactions (`load_interactions`): the queries and their relevant items.
        seen: optional interactions (e.g. the training log) whose items each query must not
            be recommended.
    """

    def __init__(self, model: FMModel, catalog: Catalog, split: Split, seen: Split | None = None):
        enc = model.encoder
        self.query_names = enc.side_names(query_side=True)
        self.item_names = enc.side_names(query_side=False)
        self.catalog_slots = enc.encode_numpy(catalog.columns, names=self.item_names)
        self.num_items = len(catalog)
        keys = query_keys([split] if seen is None else [split, seen], enc.query_key_names())
        queries, self.relevant = group_by_query(keys[0], split.passthrough[ITEM_INDEX])
        first = np.searchsorted(np.sort(keys[0]), queries)
        rows = np.argsort(keys[0], kind="stable")[first]
        self.query_slots = enc.encode_numpy({n: split.features[n][rows] for n in self.query_names},
                                            names=self.query_names)
        self.exclude = None
        if seen is not None:
            seen_queries, seen_items = group_by_query(keys[1], seen.passthrough[ITEM_INDEX])
            lookup = dict(zip(seen_queries.tolist(), seen_items))
            empty = np.zeros(0, np.int64)
            self.exclude = [lookup.get(q, empty) for q in queries.tolist()]

    def top_k(self, model: FMModel, k: int) -> np.ndarray:
        """The model's top-k catalog indices per query, int64 [queries, min(k, items)]."""
        users = _user_vectors(model, *self.query_slots)
        items = _item_vectors(model, *self.catalog_slots)
        return exact_top_k(users, items, k, self.exclude)

    def metrics(self, model: FMModel, ks, popularity: np.ndarray | None = None) -> dict:
        """`ranking_metrics` of the model, and of the popularity baseline when `popularity`
        (item counts, float [items]) is given, under ``"popularity"``."""
        kmax = min(max(ks), self.num_items)
        out = ranking_metrics(self.top_k(model, kmax), self.relevant, ks, self.num_items)
        if popularity is not None:
            top = popularity_top_k(popularity, len(self.relevant), kmax, self.exclude)
            out["popularity"] = ranking_metrics(top, self.relevant, ks, self.num_items)
        return out


def _user_vectors(model, ids, values, batch_size: int = 65_536) -> np.ndarray:
    return np.concatenate([_user_graph(model.fm, ids[s:s + batch_size], values[s:s + batch_size])
                           .numpy() for s in range(0, len(ids), batch_size)])


def _item_vectors(model, ids, values, batch_size: int = 65_536) -> np.ndarray:
    return np.concatenate([_item_graph(model.fm, ids[s:s + batch_size], values[s:s + batch_size])
                           .numpy() for s in range(0, len(ids), batch_size)])


@tf.function(reduce_retracing=True)
def _user_graph(fm, ids, values):
    return user_outputs(fm, ids, values)["user_vector"]


@tf.function(reduce_retracing=True)
def _item_graph(fm, ids, values):
    return item_vector(fm, ids, values)


class RecallAtK(keras.callbacks.Callback):
    """Puts the validation Recall@K into the epoch logs as ``val_recall_at_k`` (before
    `TrainingState`, which early-stops on it)."""

    def __init__(self, task: RecallTask, k: int):
        super().__init__()
        self.task, self.k = task, k

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            metrics = ranking_metrics(self.task.top_k(self.model, self.k), self.task.relevant,
                                      [self.k], self.task.num_items)
            logs[MONITOR] = metrics[f"recall@{self.k}"]


def catalog_path(config: ExperimentConfig) -> str:
    """The one catalog file of ``data.items``."""
    files = expand_paths(config.data.items)
    if len(files) != 1:
        raise ConfigError(f"{config.source}: data: items: one catalog file is needed, "
                          f"{len(files)} match {list(config.data.items)}")
    return files[0]


def train_retrieval(config: ExperimentConfig, run_dir: str, *, resume: bool = False,
                    verbose: int | None = None) -> dict:
    """Trains ``task: retrieval`` into `run_dir` (the layout of `fm_keras.training.train`).

    Returns:
        The run record (``run.json``): valid (and test) Recall@K, NDCG@K, HitRate@K and
        coverage for K in (10, recall_at, 100), with the popularity baseline beside them.

    Raises:
        ConfigError, DataError: before anything is written to `run_dir`.
    """
    started = time.time()
    check_run_dir(run_dir, resume, config)
    # In memory only: `out_of_core: true` is refused here, `auto` says so in the log.
    _, in_memory = out_of_core.choose(config)
    log(f"in-memory training: {in_memory}")
    t = config.training
    r = t.retrieval
    catalog = load_catalog(catalog_path(config), config.features, config.data.item_id)
    train_split = load_interactions(config.data.train, config, catalog)
    valid_split = load_interactions(config.data.valid, config, catalog) if config.data.valid \
        else None
    log(f"train: {len(train_split):,} interactions over a catalog of {len(catalog):,} items")
    train_split, valid_split = holdout_if_needed(train_split, valid_split, t.seed)
    features_path = os.path.join(run_dir, "features.json")
    if resume and os.path.exists(features_path):
        features = tuple(FittedFeature.from_dict(d) for d in fsutil.read_json(features_path))
    else:
        features = fit_features(config.features, train_split)

    keras.utils.set_random_seed(t.seed)
    base = build_model(features, config.model, t)
    model = RetrievalModel(base.encoder, base.fm, r)
    counts = item_counts(train_split, len(catalog))
    catalog_ids, catalog_values = model.encoder.encode_numpy(
        catalog.columns, names=model.encoder.side_names(False))
    model.use_catalog(catalog_ids, catalog_values,
                      candidate_log_q(counts, t.batch_size, r.catalog_negatives))
    query_names = model.encoder.side_names(True)
    ids, values = model.encoder.encode_numpy(train_split.features, names=query_names)
    weights = train_split.passthrough.get(WEIGHT, np.ones(len(ids), np.float32))
    train_ds = batched_dataset(ids, values, train_split.passthrough[ITEM_INDEX], weights,
                               t.batch_size, shuffle_seed=t.seed)
    tasks = _recall_tasks(config, model, catalog, train_split, valid_split)
    recall_at = clamp_ks([r.recall_at], len(catalog), "training: retrieval: recall_at")[0]

    os.makedirs(run_dir, exist_ok=True)
    fsutil.write_json(os.path.join(run_dir, "experiment.json"), config.to_dict())
    fsutil.write_json(features_path, [f.to_dict() for f in features])
    model.compile(optimizer=make_optimizer(t), steps_per_execution=t.steps_per_execution)
    # An epoch trains the query rows and the catalog's items (positives and sampled ones).
    state = TrainingState(run_dir, model, config, resume=resume,
                          trained_rows=trained_rows(model.fm.num_ids, ids, catalog_ids))
    t0 = time.time()
    if state.initial_epoch < t.epochs and not state.early_stopped:
        verbose = fit_verbosity(verbose)
        with contextlib.redirect_stdout(sys.stderr):  # Keras prints progress to stdout
            model.fit(train_ds, epochs=t.epochs, initial_epoch=state.initial_epoch,
                      callbacks=[RecallAtK(tasks["valid"], recall_at), state,
                                 *fit_progress(verbose, t.batch_size)],
                      verbose=verbose)
    convergence = state.finish()
    fit_seconds = time.time() - t0
    ks = sorted({min(k, len(catalog)) for k in (10, recall_at, 100)})
    metrics = {role: task.metrics(model, ks, counts) for role, task in tasks.items()}
    with fsutil.atomic_dir(os.path.join(run_dir, "model")) as tmp:
        tf.train.Checkpoint(fm=model.fm).write(os.path.join(tmp, "weights"))
    record = {
        "status": "complete", "task": "retrieval", "logit_correction": 0.0,
        "epochs_run": len(state.history), "best_epoch": state.best_epoch,
        **convergence,
        "history": state.history, "metrics": metrics,
        "rows": {"train": len(train_split), "valid": len(valid_split),
                 "train_read": train_split.rows_read, "dropped": train_split.dropped},
        "catalog": {"path": catalog.path, "items": len(catalog),
                    "items_in_train": int((counts > 0).sum())},
        "seconds": {"total": round(time.time() - started, 2), "fit": round(fit_seconds, 2)},
        "train_samples_per_second": round(
            len(train_split) * max(1, len(state.history)) / max(fit_seconds, 1e-9)),
        "out_of_core": {"enabled": False, "reason": in_memory, "shards": None},
        "versions": library_versions(), "warm_start": None,
    }
    fsutil.write_json(os.path.join(run_dir, "run.json"), record)
    log(f"run complete: {run_dir} (valid recall@{recall_at} "
        f"{metrics['valid'][f'recall@{recall_at}']:.4f}, popularity "
        f"{metrics['valid']['popularity'][f'recall@{recall_at}']:.4f})")
    return record


def _recall_tasks(config, model, catalog, train_split, valid_split) -> dict:
    splits = {"valid": valid_split}
    if config.data.test:
        splits["test"] = load_interactions(config.data.test, config, catalog)
    seen = train_split if config.training.retrieval.exclude_seen else None
    return {role: RecallTask(model, catalog, split, seen) for role, split in splits.items()}


def clamp_ks(ks, items: int, where: str) -> list[int]:
    """Cut-offs above the catalog size become the catalog size, with a warning."""
    big = [k for k in ks if k > items]
    if big:
        log(f"warning: {where} {big} is more than the catalog's {items:,} items; "
            f"evaluated at {items:,}")
    return sorted({min(int(k), items) for k in ks})


def evaluate_recall(run_dir: str, data, items: str | None = None,
                    ks=(10, 50, 100), exclude=None) -> dict:
    """Recall@K, NDCG@K, HitRate@K and coverage of a finished run over a catalog.

    Any run with both towers can be evaluated (binary, regression or retrieval): every
    (query, item) pair of `data` with label > 0 (or every row, for a run without a
    configured label or a log without the label column) is a relevant item of that query; the whole catalog is searched
    exactly. The popularity baseline (items ranked by their positives in the run's training
    log) is computed on the same queries, with the same exclusions.

    Args:
        run_dir: a finished run.
        data: interaction log files or globs.
        items: the catalog file (default: the run's ``data.items``).
        ks: cut-offs; those above the catalog size are clamped, with a warning.
        exclude: optional log files: each query's items there are not recommended (e.g. the
            training log, so that only new items count).

    Returns:
        ``{"recall@K", "ndcg@K", "hit_rate@K", "coverage@K", "queries", "popularity":
        {...}, "catalog": {...}, "rows_read", "dropped"}``.
    """
    run = load_run(run_dir)
    config = run.config
    if items is None and not config.data.items:
        raise ConfigError(f"{run_dir}: the run has no catalog (data: items); pass --items")
    catalog = load_catalog(items or catalog_path(config), config.features, config.data.item_id)
    ks = clamp_ks(ks, len(catalog), "--recall_at")
    data = [data] if isinstance(data, str) else list(data)
    label = config.data.label
    files = expand_paths(data)
    split = load_interactions(files, config, catalog, use_label=bool(label) and any(
        label in read_header(path) for path in files))
    seen = None
    if exclude:
        seen = load_interactions([exclude] if isinstance(exclude, str) else exclude,
                                 config, catalog, filters=(), require_positives=False,
                                 use_label=False)
    task = RecallTask(run.model, catalog, split, seen)
    counts = item_counts(load_interactions(config.data.train, config, catalog), len(catalog))
    result = task.metrics(run.model, ks, counts)
    result.update(catalog={"path": catalog.path, "items": len(catalog)},
                  rows_read=split.rows_read, dropped=split.dropped)
    return result
