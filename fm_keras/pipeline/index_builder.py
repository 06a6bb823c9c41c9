"""IndexBuilder: the recall model NAME_recall/<V> for a pushed ranking version V.

Same version number as the ranking model it was built from, so a rollback pins both to one
number. A version that exists already is left alone; what a killed build left behind (a
hidden ``.tmp-*`` directory) is removed first.
"""

from __future__ import annotations

import os
import shutil

from fm_keras.pipeline.config import PipelineConfig


def build_recall(config: PipelineConfig, ranking_version_dir: str, version: int) -> dict:
    """Builds ``pusher.base/NAME_recall/<version>`` unless it exists; returns what happened."""
    model_dir = os.path.join(config.pusher.base, config.recall_name)
    final = os.path.join(model_dir, str(version))
    if os.path.isdir(model_dir):
        for name in os.listdir(model_dir):
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(model_dir, name), ignore_errors=True)
    if os.path.exists(final):
        return {"built": False, "version": version, "path": final,
                "reason": f"{config.recall_name} version {version} exists already"}
    from fm_keras.data import read_frame
    from fm_keras.pipeline.evaluator import index_params
    from fm_keras.recall import build_index

    items = len(read_frame(config.data.items, ["item_id"]))
    params = index_params(config.index, items, config.index.k) if config.index.backend == "scann" \
        else None
    path = build_index(ranking_version_dir, config.data.items, config.recall_name,
                       base=config.pusher.base, k=config.index.k, backend=config.index.backend,
                       version=version, scann=params)
    return {"built": True, "version": version, "path": path}
