"""IndexBuilder: the recall model NAME_recall/<V> for a pushed ranking version V.

The recall model is built in the run directory, checked like a candidate (loaded in the model
server, every signature queried), then copied into ``pusher.base/NAME_recall/<V>`` under a
hidden name and renamed into place. It takes the ranking version's number, so a rollback pins
both to one number. A version that exists already is left alone; what a killed build left
behind (a hidden ``.tmp-*`` directory) is removed first. A recall model that fails the check
is not pushed: the ranking version serves, the recall model stays at its previous version.
"""

from __future__ import annotations

import os
import shutil

from fm_keras.pipeline.config import PipelineConfig


def build_recall(config: PipelineConfig, ranking_version_dir: str, version: int,
                 staging: str, examples_dir: str) -> dict:
    """Builds, checks and pushes ``pusher.base/NAME_recall/<version>`` unless it exists.

    Returns:
        {"built", "valid", "version", "path"} plus "reason" (skipped) or "error" (invalid).
    """
    model_dir = os.path.join(config.pusher.base, config.recall_name)
    final = os.path.join(model_dir, str(version))
    if os.path.isdir(model_dir):
        for name in os.listdir(model_dir):
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(model_dir, name), ignore_errors=True)
    if os.path.exists(final):
        return {"built": False, "valid": True, "version": version, "path": final,
                "reason": f"{config.recall_name} version {version} exists already"}
    from fm_keras.data import read_frame
    from fm_keras.export import building
    from fm_keras.pipeline.evaluator import index_params
    from fm_keras.pipeline.infra_validator import infra_validate
    from fm_keras.recall import build_index

    items = len(read_frame(config.data.items, ["item_id"]))
    params = index_params(config.index, items, config.index.k)
    staged = os.path.join(staging, config.recall_name, str(version))
    if os.path.exists(staged):  # a rerun of this step in the same run
        shutil.rmtree(staged)
    build_index(ranking_version_dir, config.data.items, config.recall_name, base=staging,
                k=config.index.k, backend=config.index.backend, version=version, params=params)
    check = infra_validate(staged, examples_dir, config.infra_validator)
    if not check["valid"]:
        return {"built": True, "valid": False, "version": version, "path": staged,
                "error": check["error"], "infra": check}
    os.makedirs(model_dir, exist_ok=True)
    with building(final, prefix=".tmp-push-") as tmp:
        shutil.copytree(staged, tmp, dirs_exist_ok=True)
    return {"built": True, "valid": True, "version": version, "path": final,
            "signatures": sorted(check["signatures"])}
