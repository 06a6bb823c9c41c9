"""Batch scoring on Apache Beam: ``fm-keras score --runner DirectRunner|DataflowRunner|...``.

The same export and signature as `fm_keras.scoring.run_signature`, as a Beam pipeline::

    MatchFiles -> ReadMatches -> rows (CSV/Parquet, typed as the signature wants)
      -> RunInference(KeyedModelHandler(FMModelHandler))   kept id columns ride as the key
      -> batches -> the same columns as `fm-keras score` -> one CSV or Parquet file

`FMModelHandler` is Beam's TensorFlow model handler (``TFModelHandlerTensor``: its batching,
model sharing and metrics) with two changes: it loads the SavedModel with
``tf.saved_model.load`` (an fm_keras export is not a Keras model; a ScaNN recall export needs
``import scann`` first), and its inference function calls the chosen signature with a dict of
raw-feature tensors. Rows come out in no particular order: keep an id column to join.

A local output is written as the local `score` writes it: Beam writes a hidden temp file
beside it (``scoring.temp_output``), renamed into place inside ``termination.committing()``,
so SIGTERM or Ctrl-C during the run, or an error, leaves nothing (the temp file and Beam's
``beam-temp-*`` directories are removed), and a SIGTERM after the rename changes nothing. A
remote output (``gs://...``) is put in place by Beam's own write.

Apache Beam is an optional dependency: ``pip install 'fm-keras[beam]'``.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import io
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence

import numpy as np

from fm_keras import termination
from fm_keras.errors import ExportError, Terminated
from fm_keras.scoring import (check_columns, check_output, column_inputs, default_keep,
                              export_list_columns, kept_array, kept_types, outputs_table,
                              output_format, temp_output)

RUNNERS = ("DirectRunner", "DataflowRunner", "FlinkRunner", "SparkRunner")


def _beam():
    try:
        import apache_beam as beam
        with warnings.catch_warnings():
            # Beam's TF handler imports tensorflow_hub 0.16, whose `import pkg_resources`
            # warns on every command that setuptools will drop the module (pinned <81).
            warnings.filterwarnings("ignore", "pkg_resources is deprecated", UserWarning)
            from apache_beam.ml.inference import tensorflow_inference  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "fm-keras score --runner needs Apache Beam and its TensorFlow model handler: "
            f"pip install 'fm-keras[beam]' ({err})") from err
    return beam


def _local_runner():
    """The runner for ``--runner DirectRunner``: Beam's FnApiRunner, in this process.

    Beam 2.77's DirectRunner first tries Prism, a Go job server it downloads from GitHub at
    run time; offline it fails and falls back to this same runner, leaving an empty
    ``/tmp/beam-temp*`` directory behind each time. Batch scoring asks for neither."""
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    return FnApiRunner()


def _handler_class():
    from apache_beam.ml.inference.tensorflow_inference import TFModelHandlerTensor

    class FMModelHandler(TFModelHandlerTensor):
        """Beam's TF handler, loading an fm_keras export (any signature) as a SavedModel."""

        def load_model(self):
            from fm_keras.servables import load_export

            return load_export(self._model_uri)[1]

    return FMModelHandler


def call_signature(model, batch, inference_args, model_id=None, *, signature: str,
                   types: dict):
    """RunInference's inference function: a batch of row dicts -> the signature's outputs.

    Args:
        model: the loaded SavedModel.
        batch: rows, each ``{input name: raw value}``.
        types: input name -> ``"float32"`` or ``"string"``.
    """
    from apache_beam.ml.inference.base import PredictionResult

    from fm_keras._tf import tf

    feed = {name: tf.constant(np.array([row[name] for row in batch],
                                       np.float32 if kind == "float32" else object))
            for name, kind in types.items()}
    outputs = {k: v.numpy() for k, v in model.signatures[signature](**feed).items()}
    return [PredictionResult(row, {k: v[i] for k, v in outputs.items()}, model_id)
            for i, row in enumerate(batch)]


def read_rows(readable_file, types: dict, keep: Sequence[str], chunk_rows: int = 65_536,
              lists: dict[str, str] | None = None, keep_types: dict | None = None):
    """One CSV/Parquet file -> ``(kept values, {input: value})`` per row, read by
    `fm_keras.reading` as `fm-keras score` and `fm-keras train` read it: float32 inputs by its
    numeric rule (a missing token is NaN), everything else the text as written. The file is
    streamed in chunks of `chunk_rows`, never read whole. `lists`: the multi-hot columns a
    Parquet file may store as lists, with their separators (`fm_keras.list_columns`).

    A file on a remote filesystem is copied to a local temp file first (the reader needs a
    path; the copy is streamed and deleted after). Its kept columns are checked here against
    `keep_types` (`fm_keras.scoring.kept_types` of the local inputs, which a remote file did
    not enter), so that a cell that is not of its column's type is named by file and row.

    Raises:
        DataError: a signature column missing, a numeric cell that is not a number, or (a
            remote file) a kept cell that is not of its `keep_types` type.
    """
    from fm_keras.reading import numbers, record_batches, texts
    from fm_keras.scoring import check_columns

    path = readable_file.metadata.path
    wanted = list(dict.fromkeys([*types, *keep]))
    typed = (keep_types or {}) if "://" in path else {}  # local files: checked already
    with _local_copy(readable_file) as local:
        check_columns(path, list(types), keep, local)
        for first, batch in record_batches(local, wanted, chunk_rows, lists):
            columns = {name: numbers(batch.column(name), f"{path}: column {name!r}", first)
                       if types.get(name) == "float32" else texts(batch.column(name))
                       for name in wanted}
            for name, kind in typed.items():
                kept_array(columns[name], kind, f"{path}: column {name!r}", first)
            for i in range(batch.num_rows):
                yield (tuple(columns[k][i] for k in keep),
                       {name: columns[name][i] for name in types})


@contextlib.contextmanager
def _local_copy(readable_file):
    """The file's local path (a local file), or a streamed copy of a remote one."""
    path = readable_file.metadata.path
    if "://" not in path:
        yield path
        return
    suffix = os.path.splitext(path)[1]
    with tempfile.NamedTemporaryFile(suffix=suffix) as tmp, readable_file.open() as src:
        shutil.copyfileobj(src, tmp, 1 << 20)
        tmp.flush()
        yield tmp.name


def rows_to_table(batch, keep: Sequence[str], dtypes: dict, fmt: str,
                  keep_types: dict | None = None, numeric: Sequence[str] = ()):
    """A batch of ``(kept values, PredictionResult)`` -> the table `fm-keras score` writes:
    kept columns typed as the local score types them (`fm_keras.scoring.kept_types`; those in
    `numeric`, float32 inputs of the signature, as the float32 values read)."""
    kept = {k: _kept_column([key[j] for key, _ in batch], k, keep_types, numeric)
            for j, k in enumerate(keep)}
    outputs = {name: np.array([r.inference[name] for _, r in batch], dtype)
               for name, dtype in dtypes.items()}
    return outputs_table(kept, outputs, fmt)


def _kept_column(values: list, name: str, keep_types: dict | None, numeric: Sequence[str]):
    array = np.array(values, np.float32 if name in numeric else object)
    return kept_array(array, (keep_types or {}).get(name), f"column {name!r}")


def _csv_lines(table):
    import pyarrow.csv as pacsv

    buffer = io.BytesIO()
    pacsv.write_csv(table, buffer, pacsv.WriteOptions(include_header=False))
    return buffer.getvalue().decode().splitlines()


@contextlib.contextmanager
def _quiet_beam_log(quiet: bool):
    """Beam logs a failing DoFn's error and traceback before it raises it; the CLI prints that
    error as one line, so an in-process run (`quiet`) holds Beam's loggers at CRITICAL."""
    logger = logging.getLogger("apache_beam")
    level = logger.level
    if quiet:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def stop_signal(err: BaseException) -> BaseException | None:
    """The `Terminated` (SIGTERM) or `KeyboardInterrupt` that a runner's error stands for, or
    None. A signal raises in whichever DoFn runs in the main thread, and Beam re-raises it as
    a ``RuntimeError("fm_keras.errors.Terminated: ... [while running 'step']")``: the original
    is in the error's chain (``__cause__``/``__context__``), or only in its message."""
    seen, link = set(), err
    while link is not None and id(link) not in seen:
        if isinstance(link, (Terminated, KeyboardInterrupt)):
            return link
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    text = str(err)
    if text.startswith(f"{Terminated.__module__}.{Terminated.__name__}"):
        return Terminated()
    if text.startswith("KeyboardInterrupt"):
        return KeyboardInterrupt()
    return None


def _remove_temp_output(target: str) -> None:
    """Removes a local temp output and the ``beam-temp-<its name>-<uuid>`` directories that
    Beam's file sinks make beside it (a failed or stopped run can leave both)."""
    directory, name = os.path.split(target)
    for path in glob.glob(os.path.join(glob.escape(directory),
                                       f"beam-temp-{glob.escape(name)}-*")):
        shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(target)


def score_with_beam(model: str, inputs: Sequence[str], output: str, *,
                    runner: str = "DirectRunner", signature: str = "serving_default",
                    batch_size: int = 16_384, keep: Sequence[str] | None = None,
                    options: Sequence[str] = ()) -> dict:
    """Scores CSV/Parquet files with one signature of an export on a Beam runner.

    Args:
        model: a version or model directory of an fm_keras export (readable by the workers).
        inputs: file paths or globs (any filesystem Beam reads: local, gs://, hdfs://...).
        output: one .csv or .parquet file with the columns `fm-keras score` writes; a local
            one appears only when complete (see the module's docstring).
        runner: DirectRunner (in-process), DataflowRunner, FlinkRunner or SparkRunner.
        batch_size: largest batch RunInference gives the signature.
        keep: input columns copied to the output (default: id columns of the first file).
        options: more pipeline options as ``key=value`` (e.g. ``project=my-project``).

    Returns:
        A summary: rows, seconds, rows per second, runner.

    Raises:
        DataError: a local input lacks a column (checked before the pipeline starts), or a
            file is empty or has a bad value (raised by the run).
        Terminated, KeyboardInterrupt: a signal stopped the run (not Beam's wrapping of it).
    """
    beam = _beam()
    from apache_beam.io import fileio
    from apache_beam.metrics import Metrics
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
    from apache_beam.options.pipeline_options import PipelineOptions

    from fm_keras._tf import tf
    from fm_keras.data import check_not_an_input, expand_paths
    from fm_keras.reading import read_header
    from fm_keras.servables import load_export

    if runner not in RUNNERS:
        raise ExportError(f"--runner {runner!r} is not one of {list(RUNNERS)}")
    bad = [o for o in options if "=" not in o]
    if bad:
        raise ExportError(f"--beam_option {bad[0]!r}: give KEY=VALUE, e.g. project=my-project")
    if batch_size < 1:
        raise ExportError(f"--batch-size must be at least 1, got {batch_size}")
    remote = "://" in output
    fmt = output_format(output)
    if not remote:
        check_output(output)
        check_not_an_input(output, [p for p in inputs if "://" not in p], "--output")
    version_dir, loaded, meta = load_export(model)
    if signature not in loaded.signatures:
        raise ExportError(f"{version_dir}: no signature {signature!r}; it has "
                          f"{sorted(loaded.signatures)}")
    fn = loaded.signatures[signature]
    types = {n: "float32" if s.dtype == tf.float32 else "string"
             for n, s in column_inputs(version_dir, signature, fn, meta).items()}
    local_inputs = [p for p in inputs if "://" not in p]
    files = expand_paths(local_inputs) if local_inputs else []
    if keep is None:
        keep = default_keep(read_header(files[0])) if files else []
    for path in files:  # remote files are checked as the pipeline reads them (`read_rows`)
        check_columns(path, list(types), keep)
    sample = {k: v.numpy() for k, v in fn(**{n: tf.constant(
        [0.0] if t == "float32" else [""], tf.float32 if t == "float32" else tf.string)
        for n, t in types.items()}).items()}
    dtypes = {k: object if v.dtype == object else v.dtype for k, v in sample.items()}
    keep_types = kept_types(files, keep)  # local files; a remote file's cells are cast to them
    numeric = [n for n, t in types.items() if t == "float32"]
    schema = outputs_table({k: _kept_column([0.0 if k in numeric else ""], k, keep_types, numeric)
                            for k in keep}, sample, fmt).schema
    handler = KeyedModelHandler(_handler_class()(
        version_dir, max_batch_size=batch_size,
        inference_fn=functools.partial(call_signature, signature=signature, types=types)))
    rows = Metrics.counter("fm_keras", "rows")

    def to_table(batch):
        rows.inc(len(batch))
        return rows_to_table(batch, keep, dtypes, fmt, keep_types, numeric)

    pipeline_options = PipelineOptions([f"--runner={runner}", *(f"--{o}" for o in options)])
    started = time.time()
    pipeline = beam.Pipeline(runner=_local_runner() if runner == "DirectRunner" else None,
                             options=pipeline_options)
    tables = (pipeline
              | "Files" >> beam.Create(list(files) + [p for p in inputs if "://" in p])
              | "Match" >> fileio.MatchAll()
              | "Open" >> fileio.ReadMatches()
              | "Rows" >> beam.FlatMap(read_rows, types=types, keep=list(keep),
                                        lists=export_list_columns(meta),
                                        keep_types=keep_types)
              | "Score" >> RunInference(handler)
              | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=batch_size)
              | "Table" >> beam.Map(to_table))
    target = output if remote else temp_output(output)
    if fmt == "parquet":
        tables | "Write" >> beam.io.WriteToParquetBatched(
            target, schema, num_shards=1, shard_name_template="")
    else:
        (tables | "Lines" >> beam.FlatMap(_csv_lines)
         | "Write" >> beam.io.WriteToText(target, num_shards=1, shard_name_template="",
                                          header=",".join(f'"{n}"' for n in schema.names)))
    try:
        with _quiet_beam_log(runner == "DirectRunner"):
            result = pipeline.run()
            result.wait_until_finish()
        with termination.committing():  # the output is complete: a SIGTERM no longer stops it
            if not remote:
                os.replace(target, output)
    except BaseException as err:
        if not remote:
            _remove_temp_output(target)
        stopped = stop_signal(err)
        if stopped is None or stopped is err:
            raise
        raise stopped from None
    seconds = time.time() - started
    counted = result.metrics().query(MetricsFilter().with_name("rows"))["counters"]
    n = int(sum(c.committed or 0 for c in counted))
    return {"model": version_dir, "signature": signature, "output": output, "runner": runner,
            "rows": n, "files": len(files), "seconds": round(seconds, 3),
            "rows_per_second": round(n / max(seconds, 1e-9))}
