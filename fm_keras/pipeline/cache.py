"""Fingerprints: of files (content), of a step's inputs (its cache key), of a model export.

A step's cache key hashes its name, its parameters, the fingerprints of its input artifacts
and the fm_keras version: if any changes, the step runs again; if none does, the runner reuses
the outputs of the execution that had the same key (recorded as CACHED in the metadata).
"""

from __future__ import annotations

import hashlib
import json
import os

from fm_keras import __version__


def fingerprint_files(paths) -> str:
    """sha256 over the relative names and contents of files (directories are walked)."""
    digest = hashlib.sha256()
    for root in sorted(paths):
        if os.path.isdir(root):
            files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
        else:
            files = [root]
        for path in files:
            digest.update(os.path.relpath(path, os.path.dirname(root)).encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def fingerprint_export(version_dir: str) -> str:
    """The fingerprint of a model: its graph and variables, not its (rewritten) metadata."""
    return fingerprint_files([os.path.join(version_dir, "saved_model.pb"),
                              os.path.join(version_dir, "variables")])


def fingerprint_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def cache_key(step: str, params: dict, inputs: dict) -> str:
    """The cache key of a step: its name, parameters, input fingerprints and code version."""
    return fingerprint_json({"step": step, "params": params, "fm_keras": __version__,
                             "inputs": {k: (a.fingerprint if a is not None else None)
                                        for k, a in sorted(inputs.items())}})
