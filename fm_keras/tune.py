"""`fm-keras tune`: hyperparameter search over `fm_keras.training.train` with Optuna.

Why Optuna (Akiba et al., "Optuna: A Next-generation Hyperparameter Optimization
Framework", KDD 2019): a study lives in an RDB storage (``--storage sqlite:///tune.db`` or a
PostgreSQL/MySQL URL), so several `fm-keras tune` processes, on one machine or many, join
the same study and each trial is handed out once; its pruners stop a bad trial on the
per-epoch validation metric (here the median rule: a trial below the median of earlier
trials at the same epoch stops). KerasTuner, what TFX's Tuner component runs, imports the
multi-backend ``keras`` package (Keras 3) while TFRS needs tf-keras (Keras 2), and shares a
search only through a live chief-oracle gRPC process (``KERASTUNER_ORACLE_IP/PORT``), not a
database that workers may join and leave.

A tune directory::

    trials/trial-N/        a normal run directory per trial (``fm-keras evaluate/export``)
    best_experiment.yaml   the experiment with the best trial's values
    trials.csv             one row per trial of the study (all processes): values, state,
                           parameters, run directory, test metrics
    tune.png               the objective by trial, with the best so far

Trial 0 of a new study is the experiment as given (the baseline), so the search ends no
worse on validation than the configuration it started from. The objective is the best
validation AUC (binary; Recall@K for retrieval, maximized; RMSE for regression, minimized) of
the run, the metric early stopping uses.
"""

from __future__ import annotations

import io
import logging
import math
import os
import shutil
import sys
import time

import yaml

from fm_keras import fsutil
from fm_keras._tf import keras
from fm_keras.config import ExperimentConfig
from fm_keras.convergence import task_monitor
from fm_keras.errors import ConfigError, FMKerasError, TrainingDivergedError
from fm_keras.search_space import SearchSpace, default_space
from fm_keras.training import log, train

BEST_EXPERIMENT = "best_experiment.yaml"
TRIALS_CSV = "trials.csv"
PLOT = "tune.png"


class PruneOnValidation(keras.callbacks.Callback):
    """Reports the per-epoch validation metric to an Optuna trial; stops the fit when the
    pruner says so (the run still finishes: best weights restored, run.json written)."""

    def __init__(self, trial, monitor: str):
        super().__init__()
        self.trial, self.monitor, self.pruned_at = trial, monitor, None

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None or not math.isfinite(float(value)):
            return
        self.trial.report(float(value), epoch)
        if self.trial.should_prune():
            self.pruned_at = epoch
            self.model.stop_training = True


def open_storage(url: str | None):
    """An Optuna RDB storage for `url` (None: in memory). ConfigError names an unusable URL."""
    if url is None:
        return None
    import optuna

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    attempts = 5
    for attempt in range(attempts):  # processes starting together race to create the tables
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except Exception as err:  # noqa: BLE001 (SQLAlchemy and drivers raise many types)
            if attempt == attempts - 1 or not _lost_schema_race(err):
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise ConfigError(f"--storage {url}: cannot open the study storage: "
                                  f"{first[:200]}") from None
            time.sleep(1 + attempt)


def _lost_schema_race(err: Exception) -> bool:
    """True for the errors of a process that created the study tables at the same moment as
    another one (a table, or Alembic's version row, was written by the other process)."""
    text = str(err)
    return any(s in text for s in ("already exists", "UNIQUE constraint failed",
                                   "duplicate key value", "database is locked"))


def tune(config: ExperimentConfig, out: str, trials: int, *, storage: str | None = None,
         timeout: float | None = None, study_name: str | None = None,
         space: SearchSpace | None = None, seed: int | None = None) -> dict:
    """Runs `trials` trials of the study (joining it if it exists) and writes the results.

    Args:
        config: the experiment to tune (its data, features and every value not searched).
        out: tune directory (created; may hold an earlier tune of the same study).
        trials: trials this process runs (other processes on the storage add theirs).
        storage: an Optuna RDB URL, e.g. ``sqlite:///tune.db``; None keeps it in memory.
        timeout: stop starting trials after this many seconds.
        study_name: default: the experiment file's name.
        space: default `default_space(config)`.
        seed: the TPE sampler's seed; default None (a process-unique stream, so processes
            sharing a study do not propose the same values).

    Returns:
        The summary printed by the CLI: study, trials, best trial (value, params, run
        directory, metrics) and the paths written.

    Raises:
        ConfigError: trials < 1, timeout <= 0, an `out` that is a file, or an unusable
            storage; nothing is written.
    """
    import optuna

    optuna_log_to_current_stderr()
    if not isinstance(trials, int) or trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {trials}")
    if timeout is not None and not timeout > 0:
        raise ConfigError(f"--timeout must be > 0 seconds, got {timeout}")
    for path in (out, os.path.join(out, "trials")):
        if os.path.exists(path) and not os.path.isdir(path):
            raise ConfigError(f"--out {out}: {path} is a file, not a tune directory; choose "
                              "another --out")
    space = space or default_space(config)
    monitor, sign = task_monitor(config.model.task)  # the metric early stopping uses
    study_name = study_name or os.path.splitext(os.path.basename(config.source or "tune"))[0]
    rdb = open_storage(storage)
    try:
        study = optuna.create_study(
            storage=rdb, study_name=study_name, load_if_exists=True,
            direction="maximize" if sign > 0 else "minimize",
            sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=5),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2))
    except ValueError as err:  # e.g. an existing study with the other direction
        raise ConfigError(f"--study_name {study_name}: {err}") from None
    _check_same_space(study, space)
    new_study = not study.get_trials(deepcopy=False)
    made = [d for d in (out, os.path.join(out, "trials")) if not os.path.isdir(d)]
    os.makedirs(os.path.join(out, "trials"), exist_ok=True)
    if not any(t.user_attrs.get("baseline") and not _stopped(t)
               for t in study.get_trials(deepcopy=False)):  # none, or it was stopped
        study.enqueue_trial({}, user_attrs={"baseline": True})
    started = time.time()
    current = []  # this process's trial in progress (a study may be shared)

    def objective(trial):
        current[:] = [trial]
        try:
            return _objective(trial, study, config, space, out, monitor)
        except TrainingDivergedError:
            raise  # this trial's values: the study goes on (`catch`)
        except (KeyboardInterrupt, FMKerasError) as err:
            raise _Stopped(err) from err  # not an Exception: Optuna logs no traceback

    try:
        study.optimize(objective, n_trials=trials, timeout=timeout,
                       catch=(TrainingDivergedError,), gc_after_trial=True)
    except BaseException as err:  # SIGTERM (Terminated), Ctrl-C, an error no trial may catch
        if current:
            _abandon(study, current[0])
        if isinstance(err, _Stopped) and isinstance(err.error, FMKerasError):
            _undo_new(study, rdb, new_study, made)  # bad config or data: nothing stays
        raise (err.error if isinstance(err, _Stopped) else err) from None
    return _write_results(study, config, space, out, monitor, storage,
                          round(time.time() - started, 1))


class _CurrentStderr(logging.StreamHandler):
    """A log handler writing to whatever ``sys.stderr`` is when a record is written."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ sets it; the property answers instead
        pass


def optuna_log_to_current_stderr() -> None:
    """Optuna's log lines (its format, without colour) go to the current ``sys.stderr``.

    Optuna's own handler and formatter keep the ``sys.stderr`` of Optuna's first log line: in
    a process that swaps it (a notebook cell, a test's capture, a caller redirecting stderr
    around one tune) a later line goes to the old stream, or, once that is closed, prints a
    "--- Logging error ---" traceback instead."""
    import optuna

    optuna.logging.disable_default_handler()
    logger = logging.getLogger("optuna")
    if not any(isinstance(h, _CurrentStderr) for h in logger.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("[%(levelname)1.1s %(asctime)s] %(message)s"))
        logger.addHandler(handler)


class _Stopped(BaseException):
    """Carries a trial's KeyboardInterrupt or bad-input error (`FMKerasError`) past Optuna,
    which would log its traceback and then re-raise it; the CLI prints it as one line."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


def _undo_new(study, rdb, new_study: bool, made: list[str]) -> None:
    """After a bad config or bad data stopped the first trial: deletes the study if this
    process created it and it holds only failed trials (another process's work is kept),
    and the tune directories this process created if they are still empty."""
    import optuna

    if new_study and rdb is not None:
        try:
            states = {t.state for t in study.get_trials(deepcopy=False)}
            if states <= {optuna.trial.TrialState.FAIL}:
                optuna.delete_study(study_name=study.study_name, storage=rdb)
        except KeyError:  # another process of the study stopped too, and deleted it first
            pass
    for directory in reversed(made):
        fsutil.remove_if_empty(directory)


def _check_same_space(study, space: SearchSpace) -> None:
    """ConfigError if `space` gives a parameter a distribution that the study's earlier trials
    cannot share (Optuna allows a range to move, not another kind, log scale or set of
    choices); checked before any trial is created, which would otherwise fail on it."""
    from optuna.distributions import check_distribution_compatibility

    new = {p.name: p.distribution() for p in space.params}
    for trial in study.get_trials(deepcopy=False):
        for name, old in trial.distributions.items():
            if name not in new:
                continue
            try:
                check_distribution_compatibility(old, new[name])
            except ValueError:
                raise ConfigError(
                    f"--study_name {study.study_name}: the search space differs from the "
                    f"study's: {name} is {_describe(new[name])} here, {_describe(old)} in "
                    f"trial {trial.number}; use a new --study_name or the study's search "
                    "space") from None


def _describe(distribution) -> str:
    if hasattr(distribution, "choices"):
        choices = list(distribution.choices)
        return f"fixed {choices[0]!r}" if len(choices) == 1 else f"one of {choices}"
    return (f"{'a log ' if distribution.log else 'a '}range "
            f"[{distribution.low}, {distribution.high}]")


def _abandon(study, trial) -> None:
    """A trial that did not finish (its process is stopping): told to the study as FAIL,
    Optuna's state for it (Optuna tells FAIL itself on an Exception or KeyboardInterrupt,
    not on ``Terminated``, which would leave it RUNNING forever), and its partial run
    directory removed. A trial that did finish (complete, pruned) is left as it is."""
    import optuna

    state = next(t.state for t in study.get_trials(deepcopy=False) if t.number == trial.number)
    if state == optuna.trial.TrialState.RUNNING:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        state = optuna.trial.TrialState.FAIL
    run_dir = trial.user_attrs.get("run_dir") if state == optuna.trial.TrialState.FAIL else None
    if run_dir:
        shutil.rmtree(run_dir, ignore_errors=True)


def _stopped(trial) -> bool:
    """A trial that failed without trying its values (stopped, bad input), unlike one that
    diverged (also FAIL, Optuna's state for it, but done: the seeded run would diverge again)."""
    return trial.state.name == "FAIL" and not trial.user_attrs.get("diverged")


def _objective(trial, study, config: ExperimentConfig, space: SearchSpace, out: str,
               monitor: str) -> float:
    import optuna

    baseline = bool(trial.user_attrs.get("baseline"))
    values = {} if baseline else space.suggest(trial)
    twin = _duplicate_of(study, trial, baseline)
    if twin is not None:  # two processes enqueued the baseline, or TPE repeated a point
        trial.set_user_attr("duplicate_of", twin)
        raise optuna.TrialPruned(f"same values as trial {twin}")
    run_dir = os.path.abspath(os.path.join(out, "trials", f"trial-{trial.number}"))
    if os.path.exists(run_dir):  # not this trial's: a stopped trial would remove it
        raise ConfigError(f"--out {out}: {run_dir} exists already (a trial of another study "
                          "tuned into this --out?); give each study its own --out")
    trial.set_user_attr("run_dir", run_dir)
    log(f"tune: trial {trial.number}" + (" (baseline: the experiment as given)" if baseline
                                         else f": {values}"))
    pruning = PruneOnValidation(trial, monitor)
    try:
        record = train(space.apply(config, values), run_dir, verbose=0, callbacks=[pruning])
    except TrainingDivergedError:
        trial.set_user_attr("diverged", True)  # its values were tried: not run again
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    best = record["history"][record["best_epoch"] - 1][monitor]  # best_epoch is 1-based
    trial.set_user_attr("epochs_run", record["epochs_run"])
    trial.set_user_attr("best_epoch", record["best_epoch"])
    for split, metrics in record["metrics"].items():
        for name in ("auc", "logloss", "ece", "rmse"):
            if metrics.get(name) is not None:
                trial.set_user_attr(f"{split}_{name}", metrics[name])
    if pruning.pruned_at is not None:
        trial.set_user_attr("pruned_after_epoch", pruning.pruned_at + 1)
        raise optuna.TrialPruned(f"{monitor} below the median after epoch {pruning.pruned_at + 1}")
    return float(best)


def _duplicate_of(study, trial, baseline: bool) -> int | None:
    """The number of an earlier trial (not itself a duplicate, nor stopped: a stopped trial's
    values are still to be tried) with the same values."""
    for other in study.get_trials(deepcopy=False):
        if other.number >= trial.number or "duplicate_of" in other.user_attrs or _stopped(other):
            continue
        if bool(other.user_attrs.get("baseline")) == baseline and other.params == trial.params:
            return other.number
    return None


def _write_results(study, config: ExperimentConfig, space: SearchSpace, out: str,
                   monitor: str, storage: str | None, seconds: float) -> dict:
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not done:
        raise TrainingDivergedError(f"tune: no trial of study {study.study_name!r} completed "
                                    "(all diverged or were pruned); narrow the search space")
    best = study.best_trial
    best_config = space.apply(config, best.params)
    fsutil.write_text(os.path.join(out, BEST_EXPERIMENT), yaml.safe_dump(
        best_config.to_dict(), sort_keys=False, default_flow_style=None))
    table = study.trials_dataframe(attrs=("number", "state", "value", "duration", "params",
                                          "user_attrs"))
    fsutil.write_text(os.path.join(out, TRIALS_CSV), table.to_csv(index=False))
    _write_plot(os.path.join(out, PLOT), study, monitor)
    states = [t.state.name.lower() for t in study.get_trials(deepcopy=False)]
    log(f"tune: best trial {best.number} of {len(states)}: {monitor} {best.value:.5f}")
    return {
        "study": study.study_name, "storage": storage or "in-memory", "monitor": monitor,
        "trials": {s: states.count(s) for s in sorted(set(states))}, "seconds": seconds,
        "best": {"trial": best.number, "value": best.value, "params": best.params,
                 "baseline": bool(best.user_attrs.get("baseline")),
                 "run": best.user_attrs.get("run_dir"),
                 "metrics": {k: v for k, v in best.user_attrs.items()
                             if k.startswith(("valid_", "test_"))}},
        "search_space": space.to_dict(),
        "best_experiment": os.path.join(out, BEST_EXPERIMENT),
        "trials_csv": os.path.join(out, TRIALS_CSV), "plot": os.path.join(out, PLOT),
    }


def _write_plot(path: str, study, monitor: str) -> None:
    """The objective by trial (pruned trials at their last reported value) and the best so
    far, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    maximize = study.direction.name == "MAXIMIZE"
    fig, ax = plt.subplots(figsize=(7, 4))
    best, xs, ys = None, [], []
    for t in study.get_trials(deepcopy=False):
        if t.state.name == "COMPLETE":
            ax.plot(t.number, t.value, "o", color="C0", ms=5)
            if t.user_attrs.get("baseline"):
                ax.annotate("  the experiment as given", (t.number, t.value), fontsize=8)
            best = t.value if best is None else (max if maximize else min)(best, t.value)
        elif t.state.name == "PRUNED" and t.intermediate_values:
            last = t.intermediate_values[max(t.intermediate_values)]
            ax.plot(t.number, last, "x", color="C3", ms=6)
        if best is not None:
            xs.append(t.number)
            ys.append(best)
    ax.step(xs, ys, where="post", color="C2", label="best so far")
    ax.plot([], [], "o", color="C0", label="complete")
    ax.plot([], [], "x", color="C3", label="pruned (last epoch reported)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel(f"validation {monitor.removeprefix('val_')}")
    ax.set_title(f"fm-keras tune: study {study.study_name}")
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    fsutil.write_bytes(path, buffer.getvalue())
