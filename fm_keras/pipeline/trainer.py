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


def run_trainer(config: PipelineConfig, examples_dir: str, out_dir: str,
                warm_start: str | None = None) -> dict:
    """Trains into ``out_dir/run`` (or tunes into ``out_dir/tune``) and exports
    ``out_dir/candidate/1``; returns the run record with the paths (and the tune summary)."""
    from fm_keras.export import export_run

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
