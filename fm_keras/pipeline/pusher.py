"""Pusher: a blessed, infra-valid candidate becomes a new version in ``base/NAME``, atomically,
and its checked recall model the same version of ``base/NAME_recall`` right after it.

The version is copied under a hidden, non-numeric name (``.tmp-push-*``) beside the numeric
versions and renamed into place only when complete, so a server polling ``base/NAME`` never
sees half a model; a push killed midway leaves only the hidden directory, which the next push
removes. A model that is already a version (same model fingerprint) is not pushed again: the
push is skipped and names that version. A recall version that exists already is left alone;
one that is missing (a run killed between the two pushes) is pushed by the next run.

``FM_KERAS_PIPELINE_KILL_DURING_PUSH=1`` makes the process SIGKILL itself after copying part of
the version (the crash test of the atomic push); ``=recall`` after the ranking version is in
place, before the recall push (the crash test of the pair).
"""

from __future__ import annotations

import os
import shutil
import signal

from fm_keras import fsutil
from fm_keras.versions import version_names, version_path

METADATA = os.path.join("assets.extra", "fm_keras.json")
TEMP_PREFIX = ".tmp-push-"
KILL_HOOK = "FM_KERAS_PIPELINE_KILL_DURING_PUSH"


def remove_partial_pushes(model_dir: str) -> list[str]:
    """Removes what killed pushes left behind (call while holding the pipeline lock)."""
    if not os.path.isdir(model_dir):
        return []
    partial = [os.path.join(model_dir, d) for d in os.listdir(model_dir)
               if d.startswith(TEMP_PREFIX)]
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
    return partial


def pushed_version(model_dir: str, model_fingerprint: str) -> int | None:
    """The version of ``model_dir`` that holds this model, if any."""
    if not os.path.isdir(model_dir):
        return None
    names = version_names(model_dir)  # listed once; 00000003 is version 3
    for version in sorted(names):
        path = os.path.join(model_dir, names[version], METADATA)
        if os.path.exists(path):
            meta = fsutil.read_json(path)
            if meta.get("pipeline", {}).get("model_fingerprint") == model_fingerprint:
                return version
    return None


def push(export_dir: str, model_fingerprint: str, base: str, name: str, run_id: str) -> dict:
    """Pushes the candidate export as the next version of ``base/name``.

    Returns:
        {"pushed": True, "version", "path", "removed_partial"} or, when this model is a
        version already, {"pushed": False, "version", "path", "reason"}.
    """
    model_dir = os.path.join(base, name)
    removed = remove_partial_pushes(model_dir)
    existing = pushed_version(model_dir, model_fingerprint)
    if existing is not None:
        return {"pushed": False, "version": existing, "removed_partial": removed,
                "path": os.path.join(model_dir, str(existing)),
                "reason": f"this model is version {existing} already"}
    from fm_keras.export import building, new_version_path  # TensorFlow: only when pushing
    from fm_keras.servables import export_metadata

    source, meta = export_metadata(export_dir)  # refuses a newer export format
    final = new_version_path(base, name)
    version = int(os.path.basename(final))
    with building(final, prefix=TEMP_PREFIX) as tmp:
        shutil.copy2(os.path.join(source, "saved_model.pb"), tmp)
        if os.environ.get(KILL_HOOK) == "1":
            os.kill(os.getpid(), signal.SIGKILL)
        for entry in sorted(os.listdir(source)):
            src = os.path.join(source, entry)
            if entry != "saved_model.pb":
                (shutil.copytree if os.path.isdir(src) else shutil.copy2)(
                    src, os.path.join(tmp, entry))
        meta_path = os.path.join(tmp, METADATA)
        meta.update(name=name, version=version,
                    pipeline={"run": run_id, "model_fingerprint": model_fingerprint,
                              "candidate": os.path.abspath(source)})
        fsutil.write_json(meta_path, meta)
    return {"pushed": True, "version": version, "path": final, "removed_partial": removed}


def push_recall(staged_dir: str, base: str, name: str, version: int, ranking_dir: str,
                run_id: str) -> dict:
    """Pushes a built and checked recall model as ``base/name/<version>`` unless it exists.

    Args:
        staged_dir: the recall model as the index builder built and checked it.
        base, name: the serving target (``pusher.base``, ``NAME_recall``).
        version: the ranking version it belongs to (a rollback pins both to one number).
        ranking_dir: that ranking version's directory (recorded in the recall metadata).
        run_id: the pipeline run (recorded in the recall metadata).

    Returns:
        {"pushed": True, "version", "path", "removed_partial"} or, when the version exists,
        {"pushed": False, "version", "path", "removed_partial", "reason"}.
    """
    if os.environ.get(KILL_HOOK) == "recall":
        os.kill(os.getpid(), signal.SIGKILL)
    model_dir = os.path.join(base, name)
    removed = remove_partial_pushes(model_dir)
    existing = version_path(model_dir, version)  # a zero-padded name is the same version
    if os.path.exists(existing):
        return {"pushed": False, "version": version, "path": existing, "removed_partial": removed,
                "reason": f"{name} version {version} exists already"}
    final = os.path.join(model_dir, str(version))
    from fm_keras.export import building  # TensorFlow: only when pushing

    with building(final, prefix=TEMP_PREFIX) as tmp:
        shutil.copytree(staged_dir, tmp, dirs_exist_ok=True)
        meta_path = os.path.join(tmp, METADATA)
        meta = fsutil.read_json(meta_path)
        meta.update(name=name, version=version, ranking_model=os.path.abspath(ranking_dir),
                    ranking_version=version,
                    pipeline={"run": run_id, "candidate": os.path.abspath(staged_dir)})
        fsutil.write_json(meta_path, meta)
    return {"pushed": True, "version": version, "path": final, "removed_partial": removed}
