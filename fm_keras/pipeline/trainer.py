"""Trainer: fits the FM on ExampleGen's train split and exports the candidate SavedModel.

The run directory (``run/``) is a normal ``fm-keras train`` run; the candidate export
(``candidate/1``) has every signature and the warmup requests, ready for the evaluator, the
infra validator and the pusher. With ``trainer.warm_start`` the fit starts from the last
blessed model's vocabularies and weights. With ``trainer.tune`` it first runs `fm_keras.tune`
(``tune/``, one run directory per trial) and the candidate is the best trial's run.
"""

from __future__ import annotations

import os

from fm_keras.config import DataConfig, ExperimentConfig
from fm_keras.pipeline.config import PipelineConfig

CANDIDATE = "candidate"


def experiment(config: PipelineConfig, examples_dir: str) -> ExperimentConfig:
    """The experiment the trainer runs: the pipeline's features, model and training settings
    on the examples (already cleaned, so no filters)."""
    return ExperimentConfig(
        data=DataConfig(train=(os.path.join(examples_dir, "train.parquet"),),
                        label=config.data.label,
                        items=(config.data.items,) if config.data.items else ()),
        features=config.features, model=config.model, training=config.training,
        source=config.source)


def require_both_classes(config: PipelineConfig, examples_dir: str,
                         span: int | None = None) -> None:
    """Raises `DataError` when the training split of a binary task has a single class, naming
    the span's input files and the label column (not ExampleGen's ``train.parquet``).

    Args:
        config: the pipeline (``data.label``, ``model.task``, ``training.negatives``).
        examples_dir: ExampleGen's output (``train.parquet``, ``counts.json``).
        span: the span number, for the message.

    Raises:
        DataError: every training row has the same label.
    """
    import pandas as pd

    from fm_keras import fsutil
    from fm_keras.data import single_class
    from fm_keras.errors import DataError

    if config.model.task != "binary" or config.training.negatives.per_positive:
        return  # with sampled negatives an all-positive log is the expected input
    label = config.data.label
    frame = pd.read_parquet(os.path.join(examples_dir, "train.parquet"), columns=[label])
    values = pd.to_numeric(frame[label], errors="coerce").dropna().to_numpy()
    only = single_class(values)
    if only is None:
        return
    counts = fsutil.read_json(os.path.join(examples_dir, "counts.json"))
    files = counts["files"][0] + (f" (and {len(counts['files']) - 1} more)"
                                  if len(counts["files"]) > 1 else "")
    where = f"span {span}, " if span is not None else ""
    raise DataError(f"{files}: label column {label!r}: every row of the training split "
                    f"({where}{counts['train_rows']} rows after data.filters and the split) "
                    f"has label {only:g}; a binary model needs both clicks (1) and non-clicks "
                    "(0): check the label column, data.filters and data.split")


def run_trainer(config: PipelineConfig, examples_dir: str, out_dir: str,
                warm_start: str | None = None, span: int | None = None) -> dict:
    """Trains into ``out_dir/run`` (or tunes into ``out_dir/tune``) and exports
    ``out_dir/candidate/1``; returns the run record with the paths (and the tune summary).

    Raises:
        DataError: the training split has one class (`require_both_classes`), or training
            finds bad data.
    """
    from fm_keras.export import export_run

    require_both_classes(config, examples_dir, span)
    exp = experiment(config, examples_dir)
    if config.trainer.tune is not None:
        from fm_keras import fsutil
        from fm_keras.tune import tune

        budget = config.trainer.tune
        summary = tune(exp, os.path.join(out_dir, "tune"), budget.trials,
                       timeout=budget.timeout_s, study_name=config.name, seed=budget.seed)
        run_dir = summary["best"]["run"]
        record = {**fsutil.read_json(os.path.join(run_dir, "run.json")), "tune": summary}
    else:
        from fm_keras.training import train

        run_dir = os.path.join(out_dir, "run")
        record = train(exp, run_dir, verbose=0, warm_start=warm_start)
    export_dir = export_run(run_dir, CANDIDATE, base=out_dir, version=1, parity_rows=1000)
    return {**record, "run_dir": run_dir, "export_dir": export_dir}
