"""IndexBuilder: the recall model of a candidate, built and checked before anything is pushed.

The recall model is built from the candidate export in the run directory
(``index_builder/NAME_recall/1``) and checked like a candidate (loaded in the model server,
every signature queried). Only then does the pusher push the ranking version and this recall
model (as ``pusher.base/NAME_recall/<the ranking version>``, `fm_keras.pipeline.pusher.
push_recall`) back to back, so a recall model that fails to build or to pass the check pushes
nothing: serving keeps the previous ranking and recall versions, towers of one model.
"""

from __future__ import annotations

import os
import shutil

from fm_keras.pipeline.config import PipelineConfig

STAGED_VERSION = 1  # the pusher gives the recall model the ranking version's number


def build_recall(config: PipelineConfig, candidate_dir: str, staging: str,
                 examples_dir: str) -> dict:
    """Builds ``staging/NAME_recall/1`` from the candidate export and checks it in the server.

    Args:
        config: the pipeline (``index``, ``data.items``, ``infra_validator``, ``name``).
        candidate_dir: the trainer's candidate export (a ranking SavedModel version directory).
        staging: the step's directory in the run.
        examples_dir: ExampleGen's output (the check's query rows).

    Returns:
        {"built": True, "valid", "path"} plus "signatures" (valid) or "error" and "infra"
        (invalid: the model did not load or answer in the server).

    Raises:
        ExportError, DataError: the catalog or the candidate cannot be indexed.
    """
    from fm_keras.data import read_frame
    from fm_keras.pipeline.evaluator import index_params
    from fm_keras.pipeline.infra_validator import infra_validate
    from fm_keras.recall import build_index

    items = len(read_frame(config.data.items, ["item_id"]))
    params = index_params(config.index, items, config.index.k)
    staged = os.path.join(staging, config.recall_name, str(STAGED_VERSION))
    if os.path.exists(staged):  # a rerun of this step in the same run
        shutil.rmtree(staged)
    build_index(candidate_dir, config.data.items, config.recall_name, base=staging,
                k=config.index.k, backend=config.index.backend, version=STAGED_VERSION,
                params=params)
    check = infra_validate(staged, examples_dir, config.infra_validator)
    if not check["valid"]:
        return {"built": True, "valid": False, "path": staged, "error": check["error"],
                "infra": check}
    return {"built": True, "valid": True, "path": staged,
            "signatures": sorted(check["signatures"])}
