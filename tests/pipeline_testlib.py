"""Helpers shared by the pipeline tests (tests/test_pipeline_*.py)."""

import os


def write_pipeline_yaml(path, logs, root, base, **sections) -> str:
    """A small, fast pipeline definition; `sections` replace top-level YAML sections."""
    import yaml

    spec = {
        "name": "ctr", "root": str(root),
        "data": {"input": f"{logs}/span-{{SPAN}}/*.csv", "items": f"{logs}/items.csv",
                 "label": "click", "dedup_keys": ["ts", "user_id", "item_id"],
                 "filters": [{"name": "cached_exposures", "column": "is_cached", "op": "==",
                              "value": 1}],
                 "split": {"by": "time", "column": "ts", "eval_fraction": 0.25}},
        "features": f"{logs}/features.yaml",
        "model": {"embedding_dim": 8, "l2_embeddings": 3.0e-4, "l2_linear": 3.0e-5,
                  "l2_prior": 0.0},
        "training": {"optimizer": "adagrad", "learning_rate": 0.3, "epochs": 6,
                     "batch_size": 1024, "early_stopping_patience": 2,
                     "early_stopping_min_delta": 0.0, "pos_weight": 4.0,
                     "steps_per_execution": 16},
        "trainer": {"warm_start": True},
        "evaluator": {"min_auc": 0.58, "max_calibration_error": 0.5, "min_ann_recall_at_k": 0.8,
                      "ann_recall_queries": 100, "max_auc_regression": 0.03,
                      "max_logloss_regression": 0.03},
        "infra_validator": {"mode": "in_process"},
        "pusher": {"base": str(base), "model_config_file": str(base / "models.config")},
        "index": {"k": 20, "backend": "scann", "num_leaves": 20, "leaves_to_search": 5,
                  "reorder": 100},
    }
    spec.update(sections)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(spec, f)
    return str(path)


def last_examples(config):
    """The newest Examples artifact of a pipeline's metadata store (ExampleGen's output)."""
    from fm_keras.pipeline.metadata import MetadataStore

    store = MetadataStore(os.path.join(config.root, "metadata.sqlite"))
    try:
        return store.artifacts("Examples")[-1]
    finally:
        store.close()


def first_pipeline_run(pipeline_logs, work):
    """A pipeline (root, serving target) of its own under `work`, run on span 1 (pushes
    version 1); returns (yaml path, summary)."""
    from fm_keras.pipeline.config import load_pipeline
    from fm_keras.pipeline.runner import run_pipeline

    path = write_pipeline_yaml(work / "pipeline.yaml", pipeline_logs, work / "root",
                               work / "saved_models")
    return path, run_pipeline(load_pipeline(path), span=1)


def write_small_span(logs, span, rows=40, start_ts=None) -> str:
    """`logs/span-N/part-0.csv`: `rows` rows (ts, user_id, item_id, is_cached, click), time
    stamps after those of earlier spans (1000 * span + row unless `start_ts`); no model is
    trained on these (ExampleGen-only runs)."""
    import pandas as pd

    start = 1000 * span if start_ts is None else start_ts
    frame = pd.DataFrame({"ts": [start + i for i in range(rows)],
                          "user_id": [f"u{span}-{i % 7}" for i in range(rows)],
                          "item_id": [f"i{i % 5}" for i in range(rows)],
                          "is_cached": [0] * rows, "click": [i % 3 == 0 for i in range(rows)]})
    frame["click"] = frame["click"].astype(int)
    os.makedirs(os.path.join(logs, f"span-{span}"), exist_ok=True)
    path = os.path.join(logs, f"span-{span}", "part-0.csv")
    frame.to_csv(path, index=False)
    return path


def window_pipeline(tmp_path, spans_on_disk, window) -> str:
    """A pipeline YAML reading a rolling window of `window` spans (data.spans) of small
    spans `spans_on_disk` under tmp_path/logs; returns its path."""
    import yaml

    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    (logs / "features.yaml").write_text(
        "features:\n  - {name: user_id, kind: categorical, tower: user}\n"
        "  - {name: item_id, kind: categorical, tower: item}\n")
    for span in spans_on_disk:
        write_small_span(logs, span)
    path = write_pipeline_yaml(tmp_path / "window.yaml", logs, tmp_path / "root",
                               tmp_path / "saved_models")
    spec = yaml.safe_load(open(path, encoding="utf-8"))
    spec["data"]["spans"] = window
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(spec, f)
    return path
