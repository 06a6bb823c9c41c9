"""The pipeline runner: steps in order, each recorded in the metadata store, cached by inputs.

    examplegen -> statistics -> validator -> trainer -> evaluator -> infra_validator
        -> index_builder -> pusher

The recall model is built and checked before anything is pushed; the pusher then pushes the
ranking version and the recall version back to back.

Each step's cache key is the fingerprint of its parameters, its input artifacts and the
fm_keras version; an execution with the same key whose outputs still exist is reused
(``CACHED``). A step can stop the run with an outcome (anomalies, not blessed, infra or recall
invalid): the remaining steps do not run and the served model stays as it was. A run holds the
pipeline lock (``<root>/.lock``), so runs never overlap; RUNNING leftovers of a killed run are
marked ABANDONED and its partial push removed by the next one.

A step can also run on its own (``fm-keras pipeline step NAME --run-id ID``): it takes its
inputs from the earlier steps of that run, as a container step of a scheduler would. A retry of
the step that failed or was killed (same run id, same step) runs it again, from an empty step
directory (what the failed attempt wrote there is removed first); any other step of a run that
has ended does nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fm_keras import fsutil, termination
from fm_keras.errors import ConfigError, error_line
from fm_keras.pipeline import cache
from fm_keras.pipeline.config import PipelineConfig, SpanWindow
from fm_keras.pipeline.metadata import DONE, Artifact, MetadataStore
from fm_keras.pipeline.status import run_summary

STEPS = ("examplegen", "statistics", "validator", "trainer", "evaluator", "infra_validator",
         "index_builder", "pusher")
# Run outcomes; the CLI exits 0 for these (a model that is not blessed is a normal outcome of a
# retraining job) and 1 for invalid_data, infra_invalid, recall_invalid, failed. A run executed step by step
# is "open" between steps; "running" only while a process works on it.
OK_STATUSES = ("pushed", "unchanged", "not_blessed")


@dataclass
class StepResult:
    """What a step produced: outputs {name: (type, uri, fingerprint, properties)},
    properties for the execution record, and ``stop`` (a run status) to end the run."""

    outputs: dict = field(default_factory=dict)
    properties: dict = field(default_factory=dict)
    stop: str | None = None


def log(message: str) -> None:
    print(f"fm-keras: pipeline: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def pipeline_lock(root: str):
    """The pipeline's exclusive lock; ConfigError if another run holds it."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".lock"), "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"{root}: another pipeline run holds the lock; wait for it "
                              "to finish") from None
        yield


class PipelineRun:
    """One run of a pipeline (a metadata context), executing steps."""

    def __init__(self, config: PipelineConfig, store: MetadataStore, run_id: str | None = None,
                 span: int | None = None):
        self.config, self.store = config, store
        existing = store.context(run_id) if run_id else None
        if existing is not None:
            self.run_id, self.context_id = run_id, existing["id"]
            self.span = existing["properties"]["span"]
            self.window = SpanWindow.from_dict(existing["properties"].get("window"), self.span)
        else:
            self.run_id = run_id or time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)
            self.span = span if span is not None else config.latest_span()
            # The rolling window of spans (data.spans) is fixed when the run starts.
            self.window = config.span_window(self.span)
            self.context_id = store.create_context("run", self.run_id, {
                "status": "running", "span": self.span, "window": self.window.as_dict(),
                "started": time.time(),
                "pipeline": config.name, "source": os.path.abspath(config.source)})
        self.run_dir = os.path.join(config.root, "runs", self.run_id)
        os.makedirs(self.run_dir, exist_ok=True)

    # ----- artifacts of this run ----------------------------------------------------------
    def outputs(self) -> dict[str, Artifact]:
        found = {}
        for execution in self.store.executions(self.context_id):
            if execution["state"] in DONE:
                found.update(self.store.events(execution["id"], "OUTPUT"))
        return found

    def _need(self, step: str, *names: str) -> list[Artifact]:
        outputs = self.outputs()
        missing = [n for n in names if n not in outputs]
        if missing:
            raise ConfigError(f"run {self.run_id}: step {step!r} needs {missing[0]!r}, which no "
                              "earlier step of this run produced; run the earlier steps first")
        return [outputs[n] for n in names]

    def last_blessed(self, exclude_fingerprint: str | None = None,
                     exclude_examples: str | None = None) -> Artifact | None:
        """The newest model that was blessed, infra-valid and pushed, other than
        ``exclude_fingerprint`` (the candidate itself) and not trained on ``exclude_examples``
        (the baseline of the evaluator and the start of a warm start)."""
        models = {}
        for model in self.store.artifacts("Model"):  # newest first: keep the first one
            models.setdefault(model.fingerprint, model)
        for pushed in self.store.artifacts("PushedModel"):
            model = models.get(pushed.fingerprint)
            if model is None or model.fingerprint == exclude_fingerprint \
                    or not os.path.exists(model.uri):
                continue
            if exclude_examples and model.properties.get("examples") == exclude_examples:
                continue
            return model
        return None

    # ----- running steps ------------------------------------------------------------------
    def run_step(self, step: str) -> StepResult:
        """Runs (or reuses from the cache) one step and records it."""
        inputs, params, execute, cacheable = getattr(self, f"_{step}")()
        key = cache.cache_key(step, params, inputs)
        started = time.time()
        hit = self.store.cached(step, key) if cacheable else None
        out_dir = os.path.join(self.run_dir, step)
        self._discard_failed_attempt(step, out_dir)
        execution = self.store.start_execution(step, self.context_id, key, inputs,
                                               {"params": params})
        if hit is not None:
            properties, outputs = hit
            seconds = round(time.time() - started, 3)
            self.store.finish_execution(execution, "CACHED", outputs, {
                **properties, "seconds": seconds, "cached": True})
            log(f"{step}: cached ({seconds:.2f}s)")
            return StepResult(properties=properties, stop=properties.get("stop"))
        os.makedirs(out_dir, exist_ok=True)
        log(f"{step}: running")
        try:
            result = execute(out_dir)
        except BaseException as err:
            self.store.finish_execution(execution, "FAILED", {}, {
                "error": error_line(err), "seconds": round(time.time() - started, 3)})
            raise
        finally:  # a step that wrote nothing (or was killed before it wrote) leaves no dir
            fsutil.remove_if_empty(out_dir)
        outputs = {name: self.store.put_artifact(*spec) for name, spec in result.outputs.items()}
        seconds = round(time.time() - started, 3)
        result.properties.update(seconds=seconds, cached=False, stop=result.stop)
        self.store.finish_execution(execution, "COMPLETE", outputs, result.properties)
        log(f"{step}: done in {seconds:.1f}s" + (f" -> {result.stop}" if result.stop else ""))
        return result

    def _discard_failed_attempt(self, step: str, out_dir: str) -> None:
        """Removes what an earlier attempt of ``step`` in this run left in its directory, so a
        retry starts from an empty one (e.g. a SIGTERM during the trainer's export leaves a
        finished training run in ``trainer/run``, which a second training refuses to
        overwrite). Only ``out_dir`` (``runs/<run id>/<step>``) is removed, and only when no
        execution of the step in this run completed: then no recorded artifact lives there,
        only the partial outputs of attempts that failed or were killed."""
        if not os.path.isdir(out_dir):
            return
        if any(x["type"] == step and x["state"] == "COMPLETE"
               for x in self.store.executions(self.context_id)):
            return
        shutil.rmtree(out_dir)
        log(f"{step}: removed the partial outputs of an earlier attempt ({out_dir})")

    def finish(self, status: str, **properties) -> dict:
        self.store.update_context(self.context_id, status=status, finished=time.time(),
                                  **properties)
        summary = run_summary(self.store, self.store.context(self.run_id))
        fsutil.write_json(os.path.join(self.run_dir, "run.json"), summary)
        return summary

    # ----- the steps: (inputs, params, execute, cacheable) ----------------------------------
    def _examplegen(self):
        from fm_keras.data import multi_hot_separators
        from fm_keras.pipeline.examplegen import input_files, run_examplegen

        # Every span of the window, as one data set; the key covers each of their files.
        patterns = self.config.window_patterns(self.window)
        # Parquet list columns of multi-hot features are written as their joined text.
        lists = multi_hot_separators(self.config.features)
        schema = [*(f.name for f in self.config.features), self.config.data.label]
        params = {"data": dataclasses.asdict(self.config.data), "span": self.span,
                  "spans": list(self.window.spans), "files": input_files(patterns),
                  "schema_columns": schema, **({"lists": lists} if lists else {})}

        def execute(out):
            counts = run_examplegen(self.config.data, patterns, out, lists, schema)
            fp = cache.fingerprint_files([os.path.join(out, "train.parquet"),
                                          os.path.join(out, "eval.parquet")])
            return StepResult({"examples": ("Examples", out, fp, {
                "span": self.span, "spans": list(self.window.spans)})}, counts)
        return {}, params, execute, True

    def _statistics(self):
        from fm_keras.pipeline.statistics import STATISTICS_VERSION, generate_statistics

        (examples,) = self._need("statistics", "examples")
        params = {"features": [dataclasses.asdict(f) for f in self.config.features],
                  "label": self.config.data.label, "version": STATISTICS_VERSION}

        def execute(out):
            stats, schema = generate_statistics(examples.uri, self.config.features,
                                                self.config.data.label, out)
            return StepResult({
                "statistics": ("ExampleStatistics", os.path.join(out, "statistics.json"),
                               cache.fingerprint_json(stats), {}),
                "schema": ("Schema", os.path.join(out, "schema.json"),
                           cache.fingerprint_json(schema), {})},
                {"rows": stats["rows"], "label_rate": stats["label_rate"]})
        return {"examples": examples}, params, execute, True

    def _validator(self):
        from fm_keras.pipeline.statistics import anomalies_fail, validate

        examples, stats, schema = self._need("validator", "examples", "statistics", "schema")
        baseline = next((a for a in self.store.artifacts("ValidatedSchema")
                         if a.fingerprint != schema.fingerprint and os.path.exists(a.uri)), None)
        params = {"validation": dataclasses.asdict(self.config.validation),
                  "task": self.config.model.task}

        def execute(out):
            anomalies = validate(fsutil.read_json(stats.uri), fsutil.read_json(schema.uri),
                                 self.config.features,
                                 fsutil.read_json(baseline.uri) if baseline else None,
                                 self.config.validation, examples.uri, self.config.model.task)
            path = os.path.join(out, "anomalies.json")
            fsutil.write_json(path, {"anomalies": anomalies,
                                     "baseline_schema": baseline.uri if baseline else None})
            failed = anomalies_fail(anomalies)
            for a in anomalies:  # the why of invalid_data, where the user looks first
                log(f"validator: {a['severity']}: {a['kind']} ({a['column']}): {a['detail']}")
            outputs = {"anomalies": ("ExampleAnomalies", path, cache.fingerprint_json(anomalies),
                                     {"failed": len(failed), "warned": len(anomalies) - len(failed)})}
            if not failed:
                outputs["validated_schema"] = ("ValidatedSchema", schema.uri, schema.fingerprint, {})
            return StepResult(outputs, {"anomalies": anomalies},
                              stop="invalid_data" if failed else None)
        inputs = {"statistics": stats, "schema": schema, "baseline_schema": baseline}
        return inputs, params, execute, True

    def _trainer(self):
        from fm_keras.pipeline.trainer import run_trainer

        examples, _ = self._need("trainer", "examples", "validated_schema")
        base = (self.last_blessed(exclude_examples=examples.fingerprint)
                if self.config.trainer.warm_start else None)
        params = {"features": [dataclasses.asdict(f) for f in self.config.features],
                  "model": dataclasses.asdict(self.config.model),
                  "training": dataclasses.asdict(self.config.training)}
        if self.config.trainer.tune is not None:
            params["tune"] = dataclasses.asdict(self.config.trainer.tune)

        def execute(out):
            record = run_trainer(self.config, examples.uri, out,
                                 warm_start=base.properties["run_dir"] if base else None,
                                 span=examples.properties.get("span"))
            fp = cache.fingerprint_export(record["export_dir"])
            props = {"run_dir": record["run_dir"], "export_dir": record["export_dir"],
                     "examples": examples.fingerprint, "warm_start": base.uri if base else None}
            return StepResult({"model": ("Model", out, fp, props)},
                              {"history": record["history"], "best_epoch": record["best_epoch"],
                               "metrics": record["metrics"], "rows": record["rows"],
                               "warm_start": props["warm_start"],
                               "warnings": record.get("warnings", [])})
        return {"examples": examples, "base_model": base}, params, execute, True

    def _evaluator(self):
        model, examples = self._need("evaluator", "model", "examples")
        baseline = self.last_blessed(exclude_fingerprint=model.fingerprint)
        items = self.config.data.items
        params = {"evaluator": dataclasses.asdict(self.config.evaluator),
                  "index": dataclasses.asdict(self.config.index),
                  "items": [items, os.path.getsize(items), os.stat(items).st_mtime_ns]
                  if items else None}

        def execute(out):
            from fm_keras.pipeline.evaluator import ann_recall_at_k, blessing, score_run

            metrics = score_run(model.properties["run_dir"], self.config, examples.uri)
            if items and self.config.index.enabled:
                metrics["ann_recall"] = ann_recall_at_k(model.properties["export_dir"],
                                                        self.config, examples.uri)
                metrics["ann_recall_at_k"] = metrics["ann_recall"]["ann_recall_at_k"]
            base_metrics = (score_run(baseline.properties["run_dir"], self.config, examples.uri)
                            if baseline else None)
            verdict = blessing(metrics, base_metrics, self.config.evaluator)
            evaluation = {"candidate": metrics, "baseline": base_metrics,
                          "baseline_model": baseline.uri if baseline else None}
            fsutil.write_json(os.path.join(out, "evaluation.json"), evaluation)
            fsutil.write_json(os.path.join(out, "blessing.json"), verdict)
            return StepResult({
                "evaluation": ("ModelEvaluation", os.path.join(out, "evaluation.json"),
                               cache.fingerprint_json(evaluation), {}),
                "blessing": ("ModelBlessing", os.path.join(out, "blessing.json"),
                             cache.fingerprint_json(verdict),
                             {"blessed": verdict["blessed"], "model_id": model.id})},
                {"blessed": verdict["blessed"], "reasons": verdict["reasons"]},
                stop=None if verdict["blessed"] else "not_blessed")
        return {"model": model, "examples": examples, "baseline_model": baseline}, params, \
            execute, True

    def _infra_validator(self):
        from fm_keras.pipeline.infra_validator import infra_validate

        model, examples, _ = self._need("infra_validator", "model", "examples", "blessing")
        params = {"infra_validator": dataclasses.asdict(self.config.infra_validator)}

        def execute(out):
            result = infra_validate(model.properties["export_dir"], examples.uri,
                                    self.config.infra_validator)
            path = os.path.join(out, "infra.json")
            fsutil.write_json(path, result)
            return StepResult({"infra_blessing": ("InfraBlessing", path,
                                                  cache.fingerprint_json(result["valid"]),
                                                  {"valid": result["valid"]})},
                              result, stop=None if result["valid"] else "infra_invalid")
        return {"model": model, "examples": examples}, params, execute, True

    def _index_builder(self):
        from fm_keras.pipeline.index_builder import build_recall

        model, examples, _ = self._need("index_builder", "model", "examples", "infra_blessing")
        items = self.config.data.items
        params = {"index": dataclasses.asdict(self.config.index),
                  "infra_validator": dataclasses.asdict(self.config.infra_validator),
                  "items": [items, os.path.getsize(items), os.stat(items).st_mtime_ns]
                  if items and self.config.index.enabled else items}

        def execute(out):
            if not self.config.index.enabled:
                return StepResult({}, {"built": False, "reason": "index: enabled is false"})
            result = build_recall(self.config, model.properties["export_dir"], out, examples.uri)
            if not result["valid"]:
                return StepResult({}, result, stop="recall_invalid")
            return StepResult({"recall_model": ("RecallModel", result["path"],
                                                cache.fingerprint_export(result["path"]),
                                                {"model": model.fingerprint})}, result)
        return {"model": model, "examples": examples}, params, execute, True

    def _pusher(self):
        """The ranking version, then its recall model under the same number, back to back
        (both built and checked before): a run killed between them is completed by the next
        run, which pushes the missing recall version and reports ``pushed``."""
        from fm_keras.pipeline import serving_config
        from fm_keras.pipeline.pusher import push, push_recall

        model, blessed, infra = self._need("pusher", "model", "blessing", "infra_blessing")
        recall = None
        if self.config.index.enabled:
            (recall,) = self._need("pusher", "recall_model")
        params = {"base": self.config.pusher.base, "name": self.config.name}
        config = self.config

        def execute(out):
            if not (blessed.properties.get("blessed") and infra.properties.get("valid")):
                return StepResult({}, {"pushed": False}, stop="not_blessed")
            result = push(model.properties["export_dir"], model.fingerprint,
                          config.pusher.base, config.name, self.run_id)
            names, pushed = [config.name], result["pushed"]
            if recall is not None:
                result["recall"] = push_recall(recall.uri, config.pusher.base, config.recall_name,
                                               result["version"], result["path"], self.run_id)
                names.append(config.recall_name)
                pushed = pushed or result["recall"]["pushed"]
                said = {True: "pushed", False: "unchanged"}
                log(f"pusher: {config.name} {result['version']} {said[result['pushed']]}, "
                    f"{config.recall_name} {result['version']} {said[result['recall']['pushed']]}")
            # after both pushes: a first run lists the pair at once (writes only what is new)
            serving_config.ensure_models(config.pusher.model_config_file, config.pusher.base,
                                         names)
            pinned = pushed and serving_config.pinned_elsewhere(
                config.pusher.model_config_file, config.name, result["version"])
            if pinned:
                result["warning"] = pinned
                log(f"warning: {pinned}")
            # Under `latest` the new version unloads the one it replaces: a version label (an
            # A/B test's) that named it is removed, as a rollback does (TF Serving rejects it).
            result["warnings"] = serving_config.drop_stale_labels(
                config.pusher.model_config_file, names)
            for warning in result["warnings"]:
                log(f"warning: {warning}")
            return StepResult({"pushed_model": ("PushedModel", result["path"], model.fingerprint,
                                                {"version": result["version"],
                                                 "pushed": pushed})}, result)
        inputs = {"model": model, "blessing": blessed, "infra_blessing": infra,
                  "recall_model": recall}
        return inputs, params, execute, False


def run_pipeline(config: PipelineConfig, span: int | None = None, run_id: str | None = None,
                 steps: tuple[str, ...] = STEPS, report: bool = True,
                 on_failure: Callable[[dict], None] | None = None) -> dict:
    """Runs the steps of one pipeline run; returns the run summary (also in run.json).

    Args:
        config: the pipeline.
        span: the span to run on (default: the newest on disk); ignored for an existing run.
        run_id: a run to continue (container steps) or the id of a new one.
        steps: the steps to run, in `STEPS` order.
        report: write ``report/index.html``.
        on_failure: called with the failed run's summary (status ``failed`` and a one-line
            ``error``, e.g. ``terminated by SIGTERM``) before the error propagates.

    Raises:
        ConfigError: an unknown step, ``data.items`` is not a file (where a step reads it),
            or another run holds the lock.
        BaseException: whatever stopped a step (also SIGTERM's `Terminated`); the run is
            recorded as failed first.
    """
    for step in steps:
        if step not in STEPS:
            raise ConfigError(f"unknown step {step!r}; steps are {list(STEPS)}")
    if {"evaluator", "index_builder"} & set(steps):  # the steps that read data.items
        config.check_items()
    with pipeline_lock(config.root):
        store = MetadataStore(os.path.join(config.root, "metadata.sqlite"))
        try:
            abandoned = store.abandon_running()
            if abandoned:
                log(f"marked {abandoned} execution(s) of a killed run ABANDONED")
            run = PipelineRun(config, store, run_id=run_id, span=span)
            ended = store.context(run.run_id)["properties"]["status"]
            if ended not in ("running", "open"):  # a container step after the run ended
                retry = retried_step(store, run.context_id, ended)
                if retry not in steps:
                    log(f"run {run.run_id} has ended ({ended}); not running {', '.join(steps)}")
                    return run_summary(store, store.context(run.run_id))
                # A scheduler's retry of the step that failed (or was killed): run it again;
                # the steps this run finished already are not redone.
                done = finished_steps(store, run.context_id)
                steps = tuple(s for s in steps if s not in done)
                log(f"run {run.run_id} ended ({ended}) in {retry}: retrying "
                    f"{', '.join(steps)}")
            store.update_context(run.context_id, status="running", error=None, pid=os.getpid(),
                                 host=socket.gethostname())
            log(f"run {run.run_id} on {run.window.describe()} -> {run.run_dir}")
            if run.window.missing:
                log(f"warning: rolling window of {run.window.describe()}: reading spans "
                    f"{', '.join(map(str, run.window.spans)) or 'none'}")
            try:
                status = _execute(run, steps)
                with termination.committing():  # recorded: a SIGTERM after it changes nothing
                    summary = run.finish(status)
            except BaseException as err:
                summary = run.finish("failed", error=error_line(err))
                if report:
                    with contextlib.suppress(Exception):  # never hide the error itself
                        _report(run, summary, store)
                if on_failure is not None:
                    with contextlib.suppress(Exception):
                        on_failure(summary)
                raise
            if report:
                _report(run, summary, store)
            return summary
        finally:
            store.close()


def retried_step(store: MetadataStore, context_id: int, ended: str) -> str | None:
    """The step a retry of an ended run may run again: the step whose execution failed or was
    abandoned (killed), when the run ended ``failed`` or ``abandoned``; else None (a run that
    ended with an outcome, e.g. ``not_blessed``, stays ended)."""
    if ended not in ("failed", "abandoned"):
        return None
    broken = [x["type"] for x in store.executions(context_id)
              if x["state"] in ("FAILED", "ABANDONED")]
    return broken[-1] if broken else None


def finished_steps(store: MetadataStore, context_id: int) -> set[str]:
    """The steps of a run whose newest execution finished (COMPLETE or CACHED)."""
    newest = {x["type"]: x["state"] for x in store.executions(context_id)}  # ordered by id
    return {step for step, state in newest.items() if state in DONE}


def _report(run: PipelineRun, summary: dict, store: MetadataStore) -> None:
    from fm_keras.pipeline.report import write_report

    summary["report"] = write_report(run.run_dir, summary, store)
    fsutil.write_json(os.path.join(run.run_dir, "run.json"), summary)
    log(f"report: {summary['report']}")


def _execute(run: PipelineRun, steps) -> str:
    started = time.time()
    for step in steps:
        result = run.run_step(step)
        if result.stop:
            log(f"stopped after {step}: {result.stop}; the served model is unchanged")
            return result.stop
    if steps != STEPS:  # container steps: "open" until the last one
        return "open" if steps[-1] != STEPS[-1] else _pushed_status(run)
    log(f"run {run.run_id} finished in {time.time() - started:.1f}s")
    return _pushed_status(run)


def _pushed_status(run: PipelineRun) -> str:
    pushed = run.outputs().get("pushed_model")
    if pushed is None:
        return "not_blessed"
    return "pushed" if pushed.properties.get("pushed") else "unchanged"

