"""``pipeline status`` (runs and what serves), ``pipeline rollback`` (pin a version), and the
record of one run (``run_summary``)."""

from __future__ import annotations

import os
import time

from fm_keras.errors import ConfigError
from fm_keras.pipeline import serving_config
from fm_keras.pipeline.config import SpanWindow
from fm_keras.pipeline.metadata import DONE
from fm_keras.versions import parse_version, version_dirs


def rollback(model_config_file: str, name: str, to: str) -> dict:
    """Makes the server answer ``name`` (and ``name_recall``, when listed) from version ``to``,
    or from the latest version again with ``to="latest"``.

    Version labels that would name a version no longer served are removed from the file (TF
    Serving rejects a label on an unavailable version at every config poll).

    Returns:
        {"models": names rewritten, "version": the version or "latest", "config": the file,
        "warnings": one line per label removed}.

    Raises:
        ConfigError: the file does not list ``name``, or the version is not on disk.
    """
    policy = serving_config.served_policy(model_config_file, name)
    if policy is None:
        raise ConfigError(f"{model_config_file}: lists no model {name!r}; --name must be a "
                          "model the pipeline pushed")
    version = None
    if to != "latest":
        try:
            version = parse_version(to)
        except ValueError as err:
            raise ConfigError(f"--to must be a version number or 'latest': {err}") from None
        path = os.path.join(policy["base_path"], str(version))
        if not os.path.isdir(path):
            raise ConfigError(f"--to {version}: {path} does not exist; versions on disk: "
                              f"{_versions(policy['base_path'])}")
    names = [name]
    recall = serving_config.served_policy(model_config_file, f"{name}_recall")
    if recall is not None and (version is None or os.path.isdir(
            os.path.join(recall["base_path"], str(version)))):
        names.append(f"{name}_recall")
    warnings = serving_config.set_version(model_config_file, names, version)
    return {"models": names, "version": version or "latest", "config": model_config_file,
            "warnings": warnings}


def _versions(base_path: str) -> list[int]:
    if not os.path.isdir(base_path):
        return []
    return version_dirs(base_path)


def status(config, server: str | None = None, runs: int = 10) -> dict:
    """The last ``runs`` runs from the metadata store, and what serves: the config's version
    policy and the versions on disk, and with ``server`` (host:port) the server's own
    GetModelStatus."""
    from fm_keras.pipeline.metadata import MetadataStore

    path = os.path.join(config.root, "metadata.sqlite")
    records = []
    if os.path.exists(path):
        store = MetadataStore(path)
        try:
            for ctx in store.contexts("run")[-runs:]:
                s = run_summary(store, ctx)
                records.append({k: s[k] for k in ("run_id", "status", "span", "window",
                                                  "blessed", "pushed_version", "seconds")}
                               | {"started": time.strftime("%Y-%m-%d %H:%M:%S",
                                                           time.localtime(s["started"])),
                                  "cached_steps": sum(x["cached"] for x in s["steps"])})
        finally:
            store.close()
    serving = {}
    for name in (config.name, config.recall_name):
        policy = serving_config.served_policy(config.pusher.model_config_file, name)
        if policy is None:
            continue
        entry = {**policy, "on_disk": _versions(policy["base_path"])}
        if server:
            entry["server"] = server_status(server, name)
        serving[name] = entry
    return {"runs": records, "serving": serving,
            "model_config_file": config.pusher.model_config_file}


def server_status(server: str, name: str) -> list[dict] | str:
    """GetModelStatus of ``name`` on a running server, or the error in words."""
    from fm_keras.serving.client import GrpcClient
    from fm_keras.serving.errors import ServingError

    try:
        with GrpcClient(server, timeout=5.0, retries=1) as client:
            return [{"version": s["version"], "state": s["state"]} for s in client.status(name)]
    except ServingError as err:
        return f"{err.code}: {err.message}"


def run_summary(store, context: dict) -> dict:
    """A run's record: status, span and its rolling window of spans (first, last, the spans
    read, the spans missing, in words), the validator's anomalies, blessing and its reasons,
    steps (state, seconds, cached, outcome), pushed version, warnings (a span missing from the
    window, the trainer's, e.g. still improving at the epoch cap, a push that does not
    serve)."""
    steps, pushed, blessed, reasons, anomalies, warnings = [], None, None, None, None, []
    for x in store.executions(context["id"]):
        p = x["properties"]
        steps.append({"step": x["type"], "state": x["state"], "seconds": p.get("seconds"),
                      "cached": p.get("cached", False), "stop": p.get("stop"),
                      "error": p.get("error")})
        if x["type"] == "pusher" and x["state"] in DONE:
            pushed = p.get("version")
            warnings += [p["warning"]] if p.get("warning") else []
        if x["type"] == "trainer" and x["state"] in DONE:  # e.g. still improving at the cap
            warnings += [f"trainer: {w}" for w in p.get("warnings") or []]
        if x["type"] == "evaluator" and x["state"] in DONE:
            blessed, reasons = p.get("blessed"), p.get("reasons")
        if x["type"] == "validator" and x["state"] in DONE:
            anomalies = p.get("anomalies")
    props = context["properties"]
    window = SpanWindow.from_dict(props.get("window"), props.get("span"))
    if window.missing:
        warnings.insert(0, f"rolling window of {window.describe()}: reading spans "
                           f"{', '.join(map(str, window.spans)) or 'none'}")
    return {"run_id": context["name"], "status": props.get("status"), "span": props.get("span"),
            "window": window.as_dict(),
            "started": props.get("started"), "finished": props.get("finished"),
            "seconds": round(props["finished"] - props["started"], 2)
            if props.get("finished") else None,
            "anomalies": anomalies, "blessed": blessed, "not_blessed_reasons": reasons,
            "pushed_version": pushed, "warnings": warnings, "error": props.get("error"),
            "steps": steps}
