"""Training on a TensorFlow cluster: ``tf.distribute`` strategies chosen in the experiment.

``training.distribute.strategy`` picks one; the cluster comes from ``TF_CONFIG`` on every task
(the variable Kubernetes operators and Vertex AI set), exactly as TensorFlow reads it:

- ``multi_worker_mirrored``: every task is a worker and runs ``fm-keras train``; worker 0 (or
  the ``chief``) writes the run directory, the others write to a temp directory they delete.
  Each worker reads its own share of the shard files and takes batch_size / n rows a step.
- ``parameter_server``: ``chief`` is the coordinator and runs ``fm-keras train``; ``worker``
  and ``ps`` tasks run TensorFlow's own server (``fm-keras cluster-server``, or ``fm-keras
  train`` which starts it for them). The linear and factor tables are split over the
  parameter servers by a variable partitioner, so a table can exceed one machine's memory.

Training data are the encoded shard directory of ``fm-keras convert`` (`fm_keras.convert`: the
same directory one machine trains from out of core; the features are fitted once, so every task
encodes alike), named by its manifest in ``data.train``. Checkpoints, early stopping on
validation AUC, ``run.json`` and the ``model/`` weights are the same as on one machine:
``fm-keras export`` does not know how a run was trained (sharded variables are saved as whole
tensors).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

from fm_keras import fsutil
from fm_keras._tf import keras, tf
from fm_keras.config import DistributeConfig, ExperimentConfig
from fm_keras.convert import HINT as CONVERT_HINT
from fm_keras.convert import converted_shards
from fm_keras.data import load_data_split
from fm_keras.errors import ConfigError, DataError
from fm_keras.evaluation import metrics_for
from fm_keras.model import build_model, make_optimizer
from fm_keras.out_of_core import Shards, shard_dataset
from fm_keras.prior import attach_prior
from fm_keras.prior_search import Slots
from fm_keras.tfrecord import is_tfrecord
from fm_keras.progress import log
from fm_keras.runs import (TrainingState, calibrate, check_run_dir, library_versions, predict_split,
                           watch_defined_metric)

_JOBS = {"multi_worker_mirrored": ("chief", "worker"),
         "parameter_server": ("chief", "worker", "ps")}


@dataclass(frozen=True)
class ClusterTask:
    """This process's place in the cluster, from ``TF_CONFIG``."""

    cluster: dict[str, list[str]]
    type: str
    index: int

    @property
    def is_chief(self) -> bool:
        """The task that writes: ``chief``, else worker 0 of a cluster without one."""
        return self.type == "chief" or (
            self.type == "worker" and self.index == 0 and "chief" not in self.cluster)

    @property
    def num_workers(self) -> int:
        return len(self.cluster.get("worker", []))


def cluster_task(strategy: str, environ=os.environ, where: str = "") -> ClusterTask:
    """Reads and checks ``TF_CONFIG`` for `strategy`; errors say what to set (``where``, the
    experiment file that asked for the strategy, leads the one for a missing ``TF_CONFIG``)."""
    example = ('{"cluster": {"worker": ["host0:2222", "host1:2222"]}, '
               '"task": {"type": "worker", "index": 0}}')
    raw = environ.get("TF_CONFIG", "")
    if not raw.strip():
        raise ConfigError(f"{where + ': ' if where else ''}training: distribute: strategy "
                          f"{strategy} needs the cluster in the "
                          f"TF_CONFIG environment variable of every task, e.g. {example} "
                          "(docs/distributed.md), or strategy: none for one machine")
    try:
        spec = json.loads(raw)
        cluster, task = spec["cluster"], spec["task"]
        kind, index = task["type"], int(task["index"])
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"TF_CONFIG is malformed ({type(err).__name__}: {err}); it must be "
                          f"JSON like {example}") from None
    allowed = _JOBS[strategy]
    unknown = sorted(set(cluster) - set(allowed))
    if unknown:
        raise ConfigError(f"TF_CONFIG: strategy {strategy} runs jobs {list(allowed)}, the "
                          f"cluster also has {unknown}")
    if not cluster.get("worker"):
        raise ConfigError("TF_CONFIG: the cluster needs at least one 'worker' address")
    if strategy == "parameter_server" and not (cluster.get("ps") and cluster.get("chief")):
        raise ConfigError("TF_CONFIG: strategy parameter_server needs 'chief' (the coordinator "
                          "running fm-keras train), 'worker' and 'ps' jobs in the cluster")
    if kind not in cluster or not 0 <= index < len(cluster[kind]):
        raise ConfigError(f"TF_CONFIG: task {kind}:{index} is not in the cluster "
                          f"{ {k: len(v) for k, v in cluster.items()} }")
    return ClusterTask({k: list(v) for k, v in cluster.items()}, kind, index)


def partitioner(distribute: DistributeConfig, num_ps: int):
    """The variable partitioner that shards the FM tables over `num_ps` parameter servers."""
    partitioners = tf.distribute.experimental.partitioners
    if distribute.max_shard_bytes is not None:
        return partitioners.MaxSizePartitioner(distribute.max_shard_bytes,
                                               max_shards=distribute.max_shards)
    return partitioners.MinSizePartitioner(distribute.min_shard_bytes,
                                           max_shards=distribute.max_shards or num_ps)


def make_strategy(distribute: DistributeConfig, task: ClusterTask):
    """The configured `tf.distribute` strategy (create it before any other TF work)."""
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if distribute.strategy == "multi_worker_mirrored":
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    return tf.distribute.experimental.ParameterServerStrategy(
        resolver, variable_partitioner=partitioner(distribute, len(task.cluster["ps"])))


def run_server(environ=os.environ) -> None:
    """Runs TensorFlow's server for this ``worker`` or ``ps`` task of ``TF_CONFIG``; blocks."""
    if not environ.get("TF_CONFIG", "").strip():
        # `fm-keras cluster-server` takes no experiment file: no `strategy: none` advice here.
        raise ConfigError(
            "TF_CONFIG: fm-keras cluster-server runs a worker or ps task of a parameter_server "
            "cluster; set TF_CONFIG to the cluster and this task, e.g. "
            '{"cluster": {"chief": ["chief0:2222"], "worker": ["worker0:2222"], '
            '"ps": ["ps0:2222"]}, "task": {"type": "ps", "index": 0}} (docs/distributed.md)')
    task = cluster_task("parameter_server", environ)
    if task.type == "chief":
        raise ConfigError("TF_CONFIG: this task is the chief; run 'fm-keras train' there, and "
                          "'fm-keras cluster-server' on the worker and ps tasks")
    config = tf.compat.v1.ConfigProto()
    # Workers need a thread per concurrent step closure, also on small machines.
    config.inter_op_parallelism_threads = max(4, task.num_workers + 1)
    server = tf.distribute.Server(tf.train.ClusterSpec(task.cluster), job_name=task.type,
                                  task_index=task.index, protocol="grpc", config=config,
                                  start=True)
    log(f"cluster server {task.type}:{task.index} listening on "
        f"{task.cluster[task.type][task.index]}")
    server.join()


class Validation(keras.callbacks.Callback):
    """Validation metrics at the end of every epoch, computed by this task on the whole valid
    split: every worker of a synchronous cluster gets the same numbers (and so stops early
    at the same epoch), and a coordinator needs no evaluation visits from the workers."""

    def __init__(self, split, task: str):
        super().__init__()
        self.split, self.task = split, task

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        metrics = metrics_for(self.task, self.split.labels, predict_split(self.model, self.split))
        for name in ("auc", "logloss", "rmse"):
            if metrics.get(name) is not None:
                logs[f"val_{name}"] = metrics[name]


class _ClusterTrainingState(TrainingState):
    # A per-batch hook would fetch the loss every step: on a parameter-server cluster that
    # makes the coordinator wait for each step. Divergence is caught at the epoch end.
    on_train_batch_end = keras.callbacks.Callback.on_train_batch_end
    # Writes of sharded/mirrored variables stay synchronous: TF's async checkpoint copies
    # every variable to this task's host first. For the same reason the best weights are a
    # checkpoint (not a copy held by this task), and the run is checkpointed every epoch.
    async_checkpoints = False
    best_in_memory = False
    checkpoint_seconds = 0.0


def train_distributed(config: ExperimentConfig, run_dir: str, *, resume: bool = False,
                      verbose: int | None = None) -> dict | None:
    """`fm_keras.training.train` on the cluster of ``TF_CONFIG``.

    Returns the run record on the task that writes the run (the chief), None on the others.
    On a parameter-server cluster, a worker or ps task runs the server and never returns.
    """
    distribute = config.training.distribute
    task = cluster_task(distribute.strategy, where=config.source)
    if distribute.strategy == "parameter_server" and task.type != "chief":
        run_server()
        return None
    started = time.time()
    shards = cluster_shards(config, task)
    features, manifest = shards.features, shards.manifest
    if task.is_chief:
        check_run_dir(run_dir, resume, config)
    # Only now TensorFlow work: a collective strategy must come before any other.
    strategy = make_strategy(distribute, task)
    task_name = config.model.task
    valid_split = load_data_split(config.data, "valid", config.features, task_name)
    test_split = load_data_split(config.data, "test", config.features, task_name) \
        if config.data.test else None  # read before training: a bad file stops it first
    write_dir = run_dir if task.is_chief else tempfile.mkdtemp(prefix="fm-keras-worker-")
    if task.is_chief:
        os.makedirs(run_dir, exist_ok=True)
        fsutil.write_json(os.path.join(run_dir, "experiment.json"), config.to_dict())
        fsutil.write_json(os.path.join(run_dir, "features.json"), [f.to_dict() for f in features])
    keras.utils.set_random_seed(config.training.seed)
    with strategy.scope():
        model = build_model(features, config.model, config.training)
        model.compile(optimizer=make_optimizer(config.training), weighted_metrics=[],
                      steps_per_execution=config.training.steps_per_execution)
    batch_size = config.training.batch_size
    steps = max(1, manifest["rows"] // batch_size)
    training = config.training
    synchronous = distribute.strategy == "multi_worker_mirrored"

    def dataset_fn(context: tf.distribute.InputContext):
        if synchronous:  # shard the files per worker; each takes its part of the global batch
            return shard_dataset(
                shards, training, training.seed + context.input_pipeline_id,
                batch_size=context.get_per_replica_batch_size(batch_size),
                shard_index=context.input_pipeline_id, num_shards=context.num_input_pipelines,
                repeat=True, source=config.source)
        # Asynchronous workers each run whole steps: a fresh random order per worker.
        return shard_dataset(shards, training, batch_size=batch_size, repeat=True,
                             source=config.source)

    # The per-id prior as on one machine: every synchronous worker sets and re-estimates its
    # own copy from the same counts and validation rows (the same numbers: no collective);
    # on a parameter-server cluster the chief does, for the tables on the parameter servers.
    prior = attach_prior(model, config, shards.counts, shards.sample_ids, shards.sample_values,
                         shards.labels, shards.label_counts)
    if prior is not None and config.model.l2_prior_validation:
        prior.search_on(Slots(*model.encoder.encode_numpy(valid_split.features),
                              valid_split.labels, model.logit_correction), training.seed)
    state = _ClusterTrainingState(write_dir, model, config, resume=resume)
    log(f"{distribute.strategy}: task {task.type}:{task.index} of "
        f"{ {k: len(v) for k, v in task.cluster.items()} }, {manifest['rows']:,} rows in "
        f"{len(manifest['files'])} shard files, {steps} steps of {batch_size} per epoch"
        + (f"; {_shards_text(model)}" if not synchronous else ""))
    t0 = time.time()
    if state.initial_epoch < training.epochs and not state.early_stopped:
        with contextlib.redirect_stdout(sys.stderr):  # Keras prints progress to stdout
            model.fit(keras.utils.experimental.DatasetCreator(dataset_fn),
                      epochs=training.epochs, steps_per_epoch=steps,
                      initial_epoch=state.initial_epoch,
                      callbacks=[*([prior] if prior else []), Validation(valid_split, task_name),
                                 *watch_defined_metric(state, valid_split), state],
                      verbose=2 if verbose is None else verbose)
    convergence = state.finish()
    fit_seconds = time.time() - t0
    calibrate(model, valid_split, training)
    metrics = {"valid": metrics_for(task_name, valid_split.labels,
                                    predict_split(model, valid_split))}
    if test_split is not None:
        metrics["test"] = metrics_for(task_name, test_split.labels,
                                      predict_split(model, test_split))
    with fsutil.atomic_dir(os.path.join(write_dir, "model")) as tmp:
        tf.train.Checkpoint(fm=model.fm).write(os.path.join(tmp, "weights"))
    if not task.is_chief:
        shutil.rmtree(write_dir, ignore_errors=True)
        return None
    record = _record(model, state, convergence, metrics, manifest, len(valid_split), task,
                     distribute, steps * batch_size, {"total": round(time.time() - started, 2),
                                                      "fit": round(fit_seconds, 2)})
    record["prior"] = prior.precisions if prior else None
    fsutil.write_json(os.path.join(run_dir, "run.json"), record)
    log(f"run complete: {run_dir}")
    return record


def cluster_shards(config: ExperimentConfig, task: ClusterTask) -> Shards:
    """The converted shard directory of ``data.train``, checked against `config` and, for a
    synchronous cluster, against its readers: a file per worker, a per-worker batch of whole
    records. Pure Python: it runs before the strategy, which must come before any TF work.

    Raises:
        ConfigError: no shard directory (or TFRecord Examples of an older convert), another
            feature spec / label / task / neg_sample_rate, no valid files, or a batch size
            the workers cannot split into whole records.
        DataError: fewer shard files than synchronous workers.
    """
    where = f"{config.source}: data: train"
    if any(is_tfrecord(p) for p in config.data.train):
        raise ConfigError(f"{where}: TFRecord Examples (from an older 'fm-keras convert') are "
                          "no longer training data for a cluster; convert the CSV/Parquet logs "
                          f"again: {CONVERT_HINT}")
    shards = converted_shards(config)
    if shards is None:
        raise ConfigError(f"{where}: a cluster trains from the encoded shards of 'fm-keras "
                          f"convert'; {CONVERT_HINT}")
    if config.training.distribute.strategy != "multi_worker_mirrored":
        return shards
    readers = len(task.cluster.get("chief", [])) + task.num_workers
    batch, chunk = config.training.batch_size, shards.manifest["chunk_rows"]
    if batch % readers or (batch // readers) % chunk:
        raise ConfigError(f"{config.source}: training: batch_size: {batch} rows over {readers} "
                          f"synchronous workers is not a whole number of the shards' {chunk}-row "
                          f"records per worker; use a multiple of {readers * chunk}")
    if len(shards.manifest["files"]) < readers:
        raise DataError(f"{shards.directory}: {len(shards.manifest['files'])} shard file(s) for "
                        f"{readers} synchronous workers; convert with --shards {readers} or more")
    return shards


def _record(model, state, convergence, metrics, manifest, valid_rows, task, distribute,
            rows_per_epoch, seconds) -> dict:
    """run.json of a cluster run: the one-machine record plus the cluster and table shards."""
    epochs_run = len(state.history)
    return {
        "status": "complete", "task": model.task_name,
        "logit_correction": model.logit_correction,
        "calibration": model.calibration.to_dict(),
        "epochs_run": epochs_run, "best_epoch": state.best_epoch, "history": state.history,
        **convergence,
        "metrics": metrics,
        "rows": {"train": manifest["rows"], "valid": valid_rows,
                 "train_read": manifest["rows_read"], "dropped": manifest["dropped"]},
        "seconds": seconds,
        "train_samples_per_second": round(rows_per_epoch * max(1, epochs_run)
                                          / max(seconds["fit"], 1e-9)),
        "distribute": {"strategy": distribute.strategy,
                       "cluster": {k: len(v) for k, v in task.cluster.items()},
                       "variables": variable_shards(model)},
        "versions": library_versions(),
    }


def variable_shards(model) -> dict[str, list[dict]]:
    """{"table": [{"shape", "device", "bytes"} per shard]}: the FM layer's per-id table (each
    id's linear weight and factors, [ids, 1 + k]) as the parameter servers hold it."""
    parts = getattr(model.fm.table, "variables", None) or [model.fm.table]
    return {"table": [{"shape": [int(d) for d in p.shape], "device": p.device,
                       "bytes": int(p.shape.num_elements()) * p.dtype.size} for p in parts]}


def _shards_text(model) -> str:
    sizes = [f"{s['bytes'] / 2**20:.1f} MiB" for s in variable_shards(model)["table"]]
    return f"table in {len(sizes)} shard(s) of {', '.join(sizes)}"

